"""GPU check: ResNet-18 epochs on CIFAR-shaped synthetic data, SGD vs SFW; prints JSON.

The data (uint8, N×3×32×32, random labels) lives on the device; batches come from the
device-resident loader (shuffle, random crop + flip, normalisation on the device). Each optimizer
trains a copy of the same initial model for ``--epochs`` timed epochs after ``--warmup``
untimed steps, with ``--precision bf16`` autocast and channels_last. Reported: median epoch
time, images/s, the optimizer step's median time (CUDA events), and SFW/SGD ratios. Runs in
well under 4 minutes on one H100 with the defaults; on CPU, e.g.

    PYTHONPATH=src python benchmarks/gpu_check.py --device cpu --images 512

The 2:4 section (``--sections 2:4``) times ``F.linear(x, W)`` with ``W`` a 2:4-pruned fp16
weight, dense vs ``torch.sparse.to_sparse_semi_structured(W)`` (sparse tensor cores), at the
matmul shapes of VGG-16 / ResNet-18 layers (conv layers as their im2col matmul), and checks the
sparse result against the dense one. Without CUDA it is recorded as skipped.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from collections.abc import Iterator

import torch
from torch import nn

import sfwprune
from sfwprune._io import atomic_write_json

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def build_resnet18(device: torch.device, channels_last: bool) -> nn.Module:
    try:
        from sfwprune.models import build_model

        model = build_model("resnet18", input_shape=(3, 32, 32), num_classes=10, seed=0)
    except ImportError:  # models package not there yet: the benchmark's inline copy
        sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
        from step_time import build

        torch.manual_seed(0)
        model = build("resnet18", (3, 32, 32))
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def make_loader(x: torch.Tensor, y: torch.Tensor, batch: int, channels_last: bool):
    """The project's DeviceLoader, or (before it exists) an inline on-device equivalent."""
    try:
        from sfwprune.data.loader import DeviceLoader
    except ImportError:
        return _InlineLoader(x, y, batch, channels_last)
    return DeviceLoader(
        x, y, batch_size=batch, shuffle=True, augment=True, mean=CIFAR_MEAN, std=CIFAR_STD,
        device=x.device, drop_last=True, generator=0, channels_last=channels_last,
    )  # fmt: skip


class _InlineLoader:
    """Minimal device loader: permutation, pad-4 random crop, flip, normalise, all on device."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int, channels_last: bool):
        self.x, self.y, self.batch, self.channels_last = x, y, batch, channels_last
        dev = x.device
        self.mean = torch.tensor(CIFAR_MEAN, device=dev).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(CIFAR_STD, device=dev).view(1, 3, 1, 1) * 255
        self.gen = torch.Generator(device=dev).manual_seed(0)

    def __len__(self) -> int:
        return self.x.shape[0] // self.batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, dev = self.x.shape[0], self.x.device
        order = torch.randperm(n, device=dev, generator=self.gen)
        for b in range(len(self)):
            idx = order[b * self.batch : (b + 1) * self.batch]
            xb = nn.functional.pad(self.x[idx].float(), (4, 4, 4, 4))
            dx, dy = torch.randint(0, 9, (2,), device=dev, generator=self.gen).tolist()
            xb = xb[:, :, dy : dy + 32, dx : dx + 32]
            flip = torch.rand(xb.shape[0], device=dev, generator=self.gen) < 0.5
            xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(3), xb)
            xb = (xb - self.mean) / self.std
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, self.y[idx]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(name: str, model: nn.Module, opt: torch.optim.Optimizer, loader, args, device) -> dict:
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    loss_fn = nn.CrossEntropyLoss()
    step_ms: list[float] = []
    events: list[tuple] = []

    def train_step(x: torch.Tensor, y: torch.Tensor, timed: bool) -> torch.Tensor:
        with autocast:
            loss = loss_fn(model(x), y)
        loss.backward()
        if timed and device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            opt.step()
            end.record()
            events.append((start, end))
        elif timed:
            t0 = time.perf_counter()
            opt.step()
            step_ms.append((time.perf_counter() - t0) * 1e3)
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    model.train()
    batches = iter(loader)
    for _ in range(args.warmup):  # cudnn autotuning, allocator warm-up, first-step state
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        train_step(x, y, timed=False)
    for _ in batches:  # finish the partial epoch so timed epochs start clean
        pass
    epoch_s, last = [], None
    for _ in range(args.epochs):
        _sync(device)
        t0 = time.perf_counter()
        for x, y in loader:
            last = train_step(x, y, timed=True)
        _sync(device)
        epoch_s.append(time.perf_counter() - t0)
    step_ms += [s.elapsed_time(e) for s, e in events]
    images = len(loader) * args.batch
    med = statistics.median(epoch_s)
    return {
        "epoch_s": epoch_s,
        "median_epoch_s": med,
        "images_per_s": images / med,
        "optimizer_step_ms_median": statistics.median(step_ms),
        "final_loss": float(last.detach()) if last is not None else None,
        "finite_params": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
    }


# (name, out features, in features, rows of x): linear layers, and conv layers as im2col
# matmuls (out channels, C·3·3, batch·H·W) at batch 256 on CIFAR-sized inputs
SPARSE_SHAPES = (
    ("vgg16_classifier_512x512_b256", 512, 512, 256),
    ("vgg16_fc_4096x4096_b256", 4096, 4096, 256),
    ("resnet18_layer3_conv_256x2304", 256, 2304, 256 * 8 * 8),
    ("resnet18_layer4_conv_512x4608", 512, 4608, 256 * 4 * 4),
    ("vgg16_conv_512x4608", 512, 4608, 256 * 2 * 2),
)


def prepare_2_4(
    out_features: int,
    in_features: int,
    rows: int,
    *,
    dtype: torch.dtype = torch.float16,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight pruned to 2:4 by ``prune_(structure="2:4")`` and an input, on ``device``.

    Returns ``(W, x)``: ``W`` of shape ``(out, in)`` from :func:`semi_structured_state`
    (verified 2:4, ``dtype``, contiguous), ``x`` of shape ``(rows, in)`` in ``dtype``.
    """
    from sfwprune.prune import prune_, semi_structured_state

    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, in_features, generator=gen))
    prune_(layer, structure="2:4")
    w = semi_structured_state(layer, dtype=dtype)["weight"]
    x = torch.randn(rows, in_features, generator=gen).to(dtype)
    return w.to(device), x.to(device)


