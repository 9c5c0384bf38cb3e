"""The K-support-norm ball (Argyriou, Foygel, Srebro 2012), the follow-up paper's set.

    C = conv{ v : ||v||_0 <= K, ||v||_2 <= r }

LMO: keep the K entries of ``g`` largest in magnitude (with their magnitudes), scale them to
L2 norm ``r``, negate. L2 diameter: ``2r``.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import ConstraintSet, Tensor, check_k, check_n, radius_or_diameter


def k_support_lmo(grad: Tensor, k: int, radius: float) -> Tensor:
    flat = grad.reshape(-1)
    idx = torch.topk(flat.abs(), k, sorted=False).indices
    top = flat[idx]
    # Scale by the max first so that the norm of a tiny (or huge) top-k neither under- nor
    # overflows; a zero gradient gives the zero vertex.
    amax = top.abs().max()
    top = top / torch.clamp(amax, min=torch.finfo(flat.dtype).tiny)
    top = top * (-radius / torch.clamp(torch.linalg.vector_norm(top), min=1.0))
    v = torch.zeros_like(flat)
    v.scatter_(0, idx, torch.where(amax > 0, top, torch.zeros_like(top)))
    return v.view_as(grad)


def k_support_norm(x: Tensor, k: int) -> Tensor:
    """The K-support norm of ``x`` (closed form of Argyriou et al. 2012, Prop. 2.1).

    With ``z`` = ``|x|`` sorted descending (``z_0 = +inf``), find the unique ``r`` in
    ``0..k-1`` with ``z_{k-r-1} > (1/(r+1)) Σ_{i>=k-r} z_i >= z_{k-r}`` (1-based); then
    ``||x||² = Σ_{i<k-r} z_i² + (Σ_{i>=k-r} z_i)² / (r+1)``.
    """
    z = torch.sort(x.detach().reshape(-1).abs().to(torch.float64), descending=True).values
    n = z.numel()
    # tail[j] = sum of z[j:], 0-based.
    tail = torch.flip(torch.cumsum(torch.flip(z, [0]), 0), [0])
    head_sq = torch.cumsum(z * z, 0)
    for r in range(k):
        j = k - r - 1  # 0-based index of z_{k-r}
        if j >= n:
            continue
        avg = tail[j] / (r + 1)
        upper = z[j - 1] if j >= 1 else torch.tensor(float("inf"), dtype=z.dtype)
        if upper > avg >= z[j]:
            head = head_sq[j - 1] if j >= 1 else torch.zeros((), dtype=z.dtype)
            return torch.sqrt(head + tail[j] ** 2 / (r + 1)).to(x.dtype)
    # Only reached through rounding: fall back to r = k-1 (the L1-like regime's bound).
    return torch.sqrt(tail[0] ** 2 / k).to(x.dtype)


class KSupportNormBall(ConstraintSet):
    """``{x : ||x||_{k-sp} <= radius}``: the convex hull of k-sparse vectors of L2 norm <= radius.

    Args:
        n: number of elements.
        k: ``1 <= k <= n``; k = 1 gives the L1 ball, k = n the L2 ball.
        radius: the ball's radius; or give ``l2_diameter`` (= 2·radius).

    Example:
        >>> KSupportNormBall(n=3, k=2, radius=5.0).lmo(torch.tensor([3.0, 0.0, -4.0]))
        tensor([-3.,  0.,  4.])
    """

    kind = "k_support"

    def __init__(
        self, n: int, k: int, radius: float | None = None, *, l2_diameter: float | None = None
    ):
        self.n = check_n(n)
        self.k = check_k(k, self.n)
        self.radius = radius_or_diameter(radius, l2_diameter, 2.0)

    def lmo(self, grad: Tensor) -> Tensor:
        self._check_numel(grad)
        return k_support_lmo(grad, self.k, self.radius)

    @property
    def l2_diameter(self) -> float:
        return 2.0 * self.radius

    def scale_factor(self, x: Tensor) -> Tensor:
        return k_support_norm(x, self.k) / self.radius

    def to_group(self) -> dict[str, Any]:
        return {**super().to_group(), "k": self.k, "radius": self.radius}
