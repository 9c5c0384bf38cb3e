"""Probes behind the compiled SFW step's design (docs/benchmarks.md, issue 15). Prints JSON.

1. Threshold prediction: train LeNet-300-100 on Fashion-MNIST with the default SFW for
   ``--steps`` steps and record, for the first layer, the exact K-th largest ``|m|`` (the LMO's
   threshold ``t``) after every step. Report the relative error of three predictions of ``t``:
   the previous threshold alone, the previous threshold scaled by ``||m|| / ||m_prev||`` (what the
   kernel uses) and a linear trend of the last two thresholds.
2. Selection output: on 235,200 standard-normal float32 entries, the time of a pass writing band
   flags (what the kernel does) against a pass compacting the selected entries' indices (what a
   sparse θ update would need). One thread, medians of ``--repeats``.
3. What the band buys: the optimizer step alone (``opt.step()``, LeNet-300-100 on Fashion-MNIST,
   one thread, ``--band-steps`` training steps) of the default SFW against the same kernel with
   the band turned off (``_cpu_kernel.SMALL`` raised, so every tensor partitions all of
   ``|m|``), two copies of one model trained side by side, interleaved; medians.
4. The optimizer step at 2 torch threads right after the backward against after a 5 ms pause
   (torch's OpenMP workers spin for a while after a parallel region, then sleep): SGD and the
   default SFW on LeNet-300-100 (random batches of 128), ``--pause-steps`` steps each way,
   interleaved; medians of ``opt.step()`` alone.
5. CPU clocks (why ``benchmarks/step_time.py`` sums per-thread clocks): LeNet-300-100 steps of
   SGD and SFW, interleaved, at 2 torch threads (batch 128, ``--clock-steps`` each). Per step:
   wall time, ``time.process_time()``, the calling thread's ``time.thread_time()`` and the sum
   of every thread's own CPU clock. The other threads' share of ``process_time``
   (``process_time - thread_time``) is reported in 1 ms bins: on Linux it is charged at
   scheduler ticks, so it is quantized.

    python benchmarks/kernel_probes.py [--steps 1500] [--repeats 500] [--band-steps 400]
        [--pause-steps 400] [--clock-steps 1000] [--out f.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import numpy as np
import torch
from numba import njit

from sfwprune import SFW, constraint_groups
from sfwprune._io import atomic_write_json
from sfwprune.data.fashion_mnist import load_fashion_mnist
from sfwprune.models import build_model


def _fashion_lenet300() -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
    """Normalized Fashion-MNIST training images and labels, and LeNet-300-100 from seed 0."""
    ds = load_fashion_mnist()
    x = (ds.train_x.float() / 255 - 0.286) / 0.353
    torch.manual_seed(0)
    return x, ds.train_y, build_model("lenet300", input_shape=(1, 28, 28), num_classes=10)


def prediction_errors(steps: int) -> dict:
    x, y, model = _fashion_lenet300()
    opt = SFW(constraint_groups(model))
    weight = next(p for p in model.parameters() if p.dim() >= 2)
    k = int(opt.param_groups[0]["k"])
    perm = torch.randperm(len(x))
    per_epoch = len(x) // 128
    ts, mms = [], []
    for s in range(steps):
        idx = perm[(s % per_epoch) * 128 : (s % per_epoch + 1) * 128]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        m = opt.state[weight]["momentum_buffer"].abs().reshape(-1)
        ts.append(float(torch.topk(m, k).values[-1]))
        mms.append(float((m * m).sum()))
    t, mm = np.array(ts), np.array(mms)
    errors = {
        "previous_threshold": np.abs(t[1:] / t[:-1] - 1),
        "norm_scaled (kernel)": np.abs(t[1:] / (t[:-1] * np.sqrt(mm[1:] / mm[:-1])) - 1),
        "linear_trend": np.abs(t[2:] / (t[1:-1] ** 2 / t[:-2]) - 1),
    }
    skip = 50  # the first steps, before momentum settles
    return {
        name: {q: float(np.quantile(e[skip:], v)) for q, v in
               (("median", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))}
        for name, e in errors.items()
    }  # fmt: skip


@njit(fastmath=True, cache=True)
def _flags(m, lo, hi, f):  # pragma: no cover - compiled
    c = 0
    for i in range(m.size):
        a = abs(m[i])
        c += a >= hi
        f[i] = (a >= lo) & (a < hi)
    return c


@njit(fastmath=True, cache=True)
def _indices(m, lo, idx):  # pragma: no cover - compiled
    c = 0
    for i in range(m.size):
        idx[c] = i
        c += abs(m[i]) >= lo
    return c


def selection_times(repeats: int) -> dict:
    n = 235_200
    m = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    f, idx = np.empty(n, np.uint8), np.empty(n, np.int32)
    lo, hi = np.float32(1.9), np.float32(2.0)
    _flags(m, lo, hi, f)
    _indices(m, lo, idx)

    def median_us(fn) -> float:
        xs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            xs.append(time.perf_counter() - t0)
        return 1e6 * statistics.median(xs)

    return {
        "entries": n,
        "band_flags_us": median_us(lambda: _flags(m, lo, hi, f)),
        "index_list_us": median_us(lambda: _indices(m, lo, idx)),
    }


def band_step_times(steps: int) -> dict:
    from sfwprune.optim import _cpu_kernel

    x, y, base = _fashion_lenet300()
    runs = {}
    small = _cpu_kernel.SMALL
    for name, limit in (("band", small), ("partition", 10**12)):
        _cpu_kernel.SMALL = limit  # read when a tensor's kernel state is built (first step)
        model = copy.deepcopy(base)
        opt = SFW(constraint_groups(model))
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[:128]), y[:128]).backward()
        opt.step()
        runs[name] = (model, opt, [])
    _cpu_kernel.SMALL = small
    perm = torch.randperm(len(x))
    per_epoch = len(x) // 128
    for s in range(steps):
        idx = perm[(s % per_epoch) * 128 : (s % per_epoch + 1) * 128]
        for name in ("band", "partition") if s % 2 else ("partition", "band"):
            model, opt, times = runs[name]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
    out = {name: 1e3 * statistics.median(times[20:]) for name, (_, _, times) in runs.items()}
    return {"optimizer_step_ms_median": out, "partition_over_band": out["partition"] / out["band"]}


def pause_step_times(steps: int) -> dict:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    base = build_model("lenet300", input_shape=(1, 28, 28), num_classes=10)
    batches = [(torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))) for _ in range(8)]
    out: dict = {"torch_threads": 2}
    for name in ("sgd", "sfw"):
        model = copy.deepcopy(base)
        opt = (torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9) if name == "sgd"
               else SFW(constraint_groups(model)))  # fmt: skip
        times: dict[str, list[float]] = {"after_backward": [], "after_pause": []}
        for r in range(steps + 20):
            for how in (("after_backward", "after_pause") if r % 2 else
                        ("after_pause", "after_backward")):  # fmt: skip
                x, y = batches[r % len(batches)]
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                if how == "after_pause":
                    time.sleep(0.005)
                t0 = time.perf_counter()
                opt.step()
                if r >= 20:
                    times[how].append(time.perf_counter() - t0)
        out[name] = {how: 1e3 * statistics.median(xs) for how, xs in times.items()}
    torch.set_num_threads(1)
    return {"optimizer_step_ms_median": out}


def _thread_clock_ids() -> list[int]:
    """Linux ``MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED)`` of every thread of this process."""
    return [((~int(tid)) << 3) | 2 | 4 for tid in os.listdir("/proc/self/task")]


def cpu_clocks(steps: int) -> dict:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    base = build_model("lenet300", input_shape=(1, 28, 28), num_classes=10)
    runs = {}
    for name in ("sgd", "sfw"):
        model = copy.deepcopy(base)
        opt = (torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9) if name == "sgd"
               else SFW(constraint_groups(model)))  # fmt: skip
        runs[name] = (model, opt)
    batches = [(torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))) for _ in range(8)]

    def step(name: str, r: int) -> None:
        model, opt = runs[name]
        x, y = batches[r % len(batches)]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for r in range(50):
        for name in runs:
            step(name, r)
    ids = _thread_clock_ids()

    def clocks() -> float:
        return sum(time.clock_gettime(c) for c in ids)

    rows: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(steps):
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            k0, p0, h0, t0 = clocks(), time.process_time(), time.thread_time(), time.perf_counter()
            step(name, r)
            t1, h1, p1, k1 = time.perf_counter(), time.thread_time(), time.process_time(), clocks()
            rows[name].append((t1 - t0, p1 - p0, h1 - h0, k1 - k0))
    out: dict = {"torch_threads": torch.get_num_threads(), "threads": len(ids),
                 "load_average_1min": os.getloadavg()[0]}  # fmt: skip
    for name, xs in rows.items():
        wall, proc, own, summed = (np.array(c) * 1e3 for c in zip(*xs))
        bins = np.bincount(np.clip(np.rint(proc - own), 0, 8).astype(int), minlength=9)
        out[name] = {
            "wall_ms_median": float(np.median(wall)),
            "process_time_ms_median": float(np.median(proc)),
            "process_time_ms_mean": float(proc.mean()),
            "thread_clocks_ms_median": float(np.median(summed)),
            "thread_clocks_ms_mean": float(summed.mean()),
            "other_threads_process_time_ms_bins_0_to_8": bins.tolist(),
        }
    for key in ("wall_ms_median", "process_time_ms_median", "thread_clocks_ms_median"):
        out[f"sfw_over_sgd_{key}"] = out["sfw"][key] / out["sgd"][key]
    torch.set_num_threads(1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--repeats", type=int, default=500)
    p.add_argument("--band-steps", type=int, default=400, help="0 skips the band probe")
    p.add_argument("--pause-steps", type=int, default=400, help="0 skips the pause probe")
    p.add_argument("--clock-steps", type=int, default=1000, help="0 skips the CPU-clock probe")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    result = {
        "torch_threads": 1,
        "load_average_1min": os.getloadavg()[0],
        "threshold_prediction_relative_error": prediction_errors(args.steps),
        "selection_output": selection_times(args.repeats),
    }
    if args.band_steps > 0:
        result["band_vs_partition"] = band_step_times(args.band_steps)
    if args.pause_steps > 0:
        result["step_after_pause_2_threads"] = pause_step_times(args.pause_steps)
    if args.clock_steps > 0:
        result["cpu_clocks_2_threads"] = cpu_clocks(args.clock_steps)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
