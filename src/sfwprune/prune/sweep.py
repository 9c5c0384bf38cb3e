"""Accuracy at every sparsity from one ranking of the weights ("train once, deploy at any s").

The entries are ranked once (a stable argsort of the scores per ranked set); level ``s`` zeroes
the first ``round(s·N)`` of that order, which is the mask :func:`prune_` would give. Between
levels the ranked tensors (and BatchNorm buffers) are restored from one saved copy, so memory is
one copy of the pruned tensors, not one model per level, and the model ends bit-identical.
With ``gradual=True`` (reconstruction only) the levels instead form one schedule: taken in
increasing order, each level re-ranks the previous level's reconstructed weights and prunes on
from there (gradual one-shot pruning). Between two levels the schedule inserts steps (pruned and
reconstructed, not evaluated) so that no step prunes more than ``gradual_step`` of the entries
the step before kept (:func:`gradual_schedule`).
With ``reconstruct=True`` the saved copy covers every parameter and buffer, and one dense copy of
the model is the reconstruction target of every level. With a ``structure`` (``"channel"``,
``"N:M"``) every level's masks come from :func:`~sfwprune.prune.structured.structured_masks` on the
weights as given, and the saved copy covers every parameter and buffer.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .bn import batchnorm_modules, recalibrate_bn
from .masks import (
    apply_masks_,
    calibration_norms,
    check_options,
    check_sparsity,
    concat,
    flat_scores,
    prunable_parameters,
    prune_count,
    ranked_sets,
    split_masks,
)
from .reconstruct import check_calibration, check_relu_aware, reconstruct_
from .structured import measured_sparsity, structure_masks

Tensor = torch.Tensor


class Ranking:
    """A single ranking of a model's prunable entries, giving keep masks for any sparsity.

    Args and ordering are those of :func:`prune_`; ``Ranking(model, ...).masks(s)`` equals the
    masks ``prune_(model, s, ...)`` returns on the same weights. ``keep``: ``{name: bool mask}``
    whose ``False`` entries rank first (below every score, in index order), so the masks of any
    sparsity that prunes at least as many entries are nested in it.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        scope: str = "global",
        criterion: str = "magnitude",
        include: str = "weights",
        generator: torch.Generator | None = None,
        calibration: Iterable[Any] | None = None,
        keep: Mapping[str, Tensor] | None = None,
    ):
        check_options(scope, criterion, include, generator)
        self.named = prunable_parameters(model, include)
        self.params = [p for _, p in self.named]
        self.numel = sum(p.numel() for p in self.params)
        norms = calibration_norms(model, criterion, calibration)
        scores = flat_scores(self.named, criterion, generator, norms)
        if keep is not None:
            scores = [
                torch.where(keep[name].reshape(-1).to(s.device), s, float("-inf"))
                for (name, _), s in zip(self.named, scores, strict=True)
            ]
        self.sets = ranked_sets(scope, len(self.params))
        # order[j]: flat indices of set j, least important first; ties by index (stable sort)
        self.orders = [
            torch.sort(concat([scores[i] for i in members]), stable=True).indices
            for members in self.sets
        ]

    def masks(self, sparsity: float) -> dict[str, Tensor]:
        """``{name: bool keep mask}`` at ``sparsity``."""
        sparsity = check_sparsity(sparsity)
        out: dict[str, Tensor] = {}
        for members, order in zip(self.sets, self.orders, strict=True):
            keep = torch.ones(order.numel(), dtype=torch.bool, device=order.device)
            keep.index_fill_(0, order[: prune_count(sparsity, order.numel())], False)
            for i, m in zip(
                members, split_masks(keep, [self.params[i] for i in members]), strict=True
            ):
                out[self.named[i][0]] = m
        return {name: out[name] for name, _ in self.named}

    @torch.no_grad()
    def prune_(self, sparsity: float) -> dict[str, Tensor]:
        """Zero, in the ranked tensors, the entries :meth:`masks` prunes at ``sparsity``; return
        those masks."""
        masks = self.masks(sparsity)
        for p, keep in zip(self.params, masks.values(), strict=True):
            p.masked_fill_(~keep, 0)
        return masks


# A gradual step prunes at most this fraction of the entries the step before kept. LeNet-5 seed 0
# of the grid (SFW, 2,048 calibration images), accuracy at 98 / 99% sparsity: 85.10 / 80.24 with
# the grid's levels alone (1.0), 86.55 / 80.04 with 0.25 (docs/algorithm.md §6).
GRADUAL_STEP = 0.25


