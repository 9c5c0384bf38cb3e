"""No constraint: the tensor is trained by a plain (momentum-averaged) gradient step."""

from __future__ import annotations

import math

import torch

from .base import ConstraintSet, Tensor, check_n


class Unconstrained(ConstraintSet):
    """All of ``R^n``. SFW moves such tensors by ``θ ← θ - lr·m`` (an SGD-style step).

    There is no finite minimizer of a linear function over ``R^n``, so :meth:`lmo` raises.
    """

    kind = "unconstrained"

    def __init__(self, n: int):
        self.n = check_n(n)

    def lmo(self, grad: Tensor) -> Tensor:
        raise ValueError(
            "Invalid call: an Unconstrained set has no linear minimization oracle "
            "(SFW trains unconstrained tensors with a gradient step instead)"
        )

    @property
    def l2_diameter(self) -> float:
        return math.inf

    def scale_factor(self, x: Tensor) -> Tensor:
        return torch.zeros((), dtype=x.dtype, device=x.device)

    def contains(self, x: Tensor, atol: float = 1e-6) -> bool:
        self._check_numel(x)
        return True
