"""The interface every constraint set implements.

A constraint set ``C ⊂ R^n`` is a convex set with a cheap *linear minimization oracle*
``lmo(g) = argmin_{v ∈ C} <g, v>``. Frank-Wolfe only ever touches the set through the LMO, so the
LMO is the one method each set must get exactly right.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch

Tensor = torch.Tensor


def check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"Invalid n: {n!r} (expected an integer >= 1)")
    return n


def check_k(k: int, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"Invalid k: {k!r} (expected an integer in [1, n={n}])")
    if not 1 <= k <= n:
        raise ValueError(f"Invalid k: {k} (expected an integer in [1, n={n}])")
    return k


def check_positive(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"Invalid {name}: {value!r} (expected a finite number > 0)") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"Invalid {name}: {value} (expected a finite number > 0)")
    return value


def radius_or_diameter(radius: float | None, l2_diameter: float | None, per_radius: float) -> float:
    """Resolve ``radius`` from exactly one of ``radius`` / ``l2_diameter``.

    ``per_radius`` is the set's L2 diameter at radius 1 (diameter scales linearly with radius).
    """
    if (radius is None) == (l2_diameter is None):
        raise ValueError(
            f"Invalid size: radius={radius!r}, l2_diameter={l2_diameter!r} "
            "(give exactly one of them)"
        )
    if radius is not None:
        return check_positive("radius", radius)
    return check_positive("l2_diameter", l2_diameter) / per_radius  # type: ignore[arg-type]


class ConstraintSet(ABC):
    """A convex set in ``R^n``, applied to a tensor of ``n`` elements (any shape).

    Subclasses define ``kind`` (the name used in optimizer param groups), ``lmo``,
    ``l2_diameter`` and ``scale_factor`` (the gauge); ``contains`` and ``shift_inside`` follow.
    """

    kind: str = ""
    n: int

    @abstractmethod
    def lmo(self, grad: Tensor) -> Tensor:
        """A vertex ``v`` of the set minimizing ``<grad, v>``; same shape, dtype, device as grad."""

    @property
    @abstractmethod
    def l2_diameter(self) -> float:
        """``max_{x, y ∈ C} ||x - y||_2``."""

    def contains(self, x: Tensor, atol: float = 1e-6) -> bool:
        """Whether ``x`` lies in the set, up to a tolerance ``atol`` relative to the set's size:
        its gauge :meth:`scale_factor` is at most ``1 + atol``."""
        self._check_numel(x)
        return bool(self.scale_factor(x) <= 1.0 + atol)

    @abstractmethod
    def scale_factor(self, x: Tensor) -> Tensor:
        """Smallest ``c >= 0`` with ``x / c`` in the set (the gauge of ``x``), a 0-dim tensor."""

    def shift_inside(self, x: Tensor) -> Tensor:
        """``x`` rescaled radially onto the set when outside; ``x`` itself (a copy) when inside."""
        self._check_numel(x)
        c = self.scale_factor(x)
        return x / torch.clamp(c, min=1.0).to(x.dtype)

    def to_group(self) -> dict[str, Any]:
        """Plain values describing this set, as stored in an optimizer param group."""
        return {"constraint": self.kind, "n": self.n, "k": None, "p": None, "radius": None}

    def _check_numel(self, x: Tensor) -> None:
        if x.numel() != self.n:
            raise ValueError(
                f"Invalid tensor: {x.numel()} elements for a {type(self).__name__} of n={self.n}"
            )

    def __repr__(self) -> str:
        fields = {k: v for k, v in self.to_group().items() if v is not None and k != "constraint"}
        args = ", ".join(f"{k}={v}" for k, v in fields.items())
        return f"{type(self).__name__}({args})"