def check_gradual(
    gradual: Any, reconstruct: bool, structure: str | None, step: Any = GRADUAL_STEP
) -> None:
    """``gradual`` is a bool, and True only with ``reconstruct`` and unstructured pruning;
    ``step`` is a number in ``(0, 1]``."""
    if not isinstance(gradual, bool):
        raise ValueError(f"Invalid gradual: {gradual!r} (expected True or False)")
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0.0 < step <= 1.0:
        raise ValueError(f"Invalid gradual_step: {step!r} (expected a number in (0, 1])")
    if gradual and (not reconstruct or structure is not None):
        raise ValueError(
            "Invalid gradual: True (needs reconstruct=True and unstructured pruning, structure=None)"
        )


def gradual_schedule(
    levels: Sequence[float], step: float = GRADUAL_STEP
) -> list[tuple[float, int | None]]:
    """The order in which a gradual sweep prunes: ``(sparsity, index into levels)`` for the
    levels in increasing order, each preceded by ``(sparsity, None)`` steps so that no step
    prunes more than ``step`` of the entries the step before kept (the kept fractions between
    two levels fall geometrically). ``step=1`` gives the levels alone.

    Example:
        >>> [round(s, 3) for s, _ in gradual_schedule([0.9, 0.99], 0.5)]
        [0.438, 0.684, 0.822, 0.9, 0.944, 0.968, 0.982, 0.99]
    """
    out: list[tuple[float, int | None]] = []
    done = 0.0
    for index in sorted(range(len(levels)), key=lambda i: levels[i]):
        target = levels[index]
        before, after = 1.0 - done, 1.0 - target  # kept fractions
        steps = 1
        if 0.0 < after < before and step < 1.0:
            steps = max(1, math.ceil(math.log(after / before) / math.log(1.0 - step) - 1e-9))
        for j in range(1, steps):
            out.append((1.0 - before * (after / before) ** (j / steps), None))
        out.append((target, index))
        done = target
    return out


def _gradual_step_(
    model: nn.Module,
    sparsity: float,
    calibration: list[Any],
    dense: nn.Module,
    previous: Mapping[str, Tensor] | None,
    prune_kwargs: Mapping[str, Any],
    cache: dict[str, Any],
    relu_aware: bool,
) -> tuple[Ranking, dict[str, Tensor]]:
    """One step of the gradual schedule, in place: rank the weights as they are (the entries
    ``previous`` pruned first), prune to ``sparsity``, reconstruct against ``dense`` (``cache``:
    :func:`reconstruct_`'s, kept over the schedule)."""
    ranking = Ranking(model, calibration=calibration, keep=previous, **prune_kwargs)
    masks = ranking.prune_(sparsity)
    reconstruct_(
        model, masks, calibration, dense=dense, cache=cache, errors=False, relu_aware=relu_aware
    )
    return ranking, masks


def gradual_prune_(
    model: nn.Module,
    sparsity: float,
    calibration: Iterable[Any],
    *,
    gradual_step: float = GRADUAL_STEP,
    scope: str = "global",
    criterion: str = "magnitude",
    include: str = "weights",
    relu_aware: bool = False,
) -> dict[str, Tensor]:
    """Prune ``model`` in place to ``sparsity`` through the gradual schedule from its dense
    weights (:func:`gradual_schedule` of ``[sparsity]``): each step ranks the previous step's
    reconstructed weights, prunes on and reconstructs against the dense model on
    ``calibration``. Returns the keep masks, as :func:`prune_`.

    It is the schedule of a gradual :func:`sparsity_sweep` whose only level is ``sparsity``; a
    sweep over several levels steps through them too, so its row at ``sparsity`` may differ a
    little. Bad input raises before anything changes.
    """
    level = check_sparsity(sparsity)
    check_gradual(True, True, None, gradual_step)
    check_options(scope, criterion, include, None)
    check_relu_aware(relu_aware, True)
    if criterion == "random":
        raise ValueError(
            "Invalid criterion: 'random' (gradual pruning ranks by magnitude or wanda)"
        )
    chunks = check_calibration(model, calibration)
    dense = copy.deepcopy(model)
    kwargs = {"scope": scope, "criterion": criterion, "include": include}
    masks: dict[str, Tensor] | None = None
    cache: dict[str, Any] = {}
    for step, _ in gradual_schedule([level], gradual_step):
        _, masks = _gradual_step_(model, step, chunks, dense, masks, kwargs, cache, relu_aware)
    assert masks is not None
    return masks


