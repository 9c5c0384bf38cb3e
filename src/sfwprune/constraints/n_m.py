"""The N:M sparse polytope: a K-sparse polytope (K = N) on every group of M consecutive entries.

Rows are split into groups of ``M`` consecutive input entries (a Linear row, or a conv filter
flattened over ``C·kh·kw``; row lengths are multiples of ``M``, so in the flat, row-major tensor the
groups are simply consecutive blocks of ``M``):

    C(N, M, τ) = Π_groups C(K=N, τ) = { x : |x_i| <= τ,  Σ_{i ∈ g} |x_i| <= Nτ  for every group g }

LMO: in every group, the N entries of largest ``|g|`` get ``-τ·sign(g_i)``, the others 0
(what 2:4 sparse tensor cores run). L2 diameter: ``2τ√(N·#groups)`` (docs/algorithm.md §7).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .base import ConstraintSet, Tensor, check_n, radius_or_diameter


def check_n_m(n_keep: object, group_size: object, n: int | None = None) -> tuple[int, int]:
    """``(N, M)`` as ints with ``1 <= N <= M`` (and ``M`` dividing ``n`` when given)."""
    for name, value in (("M", group_size), ("N", n_keep)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Invalid {name}: {value!r} (expected an integer >= 1)")
    if n_keep > group_size:  # type: ignore[operator]
        raise ValueError(f"Invalid N:M: {n_keep}:{group_size} (expected N <= M)")
    if n is not None and n % group_size:  # type: ignore[operator]
        raise ValueError(
            f"Invalid M: {group_size} does not divide the tensor's {n} elements "
            "(rows must split into groups of M)"
        )
    return n_keep, group_size  # type: ignore[return-value]


def n_m_lmo(grad: Tensor, n_keep: int, group_size: int, radius: float) -> Tensor:
    """Vertex of the N:M polytope minimizing ``<grad, v>``; see :class:`NMSparsePolytope`."""
    groups = grad.reshape(-1, group_size)  # (numel / M, M)
    idx = torch.topk(groups.abs(), n_keep, dim=1, sorted=False).indices
    v = torch.zeros_like(groups)
    # sign(0) = 0: a zero gradient entry gives a zero vertex entry.
    v.scatter_(1, idx, torch.sign(torch.gather(groups, 1, idx)) * (-radius))
    return v.view_as(grad)


class NMSparsePolytope(ConstraintSet):
    """Product over groups of ``M`` consecutive entries of the K-sparse polytope ``C(N, τ)``.

    Args:
        n: number of elements of the tensor (a multiple of ``group_size``).
        k: ``N``, entries kept per group, ``1 <= k <= group_size``.
        group_size: ``M``, the group length (e.g. 4 for 2:4).
        radius: ``τ``, the largest magnitude of a coordinate. Or give ``l2_diameter``
            (= 2τ√(N·n/M)).

    Example:
        >>> c = NMSparsePolytope(n=8, k=2, group_size=4, radius=1.0)
        >>> c.lmo(torch.tensor([0.1, -3.0, 2.0, 0.0, 1.0, 0.5, -0.2, 4.0]))
        tensor([ 0.,  1., -1.,  0., -1.,  0.,  0., -1.])
    """

    kind = "n_m"

    def __init__(
        self,
        n: int,
        k: int,
        group_size: int,
        radius: float | None = None,
        *,
        l2_diameter: float | None = None,
    ):
        self.n = check_n(n)
        self.k, self.group_size = check_n_m(k, group_size, self.n)
        self.num_groups = self.n // self.group_size
        per_radius = 2.0 * math.sqrt(self.k * self.num_groups)
        self.radius = radius_or_diameter(radius, l2_diameter, per_radius)

    def lmo(self, grad: Tensor) -> Tensor:
        self._check_numel(grad)
        return n_m_lmo(grad, self.k, self.group_size, self.radius)

    @property
    def l2_diameter(self) -> float:
        return 2.0 * self.radius * math.sqrt(self.k * self.num_groups)

    def scale_factor(self, x: Tensor) -> Tensor:
        # Per group the K-sparse gauge max(||x_g||_∞/τ, ||x_g||_1/(Nτ)); the product's is the max.
        a = x.detach().reshape(-1, self.group_size).abs()
        return torch.maximum(a.max() / self.radius, a.sum(dim=1).max() / (self.k * self.radius))

    def to_group(self) -> dict[str, Any]:
        return {
            **super().to_group(), "k": self.k, "group_size": self.group_size, "radius": self.radius
        }  # fmt: skip
