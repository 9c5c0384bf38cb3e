"""Sweep a trained run over sparsities: ``RUN_DIR/sweep.json`` and ``RUN_DIR/sweep.csv``.

Schema of ``sweep.json``::

    {"config": {"train": {...}, "sweep": {...}}, "provenance": {...},
     "run": {"run_id", "epoch", "finished"},   # the weights evaluated: which training, which epoch
     "rows": [{"sparsity", "measured_sparsity", "accuracy", "loss"}, ...]}

``structure`` (``"channel"`` or ``"N:M"``, :func:`sfwprune.prune.prune_`) sweeps structured
pruning: channel levels are fractions of output units (``norm`` 1 or 2 ranks them), an N:M
sweep has the one level ``1 - N/M`` (``indivisible="skip"`` leaves rows of other lengths dense).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .. import _io
from ..prune import needs_calibration, sparsity_sweep
from ..prune.masks import CRITERIA, INCLUDES, SCOPES
from ..prune.reconstruct import check_relu_aware
from ..prune.sweep import GRADUAL_STEP, check_gradual
from ..train import evaluate
from .config import DEFAULT_SPARSITIES
from .provenance import provenance
from .runner import TrainedRun, load_run, read_run_file, test_loader, train_loader

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
    # calibrated one-shot pruning (docs/algorithm.md §6): re-solve the kept weights per level
    reconstruct: bool = False
    calibration_size: int = 2048  # training images (no labels used), fixed seed CALIBRATION_SEED
    gradual: bool = False  # reconstruct only: levels in increasing order, each from the previous
    gradual_step: float = GRADUAL_STEP  # gradual: most of the kept entries one step prunes
    relu_aware: bool = False  # reconstruct only: layers feeding a ReLU match what it passes on
    # structured pruning (docs/algorithm.md §7): None (unstructured), "channel" or "N:M"
    structure: str | None = None
    norm: int = 2  # channel: rank units by their L1 (1, Li et al. 2017) or L2 (2) row norm
    indivisible: str = "error"  # N:M: "skip" leaves rows whose length M does not divide dense

    def validate(self) -> SweepConfig:
        if self.structure is not None:
            from ..prune.structured import parse_structure

            nm = parse_structure(self.structure)
            if self.norm not in (1, 2) or isinstance(self.norm, bool):
                raise ValueError(f"Invalid norm: {self.norm!r} (expected 1 or 2)")
            if self.indivisible not in ("error", "skip"):
                raise ValueError(
                    f"Invalid indivisible: {self.indivisible!r} (expected 'error' or 'skip')"
                )
            if nm is None and any(s >= 1.0 for s in self.sparsities):
                raise ValueError(
                    "Invalid sparsity: 1.0 (channel pruning keeps at least one unit per layer; "
                    "expected numbers in [0, 1))"
                )
            if nm is not None and any(abs(s - (1 - nm[0] / nm[1])) > 1e-9 for s in self.sparsities):
                raise ValueError(
                    f"Invalid sparsities: {list(self.sparsities)} (structure {self.structure} "
                    f"has the one level {1 - nm[0] / nm[1]:g})"
                )
        elif self.norm != 2 or self.indivisible != "error":
            raise ValueError(
                f"Invalid norm/indivisible: {self.norm!r}/{self.indivisible!r} (structured "
                "pruning only; pass structure='channel' or 'N:M')"
            )
        for name, allowed in (("scope", SCOPES), ("include", INCLUDES), ("criterion", CRITERIA)):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"Invalid {name}: {getattr(self, name)!r} (expected one of {', '.join(allowed)})"
                )
        if (
            isinstance(self.calibration_size, bool)
            or not isinstance(self.calibration_size, int)
            or self.calibration_size < 1
        ):
            raise ValueError(
                f"Invalid calibration_size: {self.calibration_size!r} (expected an integer >= 1)"
            )
        for s in self.sparsities:
            if not (isinstance(s, (int, float)) and 0.0 <= s <= 1.0):
                raise ValueError(f"Invalid sparsity: {s!r} (expected a number in [0, 1])")
        check_gradual(
            self.gradual, self.reconstruct, self.structure, self.gradual_step
        )  # before any run is loaded
        check_relu_aware(self.relu_aware, self.reconstruct)
        return self


def calibration_batches(cfg, data, device, count: int, *, seed: int | None = None) -> list:
    """The first ``count`` ``(x, y)`` batches of the training loader without augmentation,
    shuffled by ``seed`` (default ``cfg.seed + 1``): the inputs of BatchNorm recalibration, and
    the batches :func:`calibration_images` cuts its images from."""
    loader = train_loader(cfg, data, device, seed=cfg.seed + 1 if seed is None else seed)
    loader.augment = False
    return list(itertools.islice(loader, count))


CALIBRATION_SEED = 12345  # one fixed draw of calibration images for every run and level


def calibration_images(cfg, data, device, count: int) -> list:
    """``count`` training images (a fixed seeded draw, no augmentation, labels dropped): the
    calibration set of ``criterion="wanda"`` and of reconstruction."""
    # every batch but an epoch's last holds cfg.batch_size images, so this many cover ``count``
    # (or the whole training set, if it is smaller)
    batches = math.ceil(count / cfg.batch_size)
    out, have = [], 0
    for x, _ in calibration_batches(cfg, data, device, batches, seed=CALIBRATION_SEED):
        out.append(x[: count - have])
        have += len(out[-1])
    return out


def sweep_model(model, cfg, data, device, sweep: SweepConfig) -> list[dict[str, Any]]:
    """Rows of :func:`sfwprune.prune.sparsity_sweep` for ``model`` on ``data``'s test split."""
    evaluator = test_loader(cfg, data, device)
    bn_batches = (
        calibration_batches(cfg, data, device, sweep.bn_batches) if sweep.bn_recalibrate else None
    )
    calibration = None
    if needs_calibration(sweep.criterion, sweep.reconstruct):
        calibration = calibration_images(cfg, data, device, sweep.calibration_size)
    generator = torch.Generator().manual_seed(sweep.seed)
    structured: dict[str, Any] = {}
    if sweep.structure is not None:
        structured = {"structure": sweep.structure, "norm": sweep.norm,
                      "indivisible": sweep.indivisible}  # fmt: skip
    return sparsity_sweep(
        model, lambda m: evaluate(m, evaluator, precision=cfg.precision), list(sweep.sparsities),
        bn_batches=bn_batches, scope=sweep.scope, include=sweep.include,
        criterion=sweep.criterion, generator=generator, calibration=calibration,
        reconstruct=sweep.reconstruct, gradual=sweep.gradual, gradual_step=sweep.gradual_step,
        relu_aware=sweep.relu_aware, **structured,
    )  # fmt: skip


