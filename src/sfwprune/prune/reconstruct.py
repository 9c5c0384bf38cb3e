"""Layer-wise reconstruction after pruning: re-solve kept weights to match dense outputs (§8).

For every Linear / Conv2d layer in forward order, with ``X`` its input in the pruned network
(earlier layers already reconstructed, a ones column for the bias), ``Y`` the dense layer's output
on the dense network's own input, and ``S_r`` the kept entries of output unit ``r``:

    w_r = argmin_{w: w_j = 0, j ∉ S_r}  ||Y_r − X w||² + λ||w||²,   λ = ridge · mean diag(XᵀX)

A conv is a Linear over unfolded patches, solved per group. Only ``H = XᵀX`` and ``B = XᵀY`` are
kept (float64, accumulated over calibration chunks and row blocks): memory ``O(fan_in²)`` per
layer. Exact per-unit solves or SparseGPT's OBS update (:mod:`.solvers`), chosen per layer by cost.
Conv outputs are matched before BatchNorm; BatchNorm statistics are re-estimated at the end.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .bn import batchnorm_modules, recalibrate_bn
from .calibration import (
    as_rows,
    calibration_chunks,
    capture,
    check_forward,
    forward_order,
    groups_of,
    model_device,
    out_rows,
    weight_matrix,
)
from .solvers import SOLVERS, quadratic_error, solve

Tensor = torch.Tensor

# float64 elements of one block of unfolded rows (32 MiB): bounds the memory of H's accumulation
ROW_BLOCK_ELEMENTS = 2**22


def check_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Masks as ``{parameter name: bool tensor}`` matching the model's parameters, else ValueError."""
    if not isinstance(masks, Mapping):
        raise ValueError(f"Invalid masks: {type(masks).__name__} (expected a dict name -> mask)")
    params = dict(model.named_parameters())
    out = {}
    for name, keep in masks.items():
        if name not in params:
            raise ValueError(f"Invalid masks: {name!r} is not a parameter of the model")
        if not isinstance(keep, Tensor) or keep.dtype != torch.bool:
            raise ValueError(f"Invalid masks: {name!r} is not a bool tensor")
        if keep.shape != params[name].shape:
            raise ValueError(
                f"Invalid masks: {name!r} has shape {tuple(keep.shape)} "
                f"(expected {tuple(params[name].shape)})"
            )
        out[name] = keep.to(params[name].device)
    return out


def check_calibration(
    model: nn.Module, calibration: Iterable[Any] | None, chunk: int = 256
) -> list[Tensor]:
    """The calibration inputs as chunks on the model's device, checked by one forward (eval mode).

    Raises a one-line ValueError for missing, empty, non-finite or wrongly shaped inputs.
    """
    chunks = calibration_chunks(calibration, chunk, model_device(model))
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        check_forward(model, chunks[0])
    finally:
        for m, training in flags:
            m.training = training
    return chunks


def _check_dense(model: nn.Module, dense: nn.Module) -> None:
    if not isinstance(dense, nn.Module):
        raise ValueError(f"Invalid dense: {type(dense).__name__} (expected an nn.Module)")
    shapes = [(n, p.shape) for n, p in model.named_parameters()]
    if shapes != [(n, p.shape) for n, p in dense.named_parameters()]:
        raise ValueError("Invalid dense: its parameters differ in names or shapes from the model's")


def _layer_keep(name: str, module: nn.Module, masks: Mapping[str, Tensor]) -> Tensor:
    """``(groups, out_per_group, d)`` keep mask, the bias (if any) as the last column."""
    w = weight_matrix(module)
    prefix = f"{name}." if name else ""
    keep = masks.get(f"{prefix}weight")
    keep = torch.ones(w.shape, dtype=torch.bool, device=w.device) if keep is None else keep
    keep = keep.reshape(w.shape)
    if module.bias is None:
        return keep
    kb = masks.get(f"{prefix}bias")
    kb = torch.ones(module.bias.shape, dtype=torch.bool, device=w.device) if kb is None else kb
    return torch.cat([keep, kb.reshape(w.shape[0], w.shape[1], 1)], dim=2)


