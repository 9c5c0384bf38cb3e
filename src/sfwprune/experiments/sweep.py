"""Sweep a trained run over sparsities: ``RUN_DIR/sweep.json`` and ``RUN_DIR/sweep.csv``.

Schema of ``sweep.json``::

    {"config": {"train": {...}, "sweep": {...}}, "provenance": {...},
     "rows": [{"sparsity", "measured_sparsity", "accuracy", "loss"}, ...]}
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .. import _io
from ..prune import sparsity_sweep
from ..prune.masks import CRITERIA, INCLUDES, SCOPES
from ..train import evaluate
from .config import DEFAULT_SPARSITIES
from .provenance import provenance
from .runner import load_trained, test_loader, train_loader

ROW_KEYS = ("sparsity", "measured_sparsity", "accuracy", "loss")


@dataclass
class SweepConfig:
    sparsities: tuple[float, ...] = DEFAULT_SPARSITIES
    scope: str = "global"
    include: str = "weights"
    criterion: str = "magnitude"
    bn_recalibrate: bool = False
    bn_batches: int = 20
    seed: int = 0  # for criterion="random"

    def validate(self) -> SweepConfig:
        for name, allowed in (("scope", SCOPES), ("include", INCLUDES), ("criterion", CRITERIA)):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"Invalid {name}: {getattr(self, name)!r} (expected one of {', '.join(allowed)})"
                )
        for s in self.sparsities:
            if not (isinstance(s, (int, float)) and 0.0 <= s <= 1.0):
                raise ValueError(f"Invalid sparsity: {s!r} (expected a number in [0, 1])")
        return self


def calibration_batches(cfg, data, device, count: int) -> list:
    """``count`` training batches without augmentation, for BatchNorm recalibration."""
    loader = train_loader(cfg, data, device, seed=cfg.seed + 1)
    loader.augment = False
    return [b for _, b in zip(range(count), loader)]


def sweep_model(model, cfg, data, device, sweep: SweepConfig) -> list[dict[str, Any]]:
    """Rows of :func:`sfwprune.prune.sparsity_sweep` for ``model`` on ``data``'s test split."""
    evaluator = test_loader(cfg, data, device)
    bn_batches = (
        calibration_batches(cfg, data, device, sweep.bn_batches) if sweep.bn_recalibrate else None
    )
    generator = torch.Generator().manual_seed(sweep.seed)
    return sparsity_sweep(
        model, lambda m: evaluate(m, evaluator, precision=cfg.precision), list(sweep.sparsities),
        bn_batches=bn_batches, scope=sweep.scope, include=sweep.include,
        criterion=sweep.criterion, generator=generator,
    )  # fmt: skip


def sweep_file_name(tag: str | None) -> str:
    return "sweep" if not tag else f"sweep-{tag}"


def sweep_run(
    run_dir: str | Path, sweep: SweepConfig, *, tag: str | None = None, loaded: tuple | None = None
) -> dict[str, Any]:
    """Sweep the run in ``run_dir``; write ``sweep[-TAG].json`` and ``.csv``; return the JSON.

    ``loaded`` is ``load_trained(run_dir)``'s result when the caller has it already."""
    sweep.validate()
    start = time.perf_counter()
    cfg, model, data = loaded if loaded is not None else load_trained(run_dir)
    device = next(model.parameters()).device
    rows = sweep_model(model, cfg, data, device, sweep)
    result = {
        "config": {"train": cfg.to_dict(), "sweep": asdict(sweep)},
        "provenance": provenance(device, wall_seconds=time.perf_counter() - start),
        "rows": rows,
    }
    name = sweep_file_name(tag)
    _io.atomic_write_json(Path(run_dir) / f"{name}.json", result)
    _io.atomic_write_text(Path(run_dir) / f"{name}.csv", rows_to_csv(rows))
    return result


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    keys = list(ROW_KEYS) + sorted({k for r in rows for k in r} - set(ROW_KEYS))
    writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'sparsity':>9} {'measured':>9} {'accuracy':>9} {'loss':>8}"]
    for r in rows:
        lines.append(
            f"{r['sparsity']:>9.3f} {r['measured_sparsity']:>9.4f} {r['accuracy']:>8.2f}% {r['loss']:>8.4f}"
        )
    return "\n".join(lines)
