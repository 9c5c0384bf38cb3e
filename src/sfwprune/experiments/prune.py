"""One-shot pruning of a trained run, exported compactly (``sfwprune prune``), and the figures
of several runs (``sfwprune plot``): the application logic behind those two commands."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._checks import check_bool, check_choice, check_int
from ..prune.masks import CRITERIA, INCLUDES, SCOPES, check_sparsity

DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class PruneResult:
    sparsity: float
    accuracy: float
    report: str  # the per-layer sparsity table
    out: Path
    epoch: int  # the checkpoint's epoch that was pruned
    dtype: str  # the accuracy is of the weights as stored at this dtype


def prune_run(
    run_dir: str | Path,
    sparsity: float,
    out: str | Path,
    *,
    scope: str = "global",
    include: str = "weights",
    criterion: str = "magnitude",
    dtype: str = "float32",
    bn_recalibrate: bool = False,
    reconstruct: bool = False,
    calibration_size: int = 2048,
    allow_partial: bool = False,
) -> PruneResult:
    """Prune the run in ``run_dir`` to ``sparsity`` (global magnitude by default), write the
    compact file ``out`` (:func:`sfwprune.prune.save_pruned`) and evaluate on the test split
    what that file holds (the weights at ``dtype``). ``out`` may not be one of a run's own files
    (:func:`~sfwprune.experiments.runner.check_output_file`); a run still training or not
    finished is refused unless ``allow_partial`` (:func:`~sfwprune.experiments.runner.load_run`).
    ``reconstruct`` re-solves the kept weights on ``calibration_size`` training images (also the
    inputs of ``criterion="wanda"``), before the file is written.
    """
    import torch

    from ..prune import (
        format_report,
        load_pruned,
        prune_,
        recalibrate_bn,
        save_pruned,
        sparsity_report,
    )
    from ..train import evaluate
    from .runner import check_output_file, load_run, test_loader
    from .sweep import SweepConfig, calibration_batches, calibration_images

    sparsity = check_sparsity(sparsity)
    check_choice("scope", scope, SCOPES)
    check_choice("include", include, INCLUDES)
    check_choice("criterion", criterion, CRITERIA)
    check_bool("reconstruct", reconstruct)
    check_int("calibration_size", calibration_size, 1)
    check_choice("dtype", dtype, DTYPES)
    check_bool("bn_recalibrate", bn_recalibrate)
    out = check_output_file(out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"Invalid --out: {str(out)!r} (folder does not exist)")
    run = load_run(run_dir, allow_partial=allow_partial)
    cfg, model, data = run.config, run.model, run.data
    device = next(model.parameters()).device
    calibration = None
    if reconstruct or criterion == "wanda":
        calibration = calibration_images(cfg, data, device, calibration_size)
    prune_(model, sparsity, scope=scope, include=include, criterion=criterion,
           calibration=calibration, reconstruct=reconstruct)  # fmt: skip
    if bn_recalibrate:
        recalibrate_bn(model, calibration_batches(cfg, data, device, SweepConfig.bn_batches))
    save_pruned(model, out, dtype=getattr(torch, dtype))
    load_pruned(out, model)  # evaluate what the file holds: values rounded to dtype
    test = evaluate(model, test_loader(cfg, data, device), precision=cfg.precision)
    report = format_report(sparsity_report(model, input_shape=data.input_shape))
    return PruneResult(sparsity, test["accuracy"], report, out, run.epoch, dtype)


def run_labels(run_dirs: list[Path]) -> list[str]:
    """``"SFW lenet300"``-style labels; the folder name is added where two would be equal."""
    from .runner import read_config

    labels = []
    for run_dir in run_dirs:
        cfg = read_config(run_dir)
        labels.append(f"{cfg.optimizer.name.upper()} {cfg.model}")
    if len(set(labels)) < len(labels):
        labels = [f"{lab} ({Path(d).name})" for lab, d in zip(labels, run_dirs)]
    return labels


def read_sweep_rows(path: Path, run_id: str | None = None) -> list[dict[str, Any]]:
    """The ``rows`` of a sweep file; ``ValueError`` naming the file when it is not one (each
    row needs numeric ``sparsity`` and ``accuracy``), or when it was made from the weights of
    another training than ``run_id`` (a run trained again in its folder)."""
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
        rows = result["rows"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, IndexError) as exc:
        raise ValueError(
            f"Invalid sweep file: {str(path)!r} (not a sweep result: {type(exc).__name__})"
        ) from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"Invalid sweep file: {str(path)!r} (its rows are not a list of rows)")
    for i, row in enumerate(rows):
        for key in ("sparsity", "accuracy"):
            value = row.get(key)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(
                    f"Invalid sweep file: {str(path)!r} (row {i} has no numeric {key!r})"
                )
    run = result.get("run") if isinstance(result, dict) else None
    made_from = run.get("run_id") if isinstance(run, dict) else None
    if run_id and made_from and made_from != run_id:
        raise ValueError(
            f"Invalid sweep file: {str(path)!r} (made from an earlier training in this folder, "
            f"run_id {made_from!r}, not the current {run_id!r}; sweep the run again)"
        )
    return rows


def plot_runs(
    run_dirs: list[Path], out: str | Path, *, weights: bool = False, tag: str | None = None
) -> Path:
    """Accuracy vs sparsity of the runs' sweeps (or, with ``weights``, their weight histograms)."""
    from .plots import plot_accuracy_vs_sparsity, plot_weight_histograms
    from .runner import check_output_file, load_trained, read_run_file
    from .sweep import sweep_file_name

    out = check_output_file(out)
    name = sweep_file_name(tag)
    labels = run_labels(run_dirs)
    if weights:
        models = [(lab, load_trained(d, device="cpu")[1]) for lab, d in zip(labels, run_dirs)]
        return plot_weight_histograms(models, out)
    curves = []
    for lab, run_dir in zip(labels, run_dirs):
        path = Path(run_dir) / f"{name}.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"Invalid run folder: {str(run_dir)!r} (no {path.name}; run `sfwprune sweep "
                f"{run_dir}` first)"
            )
        curves.append((lab, read_sweep_rows(path, read_run_file(run_dir).get("run_id"))))
    return plot_accuracy_vs_sparsity(curves, out)
