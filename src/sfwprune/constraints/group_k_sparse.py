"""The group K-sparse polytope: K-sparsity over whole groups (output units), L2 inside a group.

A tensor of ``n`` elements is split into ``G = n / s`` consecutive groups of ``s`` elements; for a
weight of shape ``(out, ...)`` with ``s = numel / out`` the groups are its output units (Linear
rows, conv filters). With ``r_g = ||x_g||_2``:

    C(K, τ) = { x : r_g <= τ for every g,  Σ_g r_g <= Kτ }

(the group analogue of ``B_1(Kτ) ∩ B_∞(τ)``). LMO: the K groups of largest ``||m_g||_2`` get
``-τ·m_g/||m_g||_2``, the others 0 (and a zero-gradient group stays 0). L2 diameter: ``2τ√K``
(docs/algorithm.md §7).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .base import ConstraintSet, Tensor, check_k, check_n, radius_or_diameter


def check_group_size(group_size: object, n: int) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"Invalid group_size: {group_size!r} (expected an integer >= 1)")
    if n % group_size:
        raise ValueError(
            f"Invalid group_size: {group_size} does not divide the tensor's {n} elements"
        )
    return group_size


def group_k_sparse_lmo(grad: Tensor, k: int, group_size: int, radius: float) -> Tensor:
    """Vertex of the group K-sparse polytope minimizing ``<grad, v>``."""
    groups = grad.reshape(-1, group_size)  # (G, s)
    norms = torch.linalg.vector_norm(groups, dim=1)  # (G,)
    idx = torch.topk(norms, k, sorted=False).indices
    picked = norms[idx]
    # A zero-norm group among the top K contributes nothing to <grad, v>: leave it at 0.
    scale = torch.where(picked > 0, -radius / picked.clamp_min(torch.finfo(norms.dtype).tiny), 0)
    v = torch.zeros_like(groups)
    v[idx] = groups[idx] * scale.unsqueeze(1).to(groups.dtype)
    return v.view_as(grad)


class GroupKSparsePolytope(ConstraintSet):
    """``{x : ||x_g||_2 <= τ ∀g, Σ_g ||x_g||_2 <= Kτ}`` over consecutive groups of ``group_size``.

    Args:
        n: number of elements of the tensor (a multiple of ``group_size``).
        k: number of groups a vertex activates, ``1 <= k <= n / group_size``.
        group_size: elements per group (``numel / out_features`` for a weight's output units).
        radius: ``τ``, the largest L2 norm of a group. Or give ``l2_diameter`` (= 2τ√K).

    Example:
        >>> c = GroupKSparsePolytope(n=6, k=1, group_size=2, radius=1.0)
        >>> c.lmo(torch.tensor([3.0, 4.0, 0.1, 0.0, -1.0, 1.0]))
        tensor([-0.6000, -0.8000,  0.0000,  0.0000,  0.0000,  0.0000])
    """

    kind = "channel"

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
        self.group_size = check_group_size(group_size, self.n)
        self.num_groups = self.n // self.group_size
        self.k = check_k(k, self.num_groups)
        self.radius = radius_or_diameter(radius, l2_diameter, 2.0 * math.sqrt(self.k))

    def lmo(self, grad: Tensor) -> Tensor:
        self._check_numel(grad)
        return group_k_sparse_lmo(grad, self.k, self.group_size, self.radius)

    @property
    def l2_diameter(self) -> float:
        return 2.0 * self.radius * math.sqrt(self.k)

    def group_norms(self, x: Tensor) -> Tensor:
        """``||x_g||_2`` for every group, shape ``(n / group_size,)``."""
        return torch.linalg.vector_norm(x.detach().reshape(-1, self.group_size), dim=1)

    def scale_factor(self, x: Tensor) -> Tensor:
        r = self.group_norms(x)
        return torch.maximum(r.max() / self.radius, r.sum() / (self.k * self.radius))

    def to_group(self) -> dict[str, Any]:
        return {
            **super().to_group(), "k": self.k, "group_size": self.group_size, "radius": self.radius
        }  # fmt: skip
