"""CPU latency of dense vs channel-pruned (physically smaller) models; prints JSON.

For LeNet-5 (1×28×28), VGG-16 and ResNet-18 (3×32×32), each at 25 / 50 / 75% of the prunable
channels removed (``structured_masks(..., scope="layer")`` then ``shrink``; in ResNet-18 only the
block-internal convs lose channels, the residual-tied ones stay), at batch 1 and 256, one thread,
eval mode, ``torch.inference_mode``. Variants are timed interleaved (one call of each per round)
and the median per variant is reported with the speedup over dense. Weights are the seeded
initialization: latency does not depend on their values.

    PYTHONPATH=src python benchmarks/structured.py            # minutes: batch 256 dominates
    PYTHONPATH=src python benchmarks/structured.py --quick    # a smoke run
    PYTHONPATH=src python benchmarks/structured.py --models lenet5 --onednn off
    PYTHONPATH=src python benchmarks/structured.py --models lenet5 --runtime jit-optimized

``--onednn off`` runs every model (dense and pruned alike) with PyTorch's oneDNN (mkldnn)
kernels disabled, so convolutions take ATen's native path. For LeNet-5 on one thread that path
has a smaller fixed cost per conv call (about 25 us against 65 us at batch 1 here), so the
pruned model's saving is a larger share of its time; at batch 256 it is slower for the dense
model than oneDNN. Compare ``speedup`` (wall) and ``cpu_speedup`` (thread CPU time) of both
settings; each setting is one execution path applied to every variant, never a mix.

``--runtime`` converts every variant the same way before timing (``measure_latency``'s
``runtime``): ``eager`` (default), ``jit`` (``torch.jit.trace`` + ``torch.jit.freeze``) or
``jit-optimized`` (then ``torch.jit.optimize_for_inference``: oneDNN-prepacked weights and
blocked layouts, the fastest dense LeNet-5 at batch 64-1024 measured here). Each variant is
traced at the batch size it is timed at. LeNet-5 at 50% of channels, 1 thread, a shared 2-core
machine (load 3.5-4), ratio of thread-CPU-time medians, two runs each: at batch 256 eager
1.72-1.75x (dense 19-22 ms), ``--runtime jit-optimized`` 1.24-1.26x (dense 4.4-8.9 ms wall, the
fastest dense); at batch 1 ``--runtime jit --onednn off`` 1.34x (dense 0.065 ms, the fastest
dense), eager 1.12-1.20x. With oneDNN's blocked layout conv1 + ReLU + max-pool at batch 256 costs
the same (3.2 ms) at 3, 6, 8 or 16 filters, which bounds that runtime's speed-up near 1.25x.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
from torch import nn

from sfwprune.experiments.structured import RUNTIMES, measure_latency
from sfwprune.models import build_model
from sfwprune.prune.shrink import shrink
from sfwprune.prune.structured import structured_masks

MODELS = {"lenet5": (1, 28, 28), "vgg16": (3, 32, 32), "resnet18": (3, 32, 32)}
SPARSITIES = (0.25, 0.5, 0.75)


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def variants(name: str) -> dict[str, nn.Module]:
    dense = build_model(name, input_shape=MODELS[name], num_classes=10, seed=0).eval()
    out = {"dense": dense}
    for s in SPARSITIES:
        masks = structured_masks(dense, s, "channel", scope="layer")
        out[f"channel_{s}"] = shrink(dense, masks).eval()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds, batch 256 skipped")
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}"
    )
    parser.add_argument(
        "--onednn", choices=("on", "off"), default="on",
        help="oneDNN (mkldnn) kernels for every variant (default on: PyTorch's default)",
    )  # fmt: skip
    parser.add_argument(
        "--runtime", choices=RUNTIMES, default="eager",
        help="how every variant is executed (default eager: the nn.Module as is)",
    )  # fmt: skip
    args = parser.parse_args()
    names = [n for n in args.models.split(",") if n]
    for n in names:
        if n not in MODELS:
            parser.error(f"Invalid --models entry: {n!r} (expected one of {', '.join(MODELS)})")
    torch.set_num_threads(1)
    start = time.time()
    results: dict = {}
    with torch.backends.mkldnn.flags(enabled=args.onednn == "on"):
        for name in names:
            results[name] = run_model(name, args.quick, args.runtime)
    report = {
        "benchmark": "structured",
        "onednn": args.onednn,
        "runtime": args.runtime,
        "results": results,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "wall_s": round(time.time() - start, 1),
    }
    print(json.dumps(report, indent=1))


def run_model(name: str, quick: bool, runtime: str = "eager") -> dict:
    """Every variant of ``name`` timed at batch 1 (and 256 unless ``quick``)."""
    models = variants(name)
    entry: dict = {"params": {k: params(m) for k, m in models.items()}}
    for batch in (1,) if quick else (1, 256):
        if batch == 1:
            rounds = 20 if quick else 200
        else:
            # A dense VGG-16 / ResNet-18 call at batch 256 is ~10-20 s on one thread: a few
            # rounds, and that call is its own warm-up.
            rounds = {"lenet5": 30, "vgg16": 3, "resnet18": 3}[name]
        torch.manual_seed(0)  # the input
        timed = measure_latency(
            models, MODELS[name], batch=batch, rounds=rounds,
            warmup=batch == 1 or name == "lenet5", runtime=runtime,
        )  # fmt: skip
        entry[f"batch_{batch}"] = {
            k: {"median_ms": round(v["median_ms"], 3), "speedup": round(v["speedup"], 2),
                "cpu_median_ms": round(v["cpu_median_ms"], 3),
                "cpu_speedup": round(v["cpu_speedup"], 2), "rounds": v["rounds"]}
            for k, v in timed.items()
        }  # fmt: skip
    return entry


if __name__ == "__main__":
    main()
