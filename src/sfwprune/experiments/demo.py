"""The main job: SFW vs SGD on Fashion-MNIST with LeNet-300-100, swept over sparsities.

Writes ``OUT/{sfw,sgd}/`` (runs with their sweeps: plain magnitude pruning, and for SFW also
magnitude pruning + calibrated reconstruction), ``OUT/accuracy_vs_sparsity.png``,
``OUT/weights.png`` and ``OUT/demo.json`` (the side-by-side table with provenance).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import _io
from .._checks import check_int
from .config import DEFAULT_SPARSITIES, TrainConfig
from .plots import plot_accuracy_vs_sparsity, plot_weight_histograms
from .provenance import provenance
from .runner import SUMMARY_FILE, load_trained, resolve_device, train_run
from .sweep import SweepConfig, sweep_run

DEMO_EPOCHS = 8


def demo_configs(epochs: int, data_dir: str | None = None, seed: int = 0) -> dict[str, TrainConfig]:
    base = dict(
        dataset="fashion-mnist", model="lenet300", epochs=epochs, data_dir=data_dir, seed=seed
    )
    return {
        "sfw": TrainConfig(optimizer="sfw", **base).validate(),
        "sgd": TrainConfig(optimizer="sgd", **base).validate(),
    }


def side_by_side(sweeps: dict[str, list[dict[str, Any]]]) -> str:
    names = list(sweeps)
    lines = [f"{'sparsity':>9}" + "".join(f" {n.upper():>9}" for n in names)]
    first = sweeps[names[0]]
    for i, row in enumerate(first):
        cells = "".join(f" {sweeps[n][i]['accuracy']:>8.2f}%" for n in names)
        lines.append(f"{100 * row['sparsity']:>8g}%{cells}")
    return "\n".join(lines)


def run_demo(
    out_dir: str | Path = "runs/demo",
    *,
    epochs: int = DEMO_EPOCHS,
    data_dir: str | None = None,
    quiet: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train (or reuse finished runs), sweep, tabulate and plot; returns the ``demo.json`` dict."""
    check_int("epochs", epochs, 1)
    start = time.perf_counter()
    out = Path(out_dir)
    configs = demo_configs(epochs, data_dir)
    sweeps: dict[str, list[dict[str, Any]]] = {}
    models = []
    for name, cfg in configs.items():
        run_dir = out / name
        done = (run_dir / SUMMARY_FILE).is_file()
        if done:
            log(f"[{name}] reusing the finished run in {run_dir}")
        else:
            log(f"[{name}] training LeNet-300-100 on Fashion-MNIST for {epochs} epochs")
            train_run(cfg, run_dir, resume="auto", quiet=quiet, log=log)
        loaded = load_trained(run_dir)  # one load serves the sweeps and the histogram
        sweep = SweepConfig(sparsities=DEFAULT_SPARSITIES)
        sweeps[name] = sweep_run(run_dir, sweep, loaded=loaded)["rows"]
        if name == "sfw":  # no gradient training: 2048 unlabeled images re-solve kept weights
            log("[sfw] sweeping with calibrated reconstruction (about a second a level)")
            recon = SweepConfig(sparsities=DEFAULT_SPARSITIES, reconstruct=True)
            sweeps["sfw+recon"] = sweep_run(run_dir, recon, tag="recon", loaded=loaded)["rows"]
        models.append((name.upper(), loaded[1]))
    table = side_by_side(sweeps)
    log(
        "\nTest accuracy after global magnitude pruning, no retraining "
        "(SFW+RECON: + calibrated reconstruction):\n" + table
    )
    labels = {"sfw": "SFW + magnitude pruning", "sgd": "SGD + magnitude pruning",
              "sfw+recon": "SFW + magnitude pruning + reconstruction"}  # fmt: skip
    figure = plot_accuracy_vs_sparsity(
        [(labels[n], rows) for n, rows in sweeps.items()],
        out / "accuracy_vs_sparsity.png",
        title=f"LeNet-300-100 on Fashion-MNIST, {epochs} epochs, one-shot pruning, no retraining",
    )
    weights = plot_weight_histograms(models, out / "weights.png")
    result = {
        "config": {name: cfg.to_dict() for name, cfg in configs.items()},
        "provenance": provenance(resolve_device("auto"), wall_seconds=time.perf_counter() - start),
        "table": {name: rows for name, rows in sweeps.items()},
        "figures": [str(figure), str(weights)],
    }
    _io.atomic_write_json(out / "demo.json", result)
    log(f"\nwrote {figure}, {weights} and {out / 'demo.json'}")
    return result
