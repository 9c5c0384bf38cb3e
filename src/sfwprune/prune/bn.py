"""BatchNorm recalibration after pruning: recompute running statistics, update no weight.

Pruning shifts every layer's activation statistics, so the stored ``running_mean`` /
``running_var`` no longer match; re-estimating them on a few training batches is a cheap fix the
paper does not use (docs/algorithm.md §4).
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorm_modules(model: nn.Module) -> list[_BatchNorm]:
    """BatchNorm layers of ``model`` that track running statistics."""
    return [
        m
        for m in model.modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]


def _model_device(model: nn.Module) -> torch.device | None:
    for t in chain(model.parameters(), model.buffers()):
        return t.device
    return None


def _inputs(batch: Any, device: torch.device | None) -> torch.Tensor:
    x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if not isinstance(x, torch.Tensor):
        raise ValueError(
            f"Invalid batch: {type(batch).__name__} (expected a tensor or an (inputs, ...) tuple)"
        )
    return x.to(device) if device is not None and x.device != device else x


def recalibrate_bn(model: nn.Module, batches: Iterable[Any]) -> int:
    """Re-estimate BatchNorm running statistics on ``batches``; nothing else changes.

    Each BatchNorm layer's stats are reset and replaced by the cumulative average over batches
    (``momentum=None``): ``running_mean = (1/B) Σ_b mean_b(x)``, same for the unbiased variance.
    Forwards run under ``no_grad`` with the BatchNorm layers in training mode and every other
    module in eval mode (dropout off, as at inference). Each module's ``training`` flag and each
    BatchNorm's ``momentum`` are restored afterwards; if a forward raises, the old statistics are
    restored too.

    Args:
        model: the (pruned) network; only BatchNorm buffers change.
        batches: iterable of input tensors or ``(inputs, targets, ...)`` tuples, e.g. a few
            training batches. Inputs are moved to the model's device.

    Returns:
        The number of batches used (0 when the model has no BatchNorm; then nothing is read).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> recalibrate_bn(net, [torch.randn(8, 3) for _ in range(2)])
        2
    """
    bns = batchnorm_modules(model)
    if not bns:
        return 0
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise ValueError("Invalid batches: empty (expected at least one batch)")
    device = _model_device(model)
    flags = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in bns]
    saved = [{k: b.clone() for k, b in m.named_buffers(recurse=False)} for m in bns]
    count = 0
    ok = False
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for batch in chain([first], batches):
                model(_inputs(batch, device))
                count += 1
        ok = True
    finally:
        if not ok:  # a failed forward leaves the old statistics, not half-reset ones
            with torch.no_grad():
                for m, buffers in zip(bns, saved, strict=True):
                    for k, b in buffers.items():
                        getattr(m, k).copy_(b)
        for m, momentum in momenta:
            m.momentum = momentum
        for m, training in flags:
            m.training = training
    return count
