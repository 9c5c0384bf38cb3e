"""One-shot pruning masks: zero the ``s``-fraction of least important entries (docs/algorithm.md §4).

For a ranked set of ``N`` entries with scores ``a`` (``|w|``, Wanda's ``|w|·||X_j||`` or uniform
noise), the pruned entries are the ``round(s·N)`` first ones in the order of ``(a_i, i)``: the
smallest scores, ties broken by flat index (the order of a stable sort). ``scope="global"`` ranks
all selected tensors as one set (one threshold for the whole model), ``scope="layer"`` ranks each
tensor on its own.
"""

from __future__ import annotations

import copy
import functools
import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter

from ..params import weight_parameters
from .calibration import calibration_chunks, check_forward, feature_sq_sums, model_device
from .reconstruct import check_calibration, check_relu_aware, reconstruct_

Tensor = torch.Tensor

SCOPES = ("global", "layer")
CRITERIA = ("magnitude", "random", "wanda")
INCLUDES = ("weights", "all")


def needs_calibration(criterion: str, reconstruct: bool) -> bool:
    """Whether pruning with these options reads calibration inputs: Wanda's feature norms
    (``criterion="wanda"``) or layer-wise reconstruction (``reconstruct=True``).

    Example:
        >>> needs_calibration("magnitude", reconstruct=False), needs_calibration("wanda", False)
        (False, True)
    """
    return reconstruct or criterion == "wanda"


def check_sparsity(sparsity: object, name: str = "sparsity") -> float:
    """``sparsity`` as a float in ``[0, 1]`` (the fraction of zeros), else ``ValueError``."""
    if (
        isinstance(sparsity, bool)
        or not isinstance(sparsity, numbers.Real)
        or math.isnan(sparsity)
        or not 0.0 <= sparsity <= 1.0
    ):
        raise ValueError(
            f"Invalid {name}: {sparsity!r} (expected a number in [0, 1], the fraction of zeros)"
        )
    return float(sparsity)


def _check_choice(name: str, value: object, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"Invalid {name}: {value!r} (expected one of {', '.join(allowed)})")
    return value


def check_options(
    scope: str, criterion: str, include: str, generator: torch.Generator | None
) -> None:
    """Validate the options shared by :func:`prune_` and the sweep."""
    _check_choice("scope", scope, SCOPES)
    _check_choice("criterion", criterion, CRITERIA)
    _check_choice("include", include, INCLUDES)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"Invalid generator: {generator!r} (expected a torch.Generator or None)")


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Zero the pruned entries (``mask == False``) of the named parameters, in place; a name
    that is not a parameter of ``model`` raises."""
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        if name not in params:
            raise ValueError(f"Invalid mask: no parameter {name!r} in the model")
        params[name].masked_fill_(~keep.to(params[name].device), 0)


def prunable_parameters(model: nn.Module, include: str = "weights") -> list[tuple[str, Tensor]]:
    """The ``(name, parameter)`` pairs that pruning ranks, in ``named_parameters`` order.

    ``include="weights"``: :func:`sfwprune.params.weight_parameters`, every parameter of dim
    >= 2 (Linear, conv, Embedding, attention projections), the set ``constraint_groups``
    constrains; ``include="all"``: every parameter (shared parameters once, under their first
    name).
    """
    _check_choice("include", include, INCLUDES)
    named = weight_parameters(model) if include == "weights" else list(model.named_parameters())
    for name, p in named:
        if isinstance(p, UninitializedParameter):
            raise ValueError(f"Invalid model: parameter {name!r} is uninitialized (run a forward)")
    if not named:
        raise ValueError(
            f"Invalid model: no parameters to prune (include={include!r} selects none)"
        )
    return named


def ranked_sets(scope: str, count: int) -> list[list[int]]:
    """Indices of the tensors ranked together: all of them (global) or one by one (layer)."""
    return [list(range(count))] if scope == "global" else [[i] for i in range(count)]


def wanda_norms(model: nn.Module, chunks: Iterable[Tensor]) -> dict[str, Tensor]:
    """``{weight name: rms(X_j)}`` shaped like the weight, for every Linear/Conv2d layer.

    ``rms(X_j) = ||X_j||₂ / √n``: the j-th input feature of the layer (conv: input channel ×
    kernel position of the unfolded patches) over its ``n`` rows (samples × output positions).
    """
    names = {m: n for n, m in model.named_modules()}
    out = {}
    for module, sq, count in feature_sq_sums(model, chunks):
        w = module.weight
        g = sq.shape[0]
        rms = (sq / max(count, 1)).sqrt().to(w.device)  # (groups, fan_in per group)
        rms = rms.unsqueeze(1).expand(g, w.shape[0] // g, sq.shape[1]).reshape(w.shape)
        out[f"{names[module]}.weight" if names[module] else "weight"] = rms
    return out


def calibration_norms(
    model: nn.Module, criterion: str, calibration: Iterable[Any] | None
) -> dict[str, Tensor] | None:
    """Wanda's feature norms on the model as it is (``None`` for the other criteria)."""
    if criterion != "wanda":
        return None
    if calibration is None:
        raise ValueError("Invalid calibration: None (criterion 'wanda' needs calibration inputs)")
    chunks = calibration_chunks(calibration, 256, model_device(model))
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        check_forward(model, chunks[0])
        return wanda_norms(model, chunks)
    finally:
        for m, training in flags:
            m.training = training


