"""Dense vs sparse (CSR) CPU inference of a pruned LeNet-300-100, and compact file sizes.

Prints JSON. Latencies are medians over many interleaved repeats (variants alternate, so a noisy
neighbour slows all of them alike). Weights are random-init, magnitude-pruned (global scope):
latency depends on the sparsity pattern's density, not on training.

    python benchmarks/sparse_inference.py --threads 1 [--repeats 400] [--out results.json]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from sfwprune._io import atomic_write_json
from sfwprune.experiments.provenance import provenance
from sfwprune.prune import (
    SparseLinear,
    prune_,
    save_pruned,
    sparsity_report,
    to_sparse_inference,
)

SPARSITIES = (0.9, 0.95, 0.98, 0.99)
BATCHES = (1, 256)
LAYER_SHAPES = ((300, 784), (100, 300), (10, 100), (1000, 1000))
LAYER_SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99)


def lenet300(seed: int = 0) -> nn.Module:
    try:
        from sfwprune.models import build_model
    except ImportError:  # models not available: the same network inline
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 300),
            nn.ReLU(),
            nn.Linear(300, 100),
            nn.ReLU(),
            nn.Linear(100, 10),
        )
    return build_model("lenet300", input_shape=(1, 28, 28), num_classes=10, seed=seed)


def interleaved_medians(
    fns: dict[str, Callable[[torch.Tensor], object]], x: torch.Tensor, repeats: int, inner: int
) -> dict[str, float]:
    """Median seconds per call ``f(x)`` of each function; each repeat times ``inner`` calls."""
    for f in fns.values():  # warm-up (MKL handles, allocator)
        for _ in range(3):
            f(x)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            for _ in range(inner):
                f(x)
            times[k].append((time.perf_counter() - t) / inner)
    return {k: statistics.median(v) for k, v in times.items()}


def inner_calls(batch: int) -> int:
    return 10 if batch == 1 else 1


@torch.no_grad()
def model_latency(repeats: int) -> list[dict]:
    rows = []
    for sparsity in SPARSITIES:
        model = lenet300().eval()
        prune_(model, sparsity)
        report = sparsity_report(model)
        every = to_sparse_inference(model, min_sparsity=0.0, min_numel=0)
        auto = to_sparse_inference(model)
        for batch in BATCHES:
            x = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(1))
            torch.testing.assert_close(every(x), model(x), rtol=1e-4, atol=1e-5)
            med = interleaved_medians(
                {"dense": model, "csr_all": every, "auto": auto},
                x,
                repeats,
                inner_calls(batch),
            )
            rows.append(
                {
                    "sparsity": sparsity,
                    "batch": batch,
                    "layer_sparsity": {
                        r["name"]: round(r["sparsity"], 4)
                        for r in report["layers"]
                        if r["prunable"]
                    },
                    "auto_converted": [
                        n for n, m in auto.named_modules() if isinstance(m, SparseLinear)
                    ],
                    "dense_us": med["dense"] * 1e6,
                    "csr_all_us": med["csr_all"] * 1e6,
                    "auto_us": med["auto"] * 1e6,
                    "speedup_csr_all": med["dense"] / med["csr_all"],
                    "speedup_auto": med["dense"] / med["auto"],
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


@torch.no_grad()
def layer_latency(repeats: int) -> list[dict]:
    """One linear layer at uniform sparsity: where does CSR beat dense (threshold data)."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    for out_f, in_f in LAYER_SHAPES:
        for sparsity in LAYER_SPARSITIES:
            layer = nn.Linear(in_f, out_f)
            prune_(layer, sparsity, criterion="random", generator=gen)
            sparse = SparseLinear.from_dense(layer)
            for batch in BATCHES:
                x = torch.randn(batch, in_f, generator=gen)
                med = interleaved_medians(
                    {"dense": layer, "csr": sparse},
                    x,
                    max(repeats // 4, 25),
                    inner_calls(batch),
                )
                rows.append(
                    {
                        "shape": [out_f, in_f],
                        "sparsity": sparsity,
                        "batch": batch,
                        "dense_us": med["dense"] * 1e6,
                        "csr_us": med["csr"] * 1e6,
                        "speedup": med["dense"] / med["csr"],
                    }
                )
    return rows


def file_sizes() -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for sparsity in SPARSITIES:
            model = lenet300()
            prune_(model, sparsity)
            buf = io.BytesIO()
            torch.save(model.state_dict(), buf)
            row: dict = {"sparsity": sparsity, "torch_save_state_dict": len(buf.getvalue())}
            for dtype, compression in (
                (torch.float32, "zlib"),
                (torch.float32, "lzma"),
                (torch.float16, "zlib"),
            ):
                key = f"save_pruned_{str(dtype).removeprefix('torch.')}_{compression}"
                t = time.perf_counter()
                path = save_pruned(
                    model, Path(tmp) / f"{key}.pt", dtype=dtype, compression=compression
                )
                row[key] = path.stat().st_size
                row[f"{key}_ratio"] = row[key] / row["torch_save_state_dict"]
                row[f"{key}_save_s"] = time.perf_counter() - t
            rows.append(row)
    return rows


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=400)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    start = time.perf_counter()
    result = {
        "benchmark": "sparse_inference",
        "config": vars(args) | {"out": str(args.out) if args.out else None},
        "model": "lenet300 (784-300-100-10), random init, global magnitude pruning",
        "cpu": cpu_name(),
        "mkl": torch.backends.mkl.is_available(),
        "model_latency": model_latency(args.repeats),
        "layer_latency": layer_latency(args.repeats),
        "file_sizes_bytes": file_sizes(),
    }
    result.update(provenance("cpu", time.perf_counter() - start))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
