"""The K-sparse polytope, SFW-pruning's set.

    C(K, τ) = conv{ v : ||v||_0 = K, v_i ∈ {0, ±τ} } = B_1(Kτ) ∩ B_∞(τ)

LMO: the K coordinates of largest ``|g|`` get ``-τ·sign(g_i)``, all others 0.
L2 diameter: ``2τ√K``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .base import ConstraintSet, Tensor, check_k, check_n, radius_or_diameter


def k_sparse_lmo(grad: Tensor, k: int, radius: float) -> Tensor:
    """Dense vertex of ``C(k, radius)`` minimizing ``<grad, v>``; see :class:`KSparsePolytope`."""
    flat = grad.reshape(-1)
    idx = torch.topk(flat.abs(), k, sorted=False).indices
    v = torch.zeros_like(flat)
    v.scatter_(0, idx, torch.sign(flat[idx]) * (-radius))
    return v.view_as(grad)


class KSparsePolytope(ConstraintSet):
    """``conv{v : ||v||_0 = k, v_i ∈ {0, ±radius}}``, equal to ``B_1(k·radius) ∩ B_∞(radius)``.

    Args:
        n: number of elements of the tensor.
        k: sparsity of the vertices, ``1 <= k <= n``.
        radius: ``τ``, the largest magnitude of a coordinate. Or give ``l2_diameter`` (= 2τ√k).

    Example:
        >>> c = KSparsePolytope(n=4, k=2, radius=1.0)
        >>> c.lmo(torch.tensor([0.1, -3.0, 2.0, 0.0]))
        tensor([ 0.,  1., -1.,  0.])
    """

    kind = "k_sparse"

    def __init__(
        self, n: int, k: int, radius: float | None = None, *, l2_diameter: float | None = None
    ):
        self.n = check_n(n)
        self.k = check_k(k, self.n)
        self.radius = radius_or_diameter(radius, l2_diameter, 2.0 * math.sqrt(self.k))

    def lmo(self, grad: Tensor) -> Tensor:
        self._check_numel(grad)
        return k_sparse_lmo(grad, self.k, self.radius)

    @property
    def l2_diameter(self) -> float:
        return 2.0 * self.radius * math.sqrt(self.k)

    def scale_factor(self, x: Tensor) -> Tensor:
        x = x.detach().reshape(-1).abs()
        if x.numel() == 0:
            return torch.zeros((), dtype=x.dtype, device=x.device)
        return torch.maximum(x.max() / self.radius, x.sum() / (self.k * self.radius))

    def to_group(self) -> dict[str, Any]:
        return {**super().to_group(), "k": self.k, "radius": self.radius}
