"""One-shot pruning of a trained run, exported compactly (``sfwprune prune``), and the figures
of several runs (``sfwprune plot``): the application logic behind those two commands.

Structured export (``prune_run(..., structure=...)``, ``sfwprune prune --structure``) writes a
dict that ``torch.load(path, weights_only=True)`` reads, and :func:`load_small` rebuilds::

    {"format": "sfwprune.structured/1", "structure": "channel" | "N:M", "model": name,
     "input_shape": [C, H, W], "num_classes": int, "dtype": "float32" | ...,
     "spec": {layer: [in, out] | [features]},      # channel: the smaller widths (shrink_spec)
     "state_dict": {...},                            # channel: the small model's; N:M: all but
     "semi_structured": {weight name: (out, fan_in)},  # N:M: 2:4 matrices for
     "weight_shapes": {weight name: shape}}          #   torch.sparse.to_sparse_semi_structured

Rebuilding by hand: ``resize_(build_model(model, input_shape=..., num_classes=...), spec)``, then
``load_state_dict(state_dict)`` (channel); N:M: reshape each ``semi_structured`` matrix to its
``weight_shapes`` entry and load it with ``state_dict``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import _io
from .._checks import check_bool, check_choice, check_int
from ..prune.masks import CRITERIA, INCLUDES, SCOPES, check_sparsity
from ..prune.reconstruct import check_relu_aware
from ..prune.sweep import GRADUAL_STEP, check_gradual

DTYPES = ("float32", "float16", "bfloat16")
STRUCTURED_FORMAT = "sfwprune.structured/1"


@dataclass
class PruneResult:
    sparsity: float
    accuracy: float
    report: str  # the per-layer sparsity table
    out: Path
    epoch: int  # the checkpoint's epoch that was pruned
    dtype: str  # the accuracy is of the weights as stored at this dtype
    structure: str | None = None
    # structured only: CPU latency of the dense and exported model (ms, batch 1) and its speed-up
    latency: dict[str, float] = field(default_factory=dict)
    params: tuple[int, int] | None = None  # (dense, exported) parameter counts


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
    gradual: bool = False,
    gradual_step: float = GRADUAL_STEP,
    relu_aware: bool = False,
    allow_partial: bool = False,
    structure: str | None = None,
    norm: int = 2,
    indivisible: str = "error",
) -> PruneResult:
    """Prune the run in ``run_dir`` to ``sparsity`` (global magnitude by default), write the
    compact file ``out`` (:func:`sfwprune.prune.save_pruned`) and evaluate on the test split
    what that file holds (the weights at ``dtype``). ``out`` may not be one of a run's own files
    (:func:`~sfwprune.experiments.runner.check_output_file`); a run still training or not
    finished is refused unless ``allow_partial`` (:func:`~sfwprune.experiments.runner.load_run`).
    ``reconstruct`` re-solves the kept weights on ``calibration_size`` training images (also the
    inputs of ``criterion="wanda"``), before the file is written; with ``gradual`` through the
    gradual schedule (:func:`sfwprune.prune.gradual_prune_`, steps of at most ``gradual_step``);
    ``relu_aware``: layers that feed a ReLU match what it passes on.

    ``structure="channel"`` (``sparsity``: fraction of output units; ``scope``; ``norm`` 1 or 2)
    writes the physically smaller model, ``"N:M"`` (e.g. ``"2:4"``; ``indivisible``) writes 2:4
    matrices for ``torch.sparse.to_sparse_semi_structured`` plus the rest of the state dict (the
    module docstring gives the format); the accuracy is then that of :func:`load_small` of the file,
    and ``latency`` a quick CPU measurement (batch 1, this process's threads) of dense vs file.
    """
    import torch

    from ..prune import (
        format_report,
        gradual_prune_,
        load_pruned,
        needs_calibration,
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
    check_gradual(gradual, reconstruct, structure, gradual_step)
    check_relu_aware(relu_aware, reconstruct)
    check_int("calibration_size", calibration_size, 1)
    check_choice("dtype", dtype, DTYPES)
    check_bool("bn_recalibrate", bn_recalibrate)
    nm = _check_structure(structure, sparsity, norm, indivisible)
    out = check_output_file(out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"Invalid --out: {str(out)!r} (folder does not exist)")
    run = load_run(run_dir, allow_partial=allow_partial)
    cfg, model, data = run.config, run.model, run.data
    device = next(model.parameters()).device
    calibration = None
    if needs_calibration(criterion, reconstruct):
        calibration = calibration_images(cfg, data, device, calibration_size)
    if structure is not None:
        dense = copy.deepcopy(model).eval()
        prune_(model, None if nm else sparsity, structure=structure, scope=scope,
               include=include, criterion=criterion, calibration=calibration,
               reconstruct=reconstruct, relu_aware=relu_aware, norm=norm,
               indivisible=indivisible)  # fmt: skip
        if bn_recalibrate:
            recalibrate_bn(model, calibration_batches(cfg, data, device, SweepConfig.bn_batches))
        payload = structured_payload(model, structure, cfg.model, data, getattr(torch, dtype))
        small = _rebuild(payload, device)  # what the file holds, before anything is written
        _io.atomic_torch_save(payload, out)
        test = evaluate(small, test_loader(cfg, data, device), precision=cfg.precision)
        from .structured import measure_latency

        lat = measure_latency({"dense": dense.cpu(), "small": small.cpu()}, data.input_shape,
                              batch=1, rounds=200)  # fmt: skip
        latency = {"dense_ms": lat["dense"]["median_ms"], "small_ms": lat["small"]["median_ms"],
                   "speedup": lat["small"]["speedup"], "threads": torch.get_num_threads()}  # fmt: skip
        count = (_param_count(dense), _param_count(small))
        return PruneResult(
            1 - nm[0] / nm[1] if nm else sparsity, test["accuracy"],
            _structured_report(payload, dense), out, run.epoch, dtype, structure, latency, count,
        )  # fmt: skip
    if gradual:
        assert calibration is not None
        gradual_prune_(model, sparsity, calibration, gradual_step=gradual_step, scope=scope,
                       criterion=criterion, include=include, relu_aware=relu_aware)  # fmt: skip
    else:
        prune_(model, sparsity, scope=scope, include=include, criterion=criterion,
               calibration=calibration, reconstruct=reconstruct,
               relu_aware=relu_aware)  # fmt: skip
    if bn_recalibrate:
        recalibrate_bn(model, calibration_batches(cfg, data, device, SweepConfig.bn_batches))
    save_pruned(model, out, dtype=getattr(torch, dtype))
    load_pruned(out, model)  # evaluate what the file holds: values rounded to dtype
    test = evaluate(model, test_loader(cfg, data, device), precision=cfg.precision)
    report = format_report(sparsity_report(model, input_shape=data.input_shape))
    return PruneResult(sparsity, test["accuracy"], report, out, run.epoch, dtype)


def _check_structure(
    structure: str | None, sparsity: float, norm: int, indivisible: str
) -> tuple[int, int] | None:
    """Refuse bad structured options before any work (``None`` for channel / unstructured)."""
    if structure is None:
        if norm != 2 or indivisible != "error":
            raise ValueError(
                f"Invalid norm/indivisible: {norm!r}/{indivisible!r} (structured pruning only; "
                "pass --structure channel or N:M)"
            )
        return None
    from ..prune.structured import parse_structure

    nm = parse_structure(structure)
    if nm is None:
        if sparsity >= 1.0:
            raise ValueError(
                f"Invalid sparsity: {sparsity:g} (channel pruning keeps at least one unit per "
                "layer; expected a number in [0, 1))"
            )
        if norm not in (1, 2) or isinstance(norm, bool):
            raise ValueError(f"Invalid norm: {norm!r} (expected 1 or 2)")
    else:
        if norm != 2:
            raise ValueError(f"Invalid norm: {norm!r} (norm is for --structure channel only)")
        if abs(sparsity - (1 - nm[0] / nm[1])) > 1e-9:
            raise ValueError(
                f"Invalid sparsity: {sparsity:g} (structure {structure} means {1 - nm[0] / nm[1]:g})"
            )
    if indivisible not in ("error", "skip"):
        raise ValueError(f"Invalid indivisible: {indivisible!r} (expected 'error' or 'skip')")
    return nm


def _param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _cast(state: dict[str, Any], dtype) -> dict[str, Any]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def structured_payload(model, structure: str, name: str, data, dtype) -> dict[str, Any]:
    """The file :func:`prune_run` writes for a structure-pruned ``model`` (module docstring)."""
    from ..prune import semi_structured_state, shrink, shrink_spec
    from ..prune.structured import parse_structure

    head = {"format": STRUCTURED_FORMAT, "structure": structure, "model": name,
            "input_shape": [int(d) for d in data.input_shape],
            "num_classes": int(data.num_classes),
            "dtype": str(dtype).removeprefix("torch.")}  # fmt: skip
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if parse_structure(structure) is None:
        small = shrink(model.eval())
        state = {k: v.detach().cpu() for k, v in small.state_dict().items()}
        return {**head, "spec": shrink_spec(small), "state_dict": _cast(state, dtype)}
    semi = {}
    if parse_structure(structure) == (2, 4):  # the one pattern the GPU kernels take
        semi = {k: v.cpu() for k, v in semi_structured_state(model, dtype=dtype).items()}
    shapes = {k: list(state[k].shape) for k in semi}
    rest = _cast({k: v for k, v in state.items() if k not in semi}, dtype)
    return {**head, "state_dict": rest, "semi_structured": semi, "weight_shapes": shapes}


def _rebuild(payload: dict[str, Any], device=None):
    """The float32 model a structured payload describes (eval mode, on ``device``)."""
    from ..models import build_model
    from ..prune import resize_

    try:
        model = build_model(payload["model"], input_shape=tuple(payload["input_shape"]),
                            num_classes=int(payload["num_classes"]))  # fmt: skip
        if "spec" in payload:
            resize_(model, payload["spec"])
            state = dict(payload["state_dict"])
        else:
            state = dict(payload["state_dict"])
            for k, matrix in payload["semi_structured"].items():
                state[k] = matrix.reshape(payload["weight_shapes"][k])
        model.load_state_dict(state)  # copies (and casts) into the float32 parameters
    except (KeyError, TypeError, RuntimeError) as exc:
        raise ValueError(
            f"Invalid structured file: not a {STRUCTURED_FORMAT} payload "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    return model.to(device).eval() if device is not None else model.eval()


def load_small(path: str | Path, device=None):
    """The model a ``prune --structure`` file holds, rebuilt (float32, eval mode).

    Channel files give the physically smaller model (:func:`sfwprune.prune.resize_` of a fresh
    model, then its state dict); N:M files the full-size model with its 2:4 weights. Read with
    ``torch.load(..., weights_only=True)``.

    Example:
        >>> small = load_small("small.pt")
        >>> small(torch.zeros(1, 1, 28, 28)).shape
        torch.Size([1, 10])
    """
    from .._io import safe_torch_load

    payload = safe_torch_load(path)
    if not isinstance(payload, dict) or payload.get("format") != STRUCTURED_FORMAT:
        raise ValueError(
            f"Invalid structured file: {str(path)!r} (expected a {STRUCTURED_FORMAT} file "
            "from `sfwprune prune --structure`)"
        )
    return _rebuild(payload, device)


def _structured_report(payload: dict[str, Any], dense) -> str:
    """Per layer: dense width -> exported width (channel), or which weights are 2:4 matrices."""
    from torch import nn
    from torch.nn.modules.conv import _ConvNd

    lines = []
    if "spec" in payload:
        lines.append(f"{'layer':<24} {'dense in->out':>16} {'small in->out':>16}")
        for name, mod in dense.named_modules():
            if isinstance(mod, (nn.Linear, _ConvNd)) and name in payload["spec"]:
                i, o = payload["spec"][name]
                lines.append(
                    f"{name:<24} {f'{mod.weight.shape[1]}->{mod.weight.shape[0]}':>16} "
                    f"{f'{i}->{o}':>16}"
                )
        return "\n".join(lines)
    semi = payload["semi_structured"]
    lines.append(f"{'weight':<24} {'shape':>16}  stored as")
    for name, mod in dense.named_modules():
        if isinstance(mod, (nn.Linear, _ConvNd)):
            full = f"{name}.weight"
            shape = "x".join(str(d) for d in mod.weight.shape)
            how = "2:4 matrix (to_sparse_semi_structured)" if full in semi else "dense tensor"
            lines.append(f"{full:<24} {shape:>16}  {how}")
    return "\n".join(lines)


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
