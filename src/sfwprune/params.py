"""Which parameters are "weights": the one meaning shared by constraints and pruning.

    weights = every parameter with two or more dimensions

That is every Linear and convolution weight, every ``nn.Embedding`` table, attention's
``in_proj_weight`` / ``q_proj_weight`` and ``out_proj.weight``, a tied weight (once), and any
other matrix a user module holds. One-dimensional parameters (biases, BatchNorm/LayerNorm scales
and shifts) are not weights. ``constraint_groups(include="weights")`` constrains exactly this set
and ``prune_(include="weights")`` (the default) prunes exactly this set, so what SFW makes
pruning-friendly is what pruning removes.

Example:
    >>> net = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    >>> [name for name, _ in weight_parameters(net)]
    ['0.weight', '2.weight']
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter

WEIGHT_MIN_DIM = 2


def is_weight(name: str, param: torch.Tensor) -> bool:
    """Whether ``param`` (named ``name``) is a weight: a tensor of dim >= 2.

    Raises ``ValueError`` for an uninitialized (lazy) parameter, whose dimension is not known yet.
    """
    if isinstance(param, UninitializedParameter):
        raise ValueError(f"Invalid model: parameter {name!r} is uninitialized (run a forward)")
    return param.dim() >= WEIGHT_MIN_DIM


def weight_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` weights of ``model``, in ``named_parameters`` order, each shared
    (tied) parameter once under its first name."""
    return [(n, p) for n, p in model.named_parameters() if is_weight(n, p)]
