"""The L_p ball of radius r, ``{x : ||x||_p <= r}``, for any ``p >= 1`` (``p = inf`` included).

LMO (Hölder's equality case), with ``1/p + 1/q = 1``:

    v = -r · sign(g) |g|^{q-1} / ||g||_q^{q-1}

which is one coordinate for ``p = 1``, ``-r g/||g||_2`` for ``p = 2`` and ``-r sign(g)`` for
``p = inf``. L2 diameter: ``2r · max(1, n^{1/2 - 1/p})``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .base import ConstraintSet, Tensor, check_n, radius_or_diameter


def _check_p(p: float) -> float:
    try:
        p = float(p)
    except (TypeError, ValueError):
        raise ValueError(f"Invalid p: {p!r} (expected a number >= 1, or inf)") from None
    if math.isnan(p) or p < 1:
        raise ValueError(f"Invalid p: {p} (expected a number >= 1, or inf)")
    return p


def lp_l2_diameter_per_radius(n: int, p: float) -> float:
    """L2 diameter of the unit L_p ball in ``R^n``."""
    inv_p = 0.0 if math.isinf(p) else 1.0 / p
    return 2.0 * max(1.0, n ** (0.5 - inv_p))


def lp_ball_lmo(grad: Tensor, p: float, radius: float) -> Tensor:
    """Vertex of the L_p ball minimizing ``<grad, v>``; zero where ``grad`` is all zero."""
    flat = grad.reshape(-1)
    if p == 1.0:
        v = torch.zeros_like(flat)
        i = torch.argmax(flat.abs())
        v[i] = -radius * torch.sign(flat[i])
    elif math.isinf(p):
        v = -radius * torch.sign(flat)
    elif p == 2.0:
        # Scale by the max first: ||g|| of a tiny g underflows, of a huge g overflows.
        amax = flat.abs().max()
        a = flat / torch.clamp(amax, min=torch.finfo(flat.dtype).tiny)
        v = a * (-radius / torch.clamp(torch.linalg.vector_norm(a), min=1.0))
        v = torch.where(amax > 0, v, torch.zeros_like(v))
    else:
        q = p / (p - 1.0)
        a = flat.abs()
        # Normalise by the max first so |g|^{q-1} neither overflows nor underflows.
        amax = torch.clamp(a.max(), min=torch.finfo(flat.dtype).tiny)
        a = a / amax
        norm_q = torch.clamp(torch.linalg.vector_norm(a, ord=q), min=1.0)  # >= 1 unless g = 0
        v = -radius * torch.sign(flat) * (a / norm_q) ** (q - 1.0)
    return v.view_as(grad)


class LpBall(ConstraintSet):
    """``{x ∈ R^n : ||x||_p <= radius}``.

    Args:
        n: number of elements.
        p: 1, 2, ``float("inf")`` or any float >= 1.
        radius: the ball's radius; or give ``l2_diameter``.

    Example:
        >>> LpBall(n=3, p=1, radius=2.0).lmo(torch.tensor([0.5, -4.0, 1.0]))
        tensor([0., 2., 0.])
    """

    kind = "lp"

    def __init__(
        self, n: int, p: float, radius: float | None = None, *, l2_diameter: float | None = None
    ):
        self.n = check_n(n)
        self.p = _check_p(p)
        self.radius = radius_or_diameter(
            radius, l2_diameter, lp_l2_diameter_per_radius(self.n, self.p)
        )

    def lmo(self, grad: Tensor) -> Tensor:
        self._check_numel(grad)
        return lp_ball_lmo(grad, self.p, self.radius)

    @property
    def l2_diameter(self) -> float:
        return self.radius * lp_l2_diameter_per_radius(self.n, self.p)

    def scale_factor(self, x: Tensor) -> Tensor:
        x = x.detach().reshape(-1)
        return torch.linalg.vector_norm(x, ord=self.p) / self.radius

    def to_group(self) -> dict[str, Any]:
        return {**super().to_group(), "p": self.p, "radius": self.radius}
