"""Seconds per pruning level of calibrated reconstruction (:func:`sfwprune.prune.reconstruct_`).

Prints JSON. One level = magnitude pruning to ``--sparsity`` (global) of a fresh copy of the
model, then ``reconstruct_`` against the dense copy. Weights are random-init and inputs are
standard-normal images: the cost depends on the shapes and the sparsity, not on training.

- LeNet-300-100, ``--lenet-images`` images of 1x28x28.
- ResNet-18 (32x32): measured at each of ``--resnet-images``; the per-image slope and intercept
  of a least-squares line through those points extrapolate to ``--resnet-targets`` (reported as
  ``extrapolated``; a target also in ``--resnet-images`` is measured).

Each ``--variant`` is a set of ``reconstruct_`` keyword arguments; variants alternate in every
repeat (so load affects them alike) and the median is reported with the load average.

    python benchmarks/reconstruct_time.py --threads 1 [--repeats 3] [--out results.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time

import torch

from sfwprune.models.registry import build_model
from sfwprune.prune import prune_, reconstruct_

VARIANTS = {
    "default": {},
    "exact_statistics": {"exact_statistics": True, "max_rows": None},
    "all_rows": {"max_rows": None},
    "baseline": None,  # the keyword-free call (before this benchmark's options existed)
}


def level_seconds(model, images, sparsity, kwargs, cache):
    net = copy.deepcopy(model)
    masks = prune_(net, sparsity)
    extra = dict(kwargs or {})
    if cache is not None and "max_rows" not in extra:
        extra["cache"] = cache
    start = time.perf_counter()
    info = reconstruct_(net, masks, [images], dense=model, **extra)
    seconds = time.perf_counter() - start
    err = statistics.fmean(v["error_after"] for v in info.values())
    return seconds, err


def measure(model, images, sparsity, variants, repeats, cached):
    times: dict[str, list[float]] = {v: [] for v in variants}
    errors: dict[str, float] = {}
    caches = {v: ({} if cached else None) for v in variants}
    for _ in range(repeats):
        for v in variants:
            s, e = level_seconds(model, images, sparsity, VARIANTS[v], caches[v])
            times[v].append(s)
            errors[v] = e
    return {
        v: {
            "median_s": round(statistics.median(t), 3),
            "all_s": [round(x, 3) for x in t],
            "mean_error_after": errors[v],
        }
        for v, t in times.items()
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--lenet-images", type=int, default=2048)
    p.add_argument("--resnet-images", type=int, nargs="*", default=[64, 128])
    p.add_argument("--resnet-targets", type=int, nargs="*", default=[512, 2048])
    p.add_argument("--resnet-repeats", type=int, default=1)
    p.add_argument("--variant", nargs="+", default=["default"], choices=sorted(VARIANTS))
    p.add_argument("--cache", action="store_true", help="reuse the dense targets across repeats")
    p.add_argument("--skip-lenet", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    result: dict = {
        "threads": a.threads,
        "sparsity": a.sparsity,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "load_average_start": os.getloadavg(),
        "variants": {v: VARIANTS[v] for v in a.variant},
        "cache": a.cache,
    }
    if not a.skip_lenet:
        model = build_model("lenet300", input_shape=(1, 28, 28), num_classes=10, seed=0).eval()
        x = torch.randn(a.lenet_images, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        level_seconds(model, x[:64], a.sparsity, VARIANTS[a.variant[0]], None)  # warm-up
        result["lenet300"] = {
            "images": a.lenet_images,
            **measure(model, x, a.sparsity, a.variant, a.repeats, a.cache),
        }
    if a.resnet_images:
        model = build_model("resnet18", input_shape=(3, 32, 32), num_classes=10, seed=0).eval()
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(max(a.resnet_images), 3, 32, 32, generator=gen)
        points = {}
        for n in a.resnet_images:
            points[n] = measure(model, x[:n], a.sparsity, a.variant, a.resnet_repeats, a.cache)
        res: dict = {"measured": {str(n): r for n, r in points.items()}}
        if len(points) >= 2:
            res["extrapolated"] = {}
            ns = sorted(points)
            for v in a.variant:
                ys = [points[n][v]["median_s"] for n in ns]
                mx, my = statistics.fmean(ns), statistics.fmean(ys)
                slope = sum((n - mx) * (y - my) for n, y in zip(ns, ys, strict=True)) / sum(
                    (n - mx) ** 2 for n in ns
                )
                res["extrapolated"][v] = {
                    "seconds_per_image": round(slope, 4),
                    "intercept_s": round(my - slope * mx, 2),
                    **{
                        str(t): round(my + slope * (t - mx), 1)
                        for t in a.resnet_targets
                        if t not in points
                    },
                }
        result["resnet18"] = res
    result["load_average_end"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