def flat_scores(
    named: Sequence[tuple[str, Tensor]],
    criterion: str,
    generator: torch.Generator | None,
    norms: dict[str, Tensor] | None = None,
) -> list[Tensor]:
    """One flat score tensor per parameter; a low score means pruned first.

    Random scores are drawn in parameter order on the generator's device (CPU by default), so a
    seeded generator gives the same masks whatever device the model is on.

    Wanda (``norms`` from :func:`calibration_norms`): ``|w_ij| · ||X_j||₂ / √n``. Within a layer
    this is Wanda's score; the ``1/√n`` (n = rows: samples × output positions) makes it the RMS of
    the entry's contribution ``w_ij x_j`` to its output, comparable across layers, so the global
    ranking still decides how many entries each layer keeps. A parameter without input features
    (a bias, whose input is the constant 1, or any non Linear/Conv2d weight) scores ``|w|``.
    """
    scores = []
    for name, p in named:
        if criterion == "wanda":
            s = p.detach().abs().to(torch.float64)
            if norms is not None and name in norms:
                s = s * norms[name]
            s = s.reshape(-1)
            if torch.isnan(s).any():
                raise ValueError(f"Invalid weights: {name!r} contains NaN (cannot rank)")
        elif criterion == "magnitude":
            s = p.detach().reshape(-1).abs()
            if s.dtype in (torch.float16, torch.bfloat16):
                s = s.float()  # exact, and every selection/sort kernel takes float32
            if torch.isnan(s).any():
                raise ValueError(f"Invalid weights: {name!r} contains NaN (cannot rank by |w|)")
        else:
            device = generator.device if generator is not None else torch.device("cpu")
            s = torch.rand(p.numel(), generator=generator, device=device, dtype=torch.float64)
        scores.append(s.to(p.device))
    return scores


def concat(scores: Sequence[Tensor]) -> Tensor:
    """Concatenate flat scores of one ranked set in a dtype exact for all of them."""
    if len(scores) == 1:
        return scores[0]
    dtype = functools.reduce(torch.promote_types, (s.dtype for s in scores))
    device = scores[0].device
    return torch.cat([s.to(device=device, dtype=dtype) for s in scores])


def prune_count(sparsity: float, n: int) -> int:
    """How many of ``n`` entries a level prunes: ``round(s·n)`` (as ``torch.nn.utils.prune``)."""
    return int(round(sparsity * n))


def lowest(score: Tensor, n: int) -> Tensor:
    """Bool mask of the ``n`` first entries in ``(score, index)`` order, without a full sort.

    Equal to ``sort(score, stable=True).indices[:n]`` as a set: the ``n``-th smallest value ``t``
    is found by selection, every entry below ``t`` is taken, then the lowest-index entries equal
    to ``t`` fill the count.
    """
    out = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    if n <= 0:
        return out
    if n >= score.numel():
        return out.fill_(True)
    t = torch.kthvalue(score, n).values
    torch.lt(score, t, out=out)
    need = n - int(out.sum())
    out[torch.nonzero(score == t).squeeze(1)[:need]] = True
    return out