def _cuda_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def sparse_2_4_section(device: torch.device, repeats: int = 50) -> dict:
    """Dense vs semi-structured (2:4) fp16 ``F.linear`` per shape; skipped without CUDA."""
    if device.type != "cuda":
        return {"skipped": f"no CUDA device (device {device})"}
    from torch.sparse import to_sparse_semi_structured

    rows = {}
    for name, out_f, in_f, n in SPARSE_SHAPES:
        w, x = prepare_2_4(out_f, in_f, n, device=device)
        try:
            ws = to_sparse_semi_structured(w)
        except (RuntimeError, NotImplementedError) as exc:  # no kernel for this GPU / build
            rows[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
            continue
        dense_out = nn.functional.linear(x, w)
        sparse_out = nn.functional.linear(x, ws)
        dense_ms = _cuda_ms(lambda w=w, x=x: nn.functional.linear(x, w), repeats)
        sparse_ms = _cuda_ms(lambda ws=ws, x=x: nn.functional.linear(x, ws), repeats)
        err = (sparse_out.float() - dense_out.float()).abs().max().item()
        scale = dense_out.float().abs().max().item()
        rows[name] = {
            "shape": [out_f, in_f, n],
            "backend": type(ws).__name__,
            "dense_ms": dense_ms,
            "sparse_ms": sparse_ms,
            "speedup": dense_ms / sparse_ms,
            "max_abs_err_rel": err / scale if scale else err,
            "tflops_dense": 2 * out_f * in_f * n / dense_ms / 1e9,
        }
    return {"dtype": "float16", "repeats": repeats, "shapes": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=10000, help="synthetic images per epoch")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs per optimizer")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per optimizer first")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                    help="autocast dtype (default: bf16 on cuda, fp32 on cpu)")  # fmt: skip
    ap.add_argument("--no-channels-last", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--out", default=None, help="also write the JSON here (atomically)")
    ap.add_argument("--sections", default="train,2:4",
                    help="comma-separated: train (SGD vs SFW epochs), 2:4 (semi-structured matmul)")  # fmt: skip
    args = ap.parse_args(argv)
    sections = set(args.sections.split(","))
    if not sections or sections - {"train", "2:4"}:
        ap.error(f"Invalid --sections: {args.sections!r} (expected train and/or 2:4)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.precision is None:
        args.precision = "bf16" if device.type == "cuda" else "fp32"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    channels_last = not args.no_channels_last
    start = time.perf_counter()
    out: dict = {
        "benchmark": "gpu_check",
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (platform.processor() or platform.machine()),
        "torch_threads": torch.get_num_threads(),
    }
    if "train" in sections:
        out.update(_train_section(args, device, channels_last))
    if "2:4" in sections:
        out["sparse_2_4"] = sparse_2_4_section(device)
    out["wall_s"] = time.perf_counter() - start
    print(json.dumps(out, indent=2))
    if args.out:
        atomic_write_json(args.out, out)
    return 0


def _train_section(args: argparse.Namespace, device: torch.device, channels_last: bool) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (args.images,), generator=gen)
    x, y = x.to(device), y.to(device)
    loader = make_loader(x, y, args.batch, channels_last)
    base = build_resnet18(device, channels_last)
    results = {}
    # sfw: the defaults (check_finite=True: one host sync a step to refuse NaN/inf gradients);
    # sfw_unchecked: check_finite=False, as `sfwprune train` builds it (it checks the loss).
    for name in ("sgd", "sfw", "sfw_unchecked"):
        model = copy.deepcopy(base)
        if name == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        else:
            opt = sfwprune.SFW(sfwprune.constraint_groups(model), lr=1.0, momentum=0.9,
                               check_finite=name == "sfw")  # fmt: skip
        results[name] = run(name, model, opt, loader, args, device)
    return {
        "loader": type(loader).__name__,
        "images": args.images,
        "batch": args.batch,
        "epochs": args.epochs,
        "precision": args.precision,
        "channels_last": channels_last,
        "results": results,
        "sfw_over_sgd_epoch": results["sfw"]["median_epoch_s"] / results["sgd"]["median_epoch_s"],
        "sfw_over_sgd_step": results["sfw"]["optimizer_step_ms_median"]
        / results["sgd"]["optimizer_step_ms_median"],
        "sfw_unchecked_over_sgd_epoch": results["sfw_unchecked"]["median_epoch_s"]
        / results["sgd"]["median_epoch_s"],
    }


if __name__ == "__main__":
    sys.exit(main())