def _replayable(batches: Iterable[Any] | None) -> Iterable[Any] | None:
    # every level reads the batches again, so a one-shot iterator is materialized once
    if batches is not None and iter(batches) is batches:
        return list(batches)
    return batches


@torch.no_grad()
def _restore(pairs: Sequence[tuple[Tensor, Tensor]]) -> None:
    for live, saved in pairs:
        live.copy_(saved)


def sparsity_sweep(
    model: nn.Module,
    evaluate: Callable[[nn.Module], Mapping[str, Any]],
    sparsities: Iterable[float],
    *,
    bn_batches: Iterable[Any] | None = None,
    calibration: Iterable[Any] | None = None,
    reconstruct: bool = False,
    structure: str | None = None,
    gradual: bool = False,
    gradual_step: float = GRADUAL_STEP,
    relu_aware: bool = False,
    progress: bool | None = None,
    **prune_kwargs: Any,
) -> list[dict[str, Any]]:
    """Prune to each sparsity from one ranking, evaluate, restore; one row per level.

    Level ``s`` zeroes the first ``round(s·N)`` entries of the ranking (as :func:`prune_`), then
    optionally re-solves the kept weights (``reconstruct``), recalibrates BatchNorm on
    ``bn_batches``, then calls ``evaluate(model)``.

    Args:
        model: the trained network; bit-identical (parameters, buffers, training flags) on return,
            also when ``evaluate`` raises.
        evaluate: ``model -> {"accuracy": ..., "loss": ..., ...}``; extra keys go into the row.
        sparsities: target fractions of zeros, each in ``[0, 1]``; with ``structure="channel"``
            fractions of units in ``[0, 1)``; with ``"N:M"`` each must be ``1 - N/M`` (an N:M
            sweep has one level).
        bn_batches: if given, BatchNorm stats are recomputed on these batches at every level
            (a re-iterable such as a list or DataLoader; an iterator is read once into a list).
        calibration: input batches (labels unused) for ``criterion="wanda"`` and ``reconstruct``;
            read once.
        reconstruct: re-solve every level's kept weights and biases against the dense model's
            layer outputs on ``calibration`` (:func:`reconstruct_`, which also re-estimates
            BatchNorm statistics on ``calibration``).
        structure: ``None`` (unstructured), ``"channel"`` or ``"N:M"``, as for :func:`prune_`;
            every level's masks are computed on the model's weights before anything changes
            (those :func:`prune_` gives).
        gradual: with ``reconstruct`` (unstructured only): run the levels in increasing order as
            one schedule; each level ranks the previous level's reconstructed weights (its pruned
            entries stay pruned, Wanda's norms are re-measured), prunes up to its own sparsity and
            reconstructs against the dense model. The first level ranks the dense weights, as
            without ``gradual``. Rows come back in the order given; a level's result depends on
            the smaller levels of the sweep.
        gradual_step: with ``gradual``: the largest fraction of the entries kept by one step that
            the next step prunes; levels further apart get steps in between, pruned and
            reconstructed but not evaluated (:func:`gradual_schedule`; default 0.25; 1: the
            levels alone, one reconstruction each). A row's ``seconds`` include its steps.
        relu_aware: with ``reconstruct``: layers that feed a ReLU match what it passes on
            (:func:`reconstruct_`'s ``relu_aware``).
        progress: a tqdm bar over the levels (shown after 2 s); ``None``: when ``reconstruct``
            and stderr is a terminal.
        **prune_kwargs: ``scope``, ``criterion``, ``include``, ``generator``, and with a
            ``structure`` ``norm`` and ``indivisible``, as for :func:`prune_`.

    Returns:
        Rows ``{"sparsity", "measured_sparsity", "accuracy", "loss", "seconds", ...}`` in the
        order given; ``measured_sparsity`` is the fraction of zeros among the ranked entries
        (channel: of masked units whose weight row is all zero; N:M: of zeros in the masked
        weights, :func:`~sfwprune.prune.structured.measured_sparsity`),
        ``seconds`` the wall time of the level's masking, reconstruction and BatchNorm
        recalibration (not of ``evaluate``; with ``gradual``, of every step since the previous
        level), and with ``gradual`` ``steps``, the reconstructions that took.

    Example:
        >>> rows = sparsity_sweep(net, lambda m: evaluate(m, loader), [0.5, 0.9, 0.99])
        >>> [round(r["accuracy"], 3) for r in rows]
    """
    levels = [check_sparsity(s) for s in sparsities]
    allowed = {"scope", "criterion", "include", "generator"}
    if structure is not None:
        allowed |= {"norm", "indivisible"}
    unknown = set(prune_kwargs) - allowed
    if unknown:
        raise ValueError(
            f"Invalid prune_kwargs: {sorted(unknown)!r} (expected {', '.join(sorted(allowed))})"
        )
    if not callable(evaluate):
        raise ValueError(f"Invalid evaluate: {evaluate!r} (expected model -> dict)")
    check_gradual(gradual, reconstruct, structure, gradual_step)
    check_relu_aware(relu_aware, reconstruct)
    level_masks: list[dict[str, Tensor]] | None = None
    if structure is not None:
        kwargs = dict(prune_kwargs)
        check_options(
            kwargs.get("scope", "global"), kwargs.get("criterion", "magnitude"),
            kwargs.get("include", "weights"), kwargs.pop("generator", None),
        )  # fmt: skip
        level_masks = [structure_masks(model, s, structure, **kwargs) for s in levels]
    chunks = check_calibration(model, calibration) if reconstruct else None
    if chunks is not None:
        calibration = chunks
    ranking = (
        None if structure is not None else Ranking(model, calibration=calibration, **prune_kwargs)
    )
    bn_batches = _replayable(bn_batches)
    dense = copy.deepcopy(model) if reconstruct else None
    if reconstruct or ranking is None:
        saved = [(t, t.detach().clone()) for t in (*model.parameters(), *model.buffers())]
    else:
        saved = [(p, p.detach().clone()) for p in ranking.params]
        saved += [
            (b, b.clone()) for m in batchnorm_modules(model) for b in m.buffers(recurse=False)
        ]
    flags = [(m, m.training) for m in model.modules()]
    if progress is None:
        progress = reconstruct and sys.stderr.isatty()
    rows: list[dict[str, Any] | None] = [None] * len(levels)
    plan: list[tuple[float, int | None]] = [(s, i) for i, s in enumerate(levels)]
    if gradual:
        plan = gradual_schedule(levels, gradual_step)
    previous: dict[str, Tensor] | None = None
    cache: dict[str, Any] = {}  # reconstruct_'s cache, kept over the levels and steps
    spent, steps = 0.0, 0  # gradual: seconds and reconstructions since the last level
    try:
        bar: Iterable[tuple[float, int | None]] = plan
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(plan, desc="sparsity sweep", unit="step", delay=2.0, leave=False)
        for sparsity, index in bar:
            start = time.perf_counter()
            if previous is not None:  # gradual, after the first step
                assert chunks is not None and dense is not None
                ranking, masks = _gradual_step_(
                    model, sparsity, chunks, dense, previous, prune_kwargs, cache, relu_aware
                )
                previous = masks
            else:
                _restore(saved)
                if ranking is None:
                    assert level_masks is not None and structure is not None
                    masks = level_masks[index]
                    apply_masks_(model, masks)
                else:
                    masks = ranking.prune_(sparsity)
                if chunks is not None:
                    reconstruct_(
                        model, masks, chunks, dense=dense, cache=cache, errors=False,
                        relu_aware=relu_aware,
                    )  # fmt: skip
                    if gradual:
                        previous = masks
            steps += 1
            if index is None:  # a gradual step between two levels: not evaluated
                spent += time.perf_counter() - start
                continue
            if ranking is None:
                measured = measured_sparsity(model, masks, structure)
            else:
                with torch.no_grad():
                    zeros = sum(int((p == 0).sum()) for p in ranking.params)
                measured = zeros / ranking.numel
            if bn_batches is not None:
                recalibrate_bn(model, bn_batches)
            seconds = spent + time.perf_counter() - start
            metrics = evaluate(model)
            missing = {"accuracy", "loss"} - set(metrics)
            if missing:
                raise ValueError(
                    f"Invalid evaluate result: keys {sorted(metrics)!r} (missing {sorted(missing)})"
                )
            row = {
                "sparsity": sparsity,
                "measured_sparsity": measured,
                "accuracy": float(metrics["accuracy"]),
                "loss": float(metrics["loss"]),
                "seconds": seconds,
            }
            if gradual:
                row["steps"] = steps
            spent, steps = 0.0, 0
            row.update({k: v for k, v in metrics.items() if k not in row})
            rows[index] = row
    finally:
        _restore(saved)
        for m, training in flags:
            m.training = training
    return [row for row in rows if row is not None]