def _statistics(
    model: nn.Module, dense: nn.Module, name: str, chunks: list[Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """``H (g, d, d)``, ``B (g, d, out_g)``, ``yy (g, out_g)`` for layer ``name``, in float64."""
    mp, md = model.get_submodule(name), dense.get_submodule(name)
    bias = mp.bias is not None
    H = B = yy = None
    for x in chunks:
        _, y = capture(dense, md, x, output=True)
        xp, _ = capture(model, mp, x, output=False)
        per_sample = max(1, as_rows(mp, xp[:1]).shape[1] * (as_rows(mp, xp[:1]).shape[2] + 1))
        step = max(1, ROW_BLOCK_ELEMENTS // per_sample)
        for xs, ys in zip(torch.split(xp, step), torch.split(y, step), strict=True):
            X = as_rows(mp, xs).to(torch.float64)  # (g, rows, f)
            if bias:
                X = torch.cat([X, X.new_ones(X.shape[0], X.shape[1], 1)], dim=2)
            Y = out_rows(mp, ys).to(torch.float64)  # (g, rows, out_g)
            Xt = X.transpose(1, 2)
            if H is None:
                H, B, yy = Xt @ X, Xt @ Y, Y.pow(2).sum(1)
            else:
                H.baddbmm_(Xt, X)
                B.baddbmm_(Xt, Y)
                yy += Y.pow(2).sum(1)
    assert H is not None and B is not None and yy is not None
    return H, B, yy


@torch.no_grad()
def _reconstruct_layer(
    model: nn.Module,
    dense: nn.Module,
    name: str,
    masks: Mapping[str, Tensor],
    chunks: list[Tensor],
    ridge: float,
    solver: str,
) -> dict[str, Any]:
    module = model.get_submodule(name)
    H, B, yy = _statistics(model, dense, name, chunks)
    keep = _layer_keep(name, module, masks)
    w = weight_matrix(module)  # (g, out_g, f), a view of the parameter
    before = after = 0.0
    used = set()
    for g in range(groups_of(module)):
        current = w[g].to(torch.float64)
        if module.bias is not None:
            bg = module.bias.view(w.shape[0], -1)[g].to(torch.float64)
            current = torch.cat([current, bg.unsqueeze(1)], dim=1)
        before += quadratic_error(H[g], B[g], yy[g], current * keep[g])
        W, how = solve(H[g], B[g], keep[g], ridge, solver)
        after += quadratic_error(H[g], B[g], yy[g], W)
        used.add(how)
        w[g].copy_(W[:, : w.shape[2]])
        if module.bias is not None:
            module.bias.view(w.shape[0], -1)[g].copy_(W[:, -1])
    total = float(yy.sum())
    scale = 1 / total if total > 0 else 1.0
    return {
        "solver": "+".join(sorted(used)),
        "error_before": before * scale,
        "error_after": after * scale,
    }


def reconstruct_(
    model: nn.Module,
    masks: Mapping[str, Tensor],
    calibration: Iterable[Any],
    *,
    dense: nn.Module | None = None,
    ridge: float = 1e-3,
    solver: str = "auto",
    chunk: int = 256,
    recalibrate: bool = True,
) -> dict[str, dict[str, Any]]:
    """Apply ``masks`` and re-solve every Linear/Conv2d layer's kept weights and bias in place.

    Layers are taken in the order a forward calls them; each is fitted to the dense network's
    output of that layer from the pruned network's own input (see the module docstring).

    Args:
        model: the network; its masked weights are zeroed and the kept ones (and biases) re-solved.
        masks: ``{parameter name: bool keep mask}``, e.g. what :func:`prune_` returns; a layer
            without a mask is re-solved with every entry kept. Conv1d/3d/transposed convs are
            masked only.
        calibration: an iterable of input tensors or ``(inputs, targets)`` pairs (labels unused).
        dense: a network of the same architecture with the dense weights; default ``None`` takes
            ``model`` itself, as it is before the masks are applied, as the dense network.
        ridge: ``λ = ridge · mean diag(XᵀX)`` per layer/group; must be > 0.
        solver: ``"exact"`` (per-unit solves), ``"obs"`` (SparseGPT's update) or ``"auto"`` (the
            cheaper in flops per layer; exact below ``solvers.EXACT_LIMIT`` flops).
        chunk: samples per forward pass.
        recalibrate: re-estimate BatchNorm statistics on the calibration inputs at the end.

    Returns:
        ``{layer name: {"solver", "error_before", "error_after"}}`` in forward order: the layer's
        output error ``||Y_dense − X w||² / ||Y_dense||²`` on the calibration set with the masked
        weights and with the re-solved ones.

    Raises:
        ValueError: bad arguments, or empty / NaN / wrongly shaped calibration inputs; the model is
        unchanged then.

    Example:
        >>> masks = prune_(copy.deepcopy(net), 0.9)
        >>> info = reconstruct_(net, masks, [x_train[:2048]])
    """
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge > 0:
        raise ValueError(f"Invalid ridge: {ridge!r} (expected a number > 0)")
    if solver not in SOLVERS:
        raise ValueError(f"Invalid solver: {solver!r} (expected one of {', '.join(SOLVERS)})")
    masks = check_masks(model, masks)
    if dense is not None:
        _check_dense(model, dense)
    chunks = calibration_chunks(calibration, chunk, model_device(model))
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        check_forward(model, chunks[0])
        if dense is None:
            dense = copy.deepcopy(model)
        dense_flags = [(m, m.training) for m in dense.modules()]
        dense.eval()
        order = forward_order(dense, chunks[0])
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        ok = False
        try:
            with torch.no_grad():
                params = dict(model.named_parameters())
                for name, keep in masks.items():
                    params[name].masked_fill_(~keep, 0)
            info = {}
            for name, _ in order:
                info[name] = _reconstruct_layer(
                    model, dense, name, masks, chunks, float(ridge), solver
                )
            if recalibrate and batchnorm_modules(model):
                recalibrate_bn(model, chunks)
            ok = True
        finally:
            if not ok:
                model.load_state_dict(saved)
            for m, training in dense_flags:
                m.training = training
    finally:
        for m, training in flags:
            m.training = training
    return info
