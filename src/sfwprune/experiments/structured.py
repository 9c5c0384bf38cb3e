"""The structured grid (issue 14): channel and 2:4 sparsity on Fashion-MNIST, with measured speed.

``sfwprune reproduce fashion-mnist --structured --out OUT`` trains, per model and seed, SGD,
SFW in the channel set (group K-sparse, ``k_frac`` 0.25) and SFW in the 2:4 set (N:M polytope;
weights whose rows 4 does not divide keep the K-sparse set), then sweeps every run with the
structured prunings of :data:`SWEEPS`, and measures the CPU latency of the physically smaller
models. Layout under ``OUT``::

    OUT/<model>/<method>/seed<S>/     a training run with its sweep-<tag>.json files
    OUT/<model>/structured_config.json the grid settings of that model
    OUT/<model>/latency.json          1-thread CPU medians of the shrunk model at each level

:func:`write_structured_report` writes ``RESULTS-structured.md`` (a separate file, linked from
``RESULTS.md`` by :func:`~sfwprune.experiments.report.write_report` when it exists) and the
figure ``docs/structured_accuracy_latency.png``. Everything is resumable: finished pieces are
skipped.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import _io
from .._checks import check_choice
from .config import SFW_WARMUP, TrainConfig

CHANNEL_SPARSITIES = (0.0, 0.25, 0.5, 0.75)
K_FRAC = 0.25  # the channel set's K = round(k_frac · units) per layer
METHODS: dict[str, dict[str, Any]] = {
    "sgd": {"optimizer": "sgd"},
    # warm-up: without it LeNet-5 seed 2 died in epoch 1 (train loss 75), the lr-1 spike of
    # config.SFW_WARMUP's comment
    "sfw_channel": {
        "optimizer": "sfw",
        "constraint": "channel",
        "k_frac": K_FRAC,
        "warmup_epochs": SFW_WARMUP,
    },
    "sfw_2of4": {"optimizer": "sfw", "constraint": "n_m", "nm_n": 2, "nm_m": 4},
}
_CH = {"structure": "channel", "sparsities": list(CHANNEL_SPARSITIES)}
_NM = {"structure": "2:4", "indivisible": "skip", "sparsities": [0.5]}
# Sweep tag -> SweepConfig fields; every run gets every sweep (each takes seconds on the LeNets).
SWEEPS: dict[str, dict[str, Any]] = {
    "ch-l1": {**_CH, "norm": 1, "scope": "layer"},
    "ch-l1-recon": {**_CH, "norm": 1, "scope": "layer", "reconstruct": True},
    "ch-l2": {**_CH, "norm": 2, "scope": "layer"},
    "ch-l2-recon": {**_CH, "norm": 2, "scope": "layer", "reconstruct": True},
    "ch-l1-global": {**_CH, "norm": 1, "scope": "global"},
    "ch-l2-global": {**_CH, "norm": 2, "scope": "global"},
    "2of4": dict(_NM),
    "2of4-recon": {**_NM, "reconstruct": True},
}
# Report rows of the channel table: key -> (label, method, sweep tag).
CHANNEL_ROWS: dict[str, tuple[str, str, str]] = {
    "sgd_l1": ("SGD + L1 filter pruning (Li et al. 2017)", "sgd", "ch-l1"),
    "sgd_l1_recon": ("SGD + L1 + reconstruction", "sgd", "ch-l1-recon"),
    "sgd_l2": ("SGD + L2", "sgd", "ch-l2"),
    "sgd_l2_recon": ("SGD + L2 + reconstruction", "sgd", "ch-l2-recon"),
    "sfw_l2": ("SFW-channel + L2", "sfw_channel", "ch-l2"),
    "sfw_l2_recon": ("SFW-channel + L2 + reconstruction", "sfw_channel", "ch-l2-recon"),
    "sfw_l1": ("SFW-channel + L1", "sfw_channel", "ch-l1"),
    "sfw_l1_recon": ("SFW-channel + L1 + reconstruction", "sfw_channel", "ch-l1-recon"),
    "sgd_l1_global": ("SGD + L1, global ranking", "sgd", "ch-l1-global"),
    "sfw_l2_global": ("SFW-channel + L2, global ranking", "sfw_channel", "ch-l2-global"),
}
N_M_METHODS = {"sgd": "SGD + 2:4 magnitude", "sfw_2of4": "SFW-2:4",
               "sfw_channel": "SFW-channel + 2:4 magnitude"}  # fmt: skip
LATENCY_BATCHES = (1, 256)
LATENCY_ROUNDS = {1: 300, 256: 30}
FIGURE = "structured_accuracy_latency.png"
REPORT_FILE = "RESULTS-structured.md"


@dataclass
class StructuredConfig:
    dataset: str = "fashion-mnist"
    models: tuple[str, ...] = ("lenet300", "lenet5")
    seeds: int = 3
    epochs: int = 20
    data_dir: str | None = None
    device: str = "auto"
    jobs: int = 1
    limit: int | None = None
    calibration_size: int = 2048  # training images for reconstruction
    allow_mixed_revisions: bool = False

    def validate(self) -> StructuredConfig:
        from ..models import MODELS

        if self.seeds < 1 or self.epochs < 1 or self.jobs < 1 or self.calibration_size < 1:
            raise ValueError(
                f"Invalid structured grid settings: seeds={self.seeds}, epochs={self.epochs}, "
                f"jobs={self.jobs}, calibration_size={self.calibration_size} (expected positive "
                "integers)"
            )
        for m in self.models:
            if m not in MODELS:
                raise ValueError(f"Invalid model: {m!r} (expected one of {', '.join(MODELS)})")
        return self

    def train_config(self, model: str, method: str, seed: int) -> TrainConfig:
        return TrainConfig.from_dict({
            "dataset": self.dataset, "model": model, "epochs": self.epochs, "seed": seed,
            "data_dir": self.data_dir, "device": self.device, "limit": self.limit,
            **METHODS[method],
        })  # fmt: skip


# ---------------------------------------------------------------- latency

# How the timed models are executed (one runtime for every model of a measurement, never a mix):
# "eager": the nn.Module as is; "jit": torch.jit.trace + torch.jit.freeze (constants folded, no
# Python per layer); "jit-optimized": the frozen trace through torch.jit.optimize_for_inference
# (oneDNN weight prepacking and blocked layouts: on LeNet-5 at batch 256, one thread, the fastest
# dense model measured, about 2-4x faster than eager). TorchScript is deprecated in torch 2.14
# (FutureWarning) but still the plain trace-and-freeze path; torch.compile was measured beside it
# (docs/benchmarks.md) and is not offered here, its compile time is seconds per model and shape.
RUNTIMES = ("eager", "jit", "jit-optimized")


def deploy(model: nn.Module, example: torch.Tensor, runtime: str = "eager") -> nn.Module:
    """``model`` in eval mode, converted for inference by ``runtime`` (see :data:`RUNTIMES`).

    The JIT runtimes trace ``model`` on ``example`` (so the result is specialised to its shape)
    and freeze it; the original model is not modified. Outputs equal the eager model's up to
    float rounding (``jit-optimized`` reorders the convolution sums: differences of ~1e-7).
    """
    check_choice("runtime", runtime, RUNTIMES)
    model.eval()
    if runtime == "eager":
        return model
    import warnings

    # A trace of inference-mode tensors cannot be frozen into a graph: trace outside it.
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
        example = example.clone() if example.is_inference() else example
        frozen = torch.jit.freeze(torch.jit.trace(model, example))
        if runtime == "jit-optimized":
            frozen = torch.jit.optimize_for_inference(frozen)
    return frozen


@torch.inference_mode()
def measure_latency(
    models: dict[str, nn.Module],
    input_shape,
    *,
    batch: int = 1,
    rounds: int = 100,
    warmup: bool = True,
    runtime: str = "eager",
) -> dict[str, dict[str, float]]:
    """Median CPU forward time of each model on one ``(batch, *input_shape)`` input.

    Every model is first converted by the same ``runtime`` (:func:`deploy`: ``"eager"``,
    ``"jit"`` or ``"jit-optimized"``), traced at this batch size; the conversion is not timed.
    The models run interleaved (one call each per round, after one warm-up call), so a slow
    stretch of a shared machine hits all alike; the speed-up is against the first model.
    Each call is timed twice: wall clock (``median_ms``, ``speedup``) and the calling thread's
    CPU time (``cpu_median_ms``, ``cpu_speedup``; ``time.thread_time``). With one torch thread
    on an idle core the two agree; on a shared machine the wall clock of a call of several
    milliseconds also counts the time the process waited for a core, the CPU time does not.
    Threads: whatever ``torch.get_num_threads()`` is (with more than one, the CPU time misses
    the work of the other threads: compare wall clocks then).
    """
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"Invalid batch: {batch!r} (expected a positive integer)")
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise ValueError(f"Invalid rounds: {rounds!r} (expected a positive integer)")
    check_choice("runtime", runtime, RUNTIMES)
    if not models:
        raise ValueError("Invalid models: {} (expected at least one model)")
    x = torch.randn(batch, *input_shape)
    models = {key: deploy(m, x, runtime) for key, m in models.items()}
    for m in models.values():
        if warmup:  # off where one call takes seconds (it is then its own warm-up)
            m(x)
    wall: dict[str, list[float]] = {k: [] for k in models}
    cpu: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for key, m in models.items():
            c0, t0 = time.thread_time(), time.perf_counter()
            m(x)
            wall[key].append(time.perf_counter() - t0)
            cpu[key].append(time.thread_time() - c0)
    ref = statistics.median(next(iter(wall.values())))
    cpu_ref = statistics.median(next(iter(cpu.values())))
    out: dict[str, dict[str, float]] = {}
    for key in models:
        w, c = statistics.median(wall[key]), statistics.median(cpu[key])
        out[key] = {
            "median_ms": 1e3 * w,
            "speedup": ref / w,
            "cpu_median_ms": 1e3 * c,
            # a call shorter than the CPU clock's resolution reads 0: no ratio then
            "cpu_speedup": cpu_ref / c if c > 0 else float("nan"),
            "rounds": len(wall[key]),
        }
    return out


def latency_levels(run_dir: str | Path, out_file: str | Path, runtime: str = "eager") -> str:
    """Shrink the run's model at each channel level (layer scope, L2; the widths do not depend
    on the weights at layer scope) and time dense vs shrunk on 1 thread at batch 1 and 256,
    every model executed by ``runtime`` (:data:`RUNTIMES`)."""
    from ..prune import shrink, structured_masks
    from .provenance import provenance
    from .runner import load_run

    check_choice("runtime", runtime, RUNTIMES)
    if Path(out_file).is_file():
        return str(out_file)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = load_run(run_dir, device="cpu")
        dense = run.model.eval()
        start = time.perf_counter()
        models: dict[str, nn.Module] = {"dense": dense}
        for s in CHANNEL_SPARSITIES[1:]:
            models[f"{s:g}"] = shrink(dense, structured_masks(dense, s, "channel", scope="layer"))
        timed = {b: measure_latency(models, run.data.input_shape, batch=b,
                                    rounds=LATENCY_ROUNDS[b], runtime=runtime)
                 for b in LATENCY_BATCHES}  # fmt: skip
        rows = []
        for s in CHANNEL_SPARSITIES:
            key = "dense" if s == 0 else f"{s:g}"
            row: dict[str, Any] = {
                "sparsity": s, "params": sum(p.numel() for p in models[key].parameters()),
            }  # fmt: skip
            for b in LATENCY_BATCHES:
                row[f"batch{b}_ms"] = timed[b][key]["median_ms"]
                row[f"batch{b}_speedup"] = timed[b][key]["speedup"]
                row[f"batch{b}_cpu_ms"] = timed[b][key]["cpu_median_ms"]
                row[f"batch{b}_cpu_speedup"] = timed[b][key]["cpu_speedup"]
            rows.append(row)
        _io.atomic_write_json(out_file, {
            "run": str(run_dir), "scope": "layer", "threads": 1, "runtime": runtime,
            "rounds": {str(b): LATENCY_ROUNDS[b] for b in LATENCY_BATCHES},
            "provenance": provenance(torch.device("cpu"),
                                     wall_seconds=time.perf_counter() - start),
            "rows": rows,
        })  # fmt: skip
    finally:
        torch.set_num_threads(before)
    return str(out_file)


# ---------------------------------------------------------------- the grid


def run_structured(
    sc: StructuredConfig, out_dir: str | Path, *, log: Callable[[str], None] = print
) -> Path:
    """Run (or finish) the structured grid into ``out_dir``; then time the shrunk models."""
    from .provenance import provenance
    from .reproduce import _Grid, grid_revision, job_pool, run_dir_of, train_and_sweep

    sc.validate()
    out = Path(out_dir)
    current = grid_revision(out, sc.allow_mixed_revisions)
    for model in sc.models:
        (out / model).mkdir(parents=True, exist_ok=True)
        _io.atomic_write_json(
            out / model / "structured_config.json",
            {**asdict(sc), "models": [model], "methods": METHODS, "sweeps": SWEEPS,
             "provenance": provenance()},
        )  # fmt: skip
    start = time.perf_counter()
    with job_pool(sc.jobs) as pool:
        grid = _Grid(pool, current, sc.allow_mixed_revisions, log)
        for model in sc.models:
            for seed in range(sc.seeds):
                for method in METHODS:
                    cfg = sc.train_config(model, method, seed)
                    run = run_dir_of(out, model, method, seed)
                    grid.submit(f"{model}/{method}/seed{seed}", train_and_sweep,
                                cfg.to_dict(), str(run), [], SWEEPS, sc.calibration_size)  # fmt: skip
        grid.wait()
    # Latency after training, in this process alone: no grid worker shares the core then.
    for model in sc.models:
        latency_levels(run_dir_of(out, model, "sfw_channel", 0), out / model / "latency.json")
        log(f"done: {model}/latency.json")
    log(f"structured grid finished in {time.perf_counter() - start:.0f}s")
    return out


# ---------------------------------------------------------------- the report


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(ms: tuple[float, float]) -> str:
    mean, std = ms
    return "n/a" if mean != mean else f"{mean:.2f} ± {std:.2f}"


def _sweep_accs(out: Path, model: str, method: str, tag: str, seeds: int) -> dict[float, list]:
    """``{sparsity: [accuracy per seed]}`` from the seeds' ``sweep-<tag>.json`` present."""
    accs: dict[float, list[float]] = {}
    for seed in range(seeds):
        path = out / model / method / f"seed{seed}" / f"sweep-{tag}.json"
        if path.is_file():
            for r in json.loads(path.read_text(encoding="utf-8"))["rows"]:
                accs.setdefault(float(r["sparsity"]), []).append(float(r["accuracy"]))
    return accs