def split_masks(flat: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat mask of a ranked set into views shaped like its parameters."""
    parts = torch.split(flat, [p.numel() for p in params])
    return [m.view(p.shape).to(p.device) for m, p in zip(parts, params, strict=True)]


@torch.no_grad()
def zero_lowest_(
    params: Sequence[Tensor], scores: Sequence[Tensor], sparsity: float, scope: str
) -> list[Tensor]:
    """Zero in place, per ranked set of ``scope``, the ``round(s·N)`` entries first in
    ``(score, flat index)`` order; return one bool keep mask per tensor, shaped like it.

    ``scores[i]`` is the flat score of ``params[i]`` (:func:`flat_scores`, or any other).
    """
    keeps: list[Tensor] = [None] * len(params)  # type: ignore[list-item]
    for members in ranked_sets(scope, len(params)):
        score = concat([scores[i] for i in members])
        pruned = lowest(score, prune_count(sparsity, score.numel()))
        for i, keep in zip(
            members, split_masks(~pruned, [params[i] for i in members]), strict=True
        ):
            params[i].masked_fill_(~keep, 0)
            keeps[i] = keep
    return keeps


@torch.no_grad()
def prune_(
    model: nn.Module,
    sparsity: float | None = None,
    *,
    structure: str | None = None,
    scope: str = "global",
    criterion: str = "magnitude",
    include: str = "weights",
    generator: torch.Generator | None = None,
    calibration: Iterable[Any] | None = None,
    reconstruct: bool = False,
    relu_aware: bool = False,
    norm: int = 2,
    indivisible: str = "error",
) -> dict[str, Tensor]:
    """Zero the ``sparsity``-fraction of least important entries in place; return keep masks.

    Unstructured (``structure=None``): per ranked set of ``N`` entries, the ``round(s·N)``
    entries first in ``(score, flat index)`` order are zeroed, where ``score = |w|``
    (magnitude), ``|w_ij|·||X_j||₂/√n`` (wanda, see :func:`flat_scores`) or ``U(0, 1)`` noise
    (random). Entries that were already zero count as zeros, so the measured sparsity is ``s``
    within one element per set (or higher if more than ``s·N`` entries were zero before).

    Structured (:mod:`.structured`): ``structure="channel"`` removes the ``sparsity``-fraction
    of output units (Linear rows, conv filters) of smallest weight-row norm, with their bias
    and BatchNorm entries (never the output layer, never a ResNet residual space; at least one
    unit per layer), so :func:`~sfwprune.prune.shrink.shrink` can drop them. ``structure="N:M"``
    (e.g. ``"2:4"``) keeps the N largest ``|w|`` of every M consecutive entries of every
    Linear/conv weight row; its sparsity is ``1 - N/M`` by definition, so ``sparsity`` is
    ``None`` or that value.

    Args:
        model: the network, changed in place.
        sparsity: target fraction of zeros in ``[0, 1]`` (channel: of units, in ``[0, 1)``);
            ``None`` only for N:M.
        structure: ``None`` (unstructured), ``"channel"`` or ``"N:M"``.
        scope: ``"global"`` (one ranking over all selected tensors / units, the paper's choice)
            or ``"layer"`` (each tensor pruned to the same sparsity). Unused for N:M.
        criterion: ``"magnitude"`` (smallest ``|w|`` first), ``"wanda"`` (needs
            ``calibration``) or ``"random"``; structures take ``"magnitude"`` only.
        include: ``"weights"`` (conv and linear weights) or ``"all"`` (every parameter);
            structures take ``"weights"``.
        generator: random source for ``criterion="random"`` (default: the global one).
        calibration: input batches (tensors or ``(inputs, targets)`` pairs, labels unused) for
            ``criterion="wanda"`` and ``reconstruct=True``.
        reconstruct: after masking, re-solve the kept weights and biases layer by layer to match
            the dense network's outputs on ``calibration`` (:func:`reconstruct_`, default options;
            BatchNorm statistics re-estimated). The masks stay fixed, so a removed unit's weights,
            bias and BatchNorm scale/shift stay exactly 0. Calibration errors raise before
            anything changes.
        relu_aware: with ``reconstruct``: layers that feed a ReLU match what it passes on
            (:func:`reconstruct_`'s ``relu_aware``).
        norm: channel only: rank units by the L2 (``2``) or L1 (``1``, Li et al. 2017) norm.
        indivisible: N:M only: ``"error"`` when a row length is not a multiple of M, or
            ``"skip"`` (such layers stay dense, without a mask).

    Returns:
        ``{parameter name: bool tensor}``, ``True`` where the entry is kept.

    Example:
        >>> net = nn.Linear(4, 1, bias=False)
        >>> _ = net.weight.data.copy_(torch.tensor([[0.3, -0.1, 2.0, 0.2]]))
        >>> prune_(net, 0.5)["weight"]
        tensor([[ True, False,  True, False]])
        >>> prune_(net, structure="1:2")["weight"]
        tensor([[ True, False,  True, False]])
    """
    check_options(scope, criterion, include, generator)
    if structure is None:
        if norm != 2 or indivisible != "error":
            raise ValueError(
                f"Invalid norm/indivisible: {norm!r}/{indivisible!r} (structured pruning only; "
                "pass structure='channel' or 'N:M')"
            )
        sparsity = check_sparsity(sparsity)
        named = prunable_parameters(model, include)
    else:
        # .structured imports this module (check_sparsity), hence the import here
        from .structured import structure_masks

        masks = structure_masks(
            model, sparsity, structure, scope=scope, criterion=criterion, include=include,
            norm=norm, indivisible=indivisible,
        )  # fmt: skip
    check_relu_aware(relu_aware, reconstruct)
    if reconstruct:
        calibration = check_calibration(model, calibration)
    dense = copy.deepcopy(model) if reconstruct else None
    if structure is not None:
        apply_masks_(model, masks)
    else:
        scores = flat_scores(
            named, criterion, generator, calibration_norms(model, criterion, calibration)
        )
        keeps = zero_lowest_([p for _, p in named], scores, sparsity, scope)
        masks = {name: keep for (name, _), keep in zip(named, keeps, strict=True)}
    if dense is not None:
        reconstruct_(model, masks, calibration, dense=dense, errors=False, relu_aware=relu_aware)
    return masks