def sweep_file_name(tag: str | None) -> str:
    """``sweep`` or ``sweep-TAG``; a tag is a plain name, so the file stays in the run folder."""
    if tag is None or tag == "":
        return "sweep"
    if not isinstance(tag, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", tag):
        raise ValueError(
            f"Invalid tag: {tag!r} (expected letters, digits, '.', '_' or '-', not starting with "
            "'.' or '-', no '/')"
        )
    return f"sweep-{tag}"


def sweep_run(
    run_dir: str | Path,
    sweep: SweepConfig,
    *,
    tag: str | None = None,
    loaded: TrainedRun | tuple | None = None,
    allow_partial: bool = False,
) -> dict[str, Any]:
    """Sweep the run in ``run_dir``; write ``sweep[-TAG].json`` and ``.csv``; return the JSON.

    ``loaded`` is ``load_run(run_dir)`` (or ``load_trained``'s tuple) when the caller has it
    already. Only a finished run is swept unless ``allow_partial`` (:func:`load_run`); the
    result records the checkpoint's epoch and run id under ``"run"``."""
    sweep.validate()
    name = sweep_file_name(tag)
    start = time.perf_counter()
    if loaded is None:
        loaded = load_run(run_dir, allow_partial=allow_partial)
    if isinstance(loaded, TrainedRun):
        cfg, model, data, run = loaded.config, loaded.model, loaded.data, loaded.record()
    else:  # a load_trained tuple: a finished run, loaded just now
        cfg, model, data = loaded
        summary = Path(run_dir) / "summary.json"
        epochs = json.loads(summary.read_text())["epochs_done"] if summary.is_file() else None
        run = {"run_id": read_run_file(run_dir).get("run_id"), "epoch": epochs,
               "finished": epochs is not None}  # fmt: skip
    device = next(model.parameters()).device
    rows = sweep_model(model, cfg, data, device, sweep)
    result = {
        "config": {"train": cfg.to_dict(), "sweep": asdict(sweep)},
        "provenance": provenance(device, wall_seconds=time.perf_counter() - start),
        "run": run,
        "rows": rows,
    }
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
    """The sweep as a table; sparsities as percentages that never round to 100% (or 0%)."""
    from ..prune.report import format_sparsity

    timed = any("seconds" in r for r in rows)
    head = f"{'sparsity':>11} {'measured':>11} {'accuracy':>9} {'loss':>8}"
    lines = [head + (f" {'seconds':>8}" if timed else "")]
    for r in rows:
        line = (
            f"{format_sparsity(r['sparsity']):>11} {format_sparsity(r['measured_sparsity']):>11} "
            f"{r['accuracy']:>8.2f}% {r['loss']:>8.4f}"
        )
        lines.append(line + (f" {r.get('seconds', float('nan')):>8.2f}" if timed else ""))
    return "\n".join(lines)
