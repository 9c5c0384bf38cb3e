"""Training-step time: SFW against SGD(momentum), wall and process CPU time, per thread count.

Prints JSON. Per model (LeNet-300-100 and LeNet-5 at batch 128, ResNet-18 at batch 32) and per
torch thread count (each in its own process), the median over many repeats of one full training
step (zero_grad, forward, loss, backward, optimizer step) and of the optimizer step alone, for
``torch.optim.SGD(lr=0.01, momentum=0.9)`` and ``SFW(constraint_groups(model))`` with the
defaults a user gets (k_frac 0.05, value 15, lr 1, momentum 0.9, gradient rescale,
check_finite on), plus optional variants: ``sfw_batched`` (``fused=False``: the batched torch
step instead of the compiled kernel), ``sfw_reference`` (``foreach=False``), ``naive_sfw``
(``torch.topk`` per tensor, a dense vertex, a host sync per tensor). All run interleaved in one
process (each repeat steps all, in rotating order) on the same batches, so a noisy neighbour
slows them alike; the 1-minute load average is recorded with every model. The summary gives
``wall_<variant>_over_sgd`` and ``cpu_<variant>_over_sgd`` per model and thread count.

CPU time per step is the sum of every thread's own CPU clock (``clock_gettime`` on each
thread's ``CPUCLOCK_SCHED`` id, threads listed from ``/proc/self/task`` after warm-up), read
before and after the step. ``time.process_time()`` around one step is *not* used: on Linux it
brings only the calling thread's runtime up to date, while another running thread (torch's
OpenMP worker at 2 threads, which spins between parallel regions) is charged only when its
runtime is flushed, at scheduler ticks (HZ=250 here: 4 ms). Around a ~2 ms step that adds
either ~0 or ~4 ms (measured: the other threads' share of a LeNet-300-100 step fell in the 0 or
the 4 ms bin 90% of the time), so the median jumps between the two modes with the fraction of
steps that catch a tick, i.e. with the step's wall time (it gave SFW 5.78 ms CPU in a 1.94 ms
wall step: CPU ratio 2.76 at wall ratio 1.17). A thread's own clock is exact (the kernel brings
a running thread's runtime up to date when its clock is read). ``cpu_check`` compares the summed
thread clocks with ``process_time`` over the whole timed loop (1.0: no thread missed) and gives
the mean ``process_time`` per full step (unbiased in the mean, noisy). Without thread clocks
(not Linux) the per-step ``process_time`` median is reported, exact at 1 thread only.

    python benchmarks/step_time.py [--threads 1,2] [--repeats 300] [--variants sfw,sfw_batched]
        [--device cpu|cuda] [--sweep-eval-batches 1] [--out f]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

import sfwprune
from sfwprune._io import atomic_write_json

MODELS = {  # name: (input shape, batch size)
    "lenet300": ((1, 28, 28), 128),
    "lenet5": ((1, 28, 28), 128),
    "resnet18": ((3, 32, 32), 32),
}
SWEEP_LEVELS = [round(0.05 * i, 2) for i in range(1, 20)]  # 0.05 .. 0.95: 19 levels


def build(name: str, shape: tuple[int, int, int]) -> nn.Module:
    try:
        from sfwprune.models import build_model
    except ImportError:  # models package not there yet: the same architectures, inline
        return _fallback_model(name, shape)
    return build_model(name, input_shape=shape, num_classes=10)


def _fallback_model(name: str, shape: tuple[int, int, int]) -> nn.Module:
    c, h, w = shape
    if name == "lenet300":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(c * h * w, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
            nn.Linear(100, 10),
        )  # fmt: skip
    if name == "lenet5":
        return nn.Sequential(
            nn.Conv2d(c, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5),
            nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
        )  # fmt: skip

    def block(cin: int, cout: int, stride: int) -> nn.Module:
        body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
        )  # fmt: skip
        short = nn.Sequential()
        if stride != 1 or cin != cout:
            short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        class Block(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.body, self.short = body, short

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return torch.relu(self.body(x) + self.short(x))

        return Block()

    layers: list[nn.Module] = [nn.Conv2d(c, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [block(cin, cout, stride), block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10)]
    return nn.Sequential(*layers)


class NaiveSFW:
    """The straightforward SFW step, as the issue describes it (the baseline to beat)."""

    def __init__(self, groups: list[dict], lr: float = 1.0, momentum: float = 0.9):
        self.groups, self.lr, self.momentum = groups, lr, momentum
        self.buffers: dict[int, torch.Tensor] = {}

    def zero_grad(self) -> None:
        for g in self.groups:
            for p in g["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for g in self.groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                m = self.buffers.get(id(p))
                if m is None:
                    m = self.buffers[id(p)] = p.grad.clone()
                else:
                    m.mul_(self.momentum).add_(p.grad, alpha=1 - self.momentum)
                if g["constraint"] == "unconstrained":
                    p.add_(m, alpha=-self.lr)
                    continue
                flat = m.reshape(-1)
                idx = torch.topk(flat.abs(), g["k"]).indices
                v = torch.zeros_like(flat).scatter_(0, idx, -g["radius"] * torch.sign(flat[idx]))
                direction = v.view_as(p) - p
                d = torch.linalg.vector_norm(direction).item()
                eta = min(1.0, self.lr * torch.linalg.vector_norm(m).item() / d) if d > 0 else 0.0
                p.add_(direction, alpha=eta)


def _thread_clocks() -> list[int]:
    """CPU clock ids of this process's threads (Linux ``MAKE_THREAD_CPUCLOCK(tid,
    CPUCLOCK_SCHED)``); empty where ``/proc/self/task`` or thread clocks are missing."""
    try:
        ids = [((~int(tid)) << 3) | 2 | 4 for tid in os.listdir("/proc/self/task")]
        for c in ids:
            time.clock_gettime(c)
    except (OSError, ValueError, AttributeError):
        return []
    return ids


def _cpu_now(ids: list[int]) -> float:
    """Process CPU seconds: the sum of the threads' own clocks (exact), else ``process_time``."""
    if not ids:
        return time.process_time()
    total = 0.0
    for c in ids:
        try:
            total += time.clock_gettime(c)
        except OSError:  # a thread that ended: its time is no longer counted (see cpu_check)
            pass
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_model(
    name: str, device: torch.device, repeats: int, warmup: int, variants: list[str]
) -> dict:
    """Median full step (zero_grad, forward, loss, backward, step) and optimizer step, wall and
    process CPU time, of SGD and each SFW variant, interleaved in rotating order."""
    shape, batch = MODELS[name]
    torch.manual_seed(0)
    base = build(name, shape).to(device)
    batches = [
        (torch.randn(batch, *shape, device=device), torch.randint(0, 10, (batch,), device=device))
        for _ in range(8)
    ]
    runs: dict[str, tuple[nn.Module, object]] = {}
    model = copy.deepcopy(base)
    runs["sgd"] = (model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    for variant in variants:
        model = copy.deepcopy(base)
        groups = sfwprune.constraint_groups(model)
        if variant == "sfw":  # the defaults a user gets
            opt: object = sfwprune.SFW(groups)
        elif variant == "sfw_batched":  # the batched torch step on CPU (no compiled kernel)
            opt = sfwprune.SFW(groups, fused=False)
        elif variant == "sfw_reference":
            opt = sfwprune.SFW(groups, foreach=False)
        else:
            opt = NaiveSFW(groups)
        runs[variant] = (model, opt)
    loss_fn = nn.CrossEntropyLoss()
    full: dict[str, list[float]] = {k: [] for k in runs}
    step: dict[str, list[float]] = {k: [] for k in runs}
    cpu_full: dict[str, list[float]] = {k: [] for k in runs}
    cpu_step: dict[str, list[float]] = {k: [] for k in runs}
    proc_full: dict[str, float] = dict.fromkeys(runs, 0.0)
    names = list(runs)
    load_before = os.getloadavg()[0]
    ids: list[int] = []
    loop_cpu = loop_proc = 0.0
    for r in range(warmup + repeats):
        if r == warmup:  # torch's pool exists now; the loop's totals check the list
            ids = _thread_clocks()
            loop_cpu, loop_proc = _cpu_now(ids), time.process_time()
        x, y = batches[r % len(batches)]
        for j in range(len(names)):
            key = names[(r + j) % len(names)]
            model, opt = runs[key]
            _sync(device)
            p0 = time.process_time()
            c0, t0 = _cpu_now(ids), time.perf_counter()
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            _sync(device)
            t1, c1 = time.perf_counter(), _cpu_now(ids)
            opt.step()
            _sync(device)
            t2, c2 = time.perf_counter(), _cpu_now(ids)
            p2 = time.process_time()
            if r >= warmup:
                full[key].append(t2 - t0)
                step[key].append(t2 - t1)
                cpu_full[key].append(c2 - c0)
                cpu_step[key].append(c2 - c1)
                proc_full[key] += p2 - p0
    loop_cpu, loop_proc = _cpu_now(ids) - loop_cpu, time.process_time() - loop_proc

    def med(d: dict[str, list[float]]) -> dict[str, float]:
        return {k: statistics.median(v) * 1e3 for k, v in d.items()}

    wall, cpu = med(full), med(cpu_full)
    out = {
        "batch": batch,
        "input_shape": list(shape),
        "params": sum(p.numel() for p in base.parameters()),
        "tensors": sum(1 for _ in base.parameters()),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "full_step_ms": wall,
        "full_step_cpu_ms": cpu,
        "optimizer_step_ms": med(step),
        "optimizer_step_cpu_ms": med(cpu_step),
        "cpu_clock": "thread clocks" if ids else "process_time",
        "cpu_check": {
            "threads": len(ids),
            "thread_clocks_over_process_time": loop_cpu / loop_proc if loop_proc > 0 else None,
            "full_step_process_time_mean_ms": {k: v / repeats * 1e3 for k, v in proc_full.items()},
        },
    }
    for k in variants:
        out[f"wall_{k}_over_sgd"] = wall[k] / wall["sgd"]
        out[f"cpu_{k}_over_sgd"] = cpu[k] / cpu["sgd"]
    return out


def time_sweep(device: torch.device, eval_batches: int) -> dict:
    """``sparsity_sweep`` (one ranking, 19 levels) vs 19 × (fresh copy, ``prune_``, evaluate)."""
    try:
        from sfwprune.prune import prune_, sparsity_sweep
    except ImportError as err:
        return {"skipped": f"sfwprune.prune not importable: {err}"}
    shape, batch = MODELS["resnet18"]
    torch.manual_seed(0)
    model = build("resnet18", shape).to(device).eval()
    data = [
        (torch.randn(batch, *shape, device=device), torch.randint(0, 10, (batch,), device=device))
        for _ in range(eval_batches)
    ]

    @torch.no_grad()
    def evaluate(net: nn.Module) -> dict[str, float]:
        correct, loss = 0, 0.0
        for x, y in data:
            out = net(x)
            loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
        n = len(data) * batch
        return {"accuracy": correct / n, "loss": loss / n}

    _sync(device)
    t0 = time.perf_counter()
    sparsity_sweep(model, evaluate, SWEEP_LEVELS)
    _sync(device)
    t1 = time.perf_counter()
    for s in SWEEP_LEVELS:
        fresh = copy.deepcopy(model)
        prune_(fresh, s)
        evaluate(fresh)
    _sync(device)
    t2 = time.perf_counter()
    t3 = time.perf_counter()
    for _ in SWEEP_LEVELS:
        evaluate(model)
    _sync(device)
    t4 = time.perf_counter()
    return {
        "levels": len(SWEEP_LEVELS),
        "eval_images": eval_batches * batch,
        "sparsity_sweep_s": t1 - t0,
        "fresh_prune_evaluate_19x_s": t2 - t1,
        "evaluate_only_19x_s": t4 - t3,
        "speedup": (t2 - t1) / (t1 - t0),
    }


def _provenance(device: torch.device) -> dict:
    try:
        from sfwprune.experiments.provenance import provenance

        return provenance(device)
    except ImportError:
        return {
            "versions": {"python": sys.version.split()[0], "torch": torch.__version__},
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2",
                    help="torch thread counts, comma-separated; each runs in its own process")  # fmt: skip
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--repeats", type=int, default=300, help="timed steps per optimizer")
    ap.add_argument("--warmup", type=int, default=20, help="untimed steps per optimizer first")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    ap.add_argument("--resnet-repeats", type=int, default=None,
                    help="repeats for resnet18 (default: 40 on cpu, else --repeats)")  # fmt: skip
    ap.add_argument("--variants", default="sfw",
                    help="SFW variants beside SGD: sfw (defaults), sfw_batched (fused=False), "
                    "sfw_reference (foreach=False), naive_sfw")  # fmt: skip
    ap.add_argument("--sweep-eval-batches", type=int, default=0, help="0 skips the sweep")
    ap.add_argument("--out", default=None, help="also write the JSON here (atomically)")
    args = ap.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    if len(threads) > 1:  # one process per thread count: torch's pool is sized once
        runs = {}
        for t in threads:
            cmd = [sys.executable, __file__, "--threads", str(t), "--device", args.device,
                   "--repeats", str(args.repeats), "--warmup", str(args.warmup),
                   "--models", args.models, "--variants", args.variants,
                   "--sweep-eval-batches", str(args.sweep_eval_batches)]  # fmt: skip
            if args.resnet_repeats is not None:
                cmd += ["--resnet-repeats", str(args.resnet_repeats)]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            runs[str(t)] = json.loads(done.stdout)
        result = {"benchmark": "step_time", "threads": runs, "summary": _summary(runs)}
        _emit(result, args.out)
        return 0
    torch.set_num_threads(threads[0])
    device = torch.device(args.device)
    start = time.perf_counter()
    result: dict = {
        "benchmark": "step_time",
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "sfwprune": sfwprune.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "load_average_at_start": list(os.getloadavg()),
        "numba_kernel": _kernel_available(),
        "models": {},
    }
    variants = args.variants.split(",")
    for name in args.models.split(","):
        reps = args.repeats
        if name == "resnet18":
            default = 40 if device.type == "cpu" else args.repeats
            reps = args.resnet_repeats if args.resnet_repeats is not None else default
        timed = time_model(name, device, reps, args.warmup, variants)
        result["models"][name] = {"repeats": reps, **timed}
    if args.sweep_eval_batches > 0 and "resnet18" in args.models.split(","):
        result["sweep_resnet18"] = time_sweep(device, args.sweep_eval_batches)
    result["load_average_at_end"] = list(os.getloadavg())
    result["provenance"] = _provenance(device)
    result["wall_s"] = time.perf_counter() - start
    _emit(result, args.out)
    return 0


def _kernel_available() -> bool:
    from sfwprune.optim import _cpu_kernel

    return _cpu_kernel.AVAILABLE


def _summary(runs: dict[str, dict]) -> dict:
    """``{model: {threads: {ratio: value}}}``: the SFW/SGD ratios, wall and CPU time."""
    out: dict = {}
    for t, run in runs.items():
        for name, m in run["models"].items():
            ratios = {k: round(v, 3) for k, v in m.items() if k.endswith("_over_sgd")}
            ratios["load_average_1min"] = m["load_average_1min"]
            out.setdefault(name, {})[t] = ratios
    return out


def _emit(result: dict, out: str | None) -> None:
    print(json.dumps(result, indent=2))
    if out:
        atomic_write_json(out, result)


if __name__ == "__main__":
    sys.exit(main())