def _read_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        int(cfg["seeds"])
        return cfg
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"Invalid structured grid file: {str(path)!r} ({type(exc).__name__})"
        ) from None


def _cpu_speedup(row: dict[str, Any], batch: int) -> str:
    value = row.get(f"batch{batch}_cpu_speedup")
    return "n/a" if value is None or value != value else f"{value:.2f}x"


def _model_section(out: Path, model: str, seeds: int) -> tuple[list[str], dict[str, Any]]:
    lines = [f"### {model}", ""]
    header = " | ".join(f"{100 * s:g}%" for s in CHANNEL_SPARSITIES)
    lines += [
        "Channel pruning, fraction of hidden units removed per layer (layer scope unless "
        "named), test accuracy (%), no retraining:",
        "",
        f"| method | {header} |",
        "|---|" + "---|" * len(CHANNEL_SPARSITIES),
    ]
    stats: dict[str, dict[float, tuple[float, float]]] = {}
    for key, (label, method, tag) in CHANNEL_ROWS.items():
        accs = _sweep_accs(out, model, method, tag, seeds)
        stats[key] = {s: _mean_std(accs.get(s, [])) for s in CHANNEL_SPARSITIES}
        cells = " | ".join(_fmt(stats[key][s]) for s in CHANNEL_SPARSITIES)
        lines.append(f"| {label} | {cells} |")
    lines.append("")

    latency = None
    lat_path = out / model / "latency.json"
    if lat_path.is_file():
        latency = json.loads(lat_path.read_text(encoding="utf-8"))
        lines += [
            "Measured CPU latency of the physically smaller model (1 thread, "
            f"{latency.get('runtime', 'eager')} runtime, median of "
            f"{', '.join(f'{v} rounds at batch {k}' for k, v in latency['rounds'].items())}; "
            "dense and shrunk models interleaved; shrunk from the SFW-channel seed-0 run at layer "
            "scope, whose widths are the same for every run):",
            "",
            "| units removed | parameters | batch 1 (ms) | speed-up | CPU-time speed-up | "
            "batch 256 (ms) | speed-up | CPU-time speed-up |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in latency["rows"]:
            lines.append(
                f"| {100 * r['sparsity']:g}% | {r['params']:,} | {r['batch1_ms']:.3f} | "
                f"{r['batch1_speedup']:.2f}x | {_cpu_speedup(r, 1)} | {r['batch256_ms']:.2f} | "
                f"{r['batch256_speedup']:.2f}x | {_cpu_speedup(r, 256)} |"
            )
        lines += [
            "",
            "Speed-up: ratio of wall-clock medians; CPU-time speed-up: ratio of the medians of the "
            "calling thread's CPU time per call (the same calls), which a busy shared machine "
            "inflates less (latency files written before it was recorded lack it).",
            "",
        ]

    lines += [
        "2:4 pruning (every 4 consecutive weights of a row keep their 2 largest; rows whose "
        "length 4 does not divide stay dense), test accuracy (%):",
        "",
        "| method | dense | 2:4 | 2:4 + reconstruction |",
        "|---|---|---|---|",
    ]
    nm: dict[str, dict[str, tuple[float, float]]] = {}
    for method, label in N_M_METHODS.items():
        dense = _sweep_accs(out, model, method, "ch-l2", seeds).get(0.0, [])
        plain = _sweep_accs(out, model, method, "2of4", seeds).get(0.5, [])
        recon = _sweep_accs(out, model, method, "2of4-recon", seeds).get(0.5, [])
        nm[method] = {"dense": _mean_std(dense), "plain": _mean_std(plain),
                      "recon": _mean_std(recon)}  # fmt: skip
        lines.append(
            f"| {label} | {_fmt(nm[method]['dense'])} | {_fmt(nm[method]['plain'])} | "
            f"{_fmt(nm[method]['recon'])} |"
        )
    lines.append("")
    return lines, {"channel": stats, "latency": latency, "n_m": nm}


def _targets(found: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["## Targets of issue 14", ""]
    lenet5 = found.get("lenet5")
    if lenet5 is None:
        return lines + ["- LeNet-5 is not in this grid: the channel target is not measured.", ""]
    ch = lenet5["channel"]

    def drop(key: str) -> float:
        return ch[key][0.0][0] - ch[key][0.5][0]

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**missed**"

    lat = lenet5["latency"]
    for key in ("sfw_l2", "sfw_l2_recon"):
        d = drop(key)
        lines.append(
            f"- LeNet-5, {CHANNEL_ROWS[key][0]}, 50% of units removed: "
            f"{ch[key][0.5][0]:.2f}% vs dense {ch[key][0.0][0]:.2f}% (drop {d:.2f} points; "
            f"target <= 1): {verdict(d <= 1.0)}"
        )
    if lat is not None:
        row = next(r for r in lat["rows"] if r["sparsity"] == 0.5)
        lines.append(
            f"- LeNet-5 shrunk at 50%: {row['batch1_speedup']:.2f}x faster at batch 1, "
            f"{row['batch256_speedup']:.2f}x at batch 256 (CPU time: {_cpu_speedup(row, 1)}, "
            f"{_cpu_speedup(row, 256)}; target >= 1.6x): batch 1 "
            f"{verdict(row['batch1_speedup'] >= 1.6)}, batch 256 "
            f"{verdict(row['batch256_speedup'] >= 1.6)}"
        )
    for key in ("sgd_l1", "sgd_l1_recon"):
        lines.append(
            f"- Beside it, {CHANNEL_ROWS[key][0]} at 50%: {ch[key][0.5][0]:.2f}% "
            f"(drop {drop(key):.2f} points from {ch[key][0.0][0]:.2f}%)"
        )
    for model, res in found.items():
        nm = res["n_m"]["sfw_2of4"]
        for kind, name in (("plain", "2:4"), ("recon", "2:4 + reconstruction")):
            d = nm["dense"][0] - nm[kind][0]
            lines.append(
                f"- {model}, SFW-2:4, {name}: {nm[kind][0]:.2f}% vs dense {nm['dense'][0]:.2f}% "
                f"(drop {d:.2f}; target <= 0.5): {verdict(d <= 0.5)}"
            )
        sgd = res["n_m"]["sgd"]
        lines.append(
            f"- Beside it, {model} SGD + 2:4 magnitude: {sgd['plain'][0]:.2f}% (+ reconstruction "
            f"{sgd['recon'][0]:.2f}%) vs dense {sgd['dense'][0]:.2f}%"
        )
    return lines + [""]


def plot_accuracy_vs_latency(found: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """Accuracy (mean over seeds) vs measured batch-256 CPU latency of the shrunk models."""
    from .plots import _pyplot, _save

    models = [m for m, res in found.items() if res["latency"] is not None]
    if not models:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(models), figsize=(5.6 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        lat = {r["sparsity"]: r["batch256_ms"] for r in found[model]["latency"]["rows"]}
        for key in ("sgd_l1", "sgd_l1_recon", "sfw_l2", "sfw_l2_recon"):
            stats = found[model]["channel"][key]
            xs = [lat[s] for s in CHANNEL_SPARSITIES]
            ys = [stats[s][0] for s in CHANNEL_SPARSITIES]
            ax.plot(xs, ys, marker="o", label=CHANNEL_ROWS[key][0])
        for s in CHANNEL_SPARSITIES:
            ax.annotate(f"{100 * s:g}%", (lat[s], ax.get_ylim()[0]), fontsize=7, ha="center",
                        va="bottom")  # fmt: skip
        ax.set_xlabel("CPU latency, batch 256, 1 thread (ms; median)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{model}: channels removed (layer scope), no retraining", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    out = _save(fig, path)
    plt.close(fig)
    return out


def write_structured_report(
    out_dir: str | Path, results_path: str | Path = REPORT_FILE, docs_dir: str | Path = "docs"
) -> Path:
    """Write the structured grid's report (``RESULTS-structured.md`` by default) and its figure
    ``docs/structured_accuracy_latency.png`` from the grid in ``out_dir``."""
    from .provenance import provenance
    from .reproduce import grid_revisions

    out = Path(out_dir)
    revisions = grid_revisions(out)
    configs = {p.parent.name: _read_config(p)
               for p in sorted(out.glob("*/structured_config.json"))}  # fmt: skip
    if not configs:
        raise FileNotFoundError(
            f"Invalid structured grid folder: {str(out)!r} (no <model>/structured_config.json; "
            "run `sfwprune reproduce fashion-mnist --structured` first)"
        )
    order = ["lenet300", "lenet5"]
    models = sorted(configs, key=lambda m: (order.index(m) if m in order else 99, m))
    results_path, docs = Path(results_path), Path(docs_dir)
    docs.mkdir(parents=True, exist_ok=True)
    body, found = [], {}
    for model in models:
        lines, found[model] = _model_section(out, model, int(configs[model]["seeds"]))
        body += lines
    figure = plot_accuracy_vs_latency(found, docs / FIGURE)
    cfg0 = configs[models[0]]
    rel = Path(os.path.relpath(docs / FIGURE, results_path.parent or "."))
    fields = set(asdict(StructuredConfig()))
    settings = {m: {k: configs[m][k] for k in sorted(fields & set(configs[m]))} for m in models}
    parts = [
        "# Structured sparsity: channels and 2:4 (issue 14)",
        "",
        f"Dataset {cfg0['dataset']}, {cfg0['epochs']} epochs, {cfg0['seeds']} seeds (mean ± std). "
        "Methods: "
        f"SGD; SFW in the channel set (group K-sparse over output units, k_frac {K_FRAC}); SFW "
        "in the 2:4 set (N:M polytope on weights whose row length 4 divides, the K-sparse set "
        "on the others). Each run is pruned once, without retraining: channels by the L1 (Li et "
        "al. 2017) or L2 norm of each unit's weights, per layer (and one global ranking), and "
        "2:4 by magnitude; each with and without layer-wise reconstruction on "
        f"{cfg0['calibration_size']} training images (docs/algorithm.md §6). The removed units "
        "are dropped physically (`sfwprune.prune.shrink`), so the smaller model is a dense "
        "network of the same class; its latency is measured, not estimated.",
        "",
        *_targets(found),
        "## Tables",
        "",
        *body,
    ]
    if figure is not None:
        parts += [f"![accuracy vs CPU latency]({rel.as_posix()})", ""]
    parts += [
        "## Provenance",
        "",
        f"- Grid folder: `{out}`; command: `sfwprune reproduce fashion-mnist --structured "
        f"--out {out}`",
        *[f"- Grid settings, {m}: `{json.dumps(settings[m])}`" for m in models],
        "- Code revision(s) of the grid's results files: "
        + (
            ", ".join(f"`{rev}` ({len(paths)} files)" for rev, paths in sorted(revisions.items()))
            or "none recorded"
        ),  # fmt: skip
        f"- Report written by: `{json.dumps(provenance())}`",
        "- Latency: measured after all training, in the grid's own process, 1 torch thread.",
        "",
    ]
    return _io.atomic_write_text(results_path, "\n".join(parts) + "\n")
