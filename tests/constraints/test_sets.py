"""contains / shift_inside / the K-support norm / argument validation."""

from __future__ import annotations

import math

import pytest
import torch

from sfwprune import KSparsePolytope, KSupportNormBall, LpBall, Unconstrained, make_constraint
from sfwprune.constraints import k_support_norm


def test_k_sparse_contains_is_l1_and_linf() -> None:
    c = KSparsePolytope(n=4, k=2, radius=1.0)
    assert c.contains(torch.tensor([1.0, -1.0, 0.0, 0.0]))
    assert c.contains(torch.tensor([0.5, 0.5, 0.5, 0.5]))
    assert not c.contains(torch.tensor([1.1, 0.0, 0.0, 0.0]))  # breaks the L_inf bound
    assert not c.contains(torch.tensor([0.6, 0.6, 0.6, 0.6]))  # breaks the L1 bound Kτ = 2


def test_shift_inside_is_minimal_radial_rescale() -> None:
    gen = torch.Generator().manual_seed(0)
    sets = [
        KSparsePolytope(n=30, k=4, radius=0.1),
        LpBall(n=30, p=1, radius=0.5),
        LpBall(n=30, p=2, radius=0.5),
        LpBall(n=30, p=math.inf, radius=0.05),
        LpBall(n=30, p=3.5, radius=0.5),
        KSupportNormBall(n=30, k=4, radius=0.5),
    ]
    for cset in sets:
        for _ in range(10):
            x = torch.randn(30, generator=gen, dtype=torch.float64)
            y = cset.shift_inside(x)
            assert cset.contains(y)
            # on the boundary: a hair larger is outside; direction kept
            assert not cset.contains(y * 1.001)
            assert torch.allclose(y / y.norm(), x / x.norm())
            # a point inside is left alone (as a new tensor)
            z = y * 0.5
            out = cset.shift_inside(z)
            assert torch.equal(out, z) and out is not z


def test_shift_inside_k_sparse_minimal_factor() -> None:
    c = KSparsePolytope(n=4, k=2, radius=1.0)
    x = torch.tensor([3.0, 0.0, 0.0, 0.0])  # L_inf-bound: factor 3
    assert torch.allclose(c.shift_inside(x), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    x = torch.tensor([1.0, 1.0, 1.0, 1.0])  # L1-bound: factor 4/2 = 2
    assert torch.allclose(c.shift_inside(x), torch.full((4,), 0.5))


def test_k_support_norm_special_cases() -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(9, generator=gen, dtype=torch.float64)
        assert math.isclose(float(k_support_norm(x, 1)), float(x.abs().sum()), rel_tol=1e-12)
        assert math.isclose(float(k_support_norm(x, 9)), float(x.norm()), rel_tol=1e-12)
        # norms increase as k decreases: ||x||_2 <= ||x||_(k) <= ||x||_1
        vals = [float(k_support_norm(x, k)) for k in range(1, 10)]
        assert all(a >= b - 1e-12 for a, b in zip(vals, vals[1:]))


def _fw_min_distance_sq(cset, target: torch.Tensor, iters: int = 3000) -> tuple[float, float]:
    """Frank-Wolfe with exact line search on f(y) = ||y - target||^2 over the set.

    Returns (f(y_T), lower bound f(y) - gap_min); the FW gap certifies f* >= f(y) - gap."""
    y = torch.zeros_like(target)
    lower = -math.inf
    for _ in range(iters):
        grad = 2 * (y - target)
        v = cset.lmo(grad)
        d = v - y
        gap = float(-(grad @ d))
        f = float((y - target).pow(2).sum())
        lower = max(lower, f - gap)
        dd = float(d @ d)
        if dd == 0:
            break
        y = y + min(1.0, max(0.0, gap / (2 * dd))) * d
    return float((y - target).pow(2).sum()), lower


def test_k_support_norm_is_the_gauge_of_the_ball() -> None:
    # x / (1.03 ||x||_(k)) lies in conv{k-sparse, ||v|| <= 1} (FW drives its distance to ~0), while
    # x / (0.97 ||x||_(k)) is provably outside (the FW gap certifies a positive distance).
    gen = torch.Generator().manual_seed(2)
    n = 7
    for k in (2, 3, 5):
        ball = KSupportNormBall(n=n, k=k, radius=1.0)
        for _ in range(3):
            x = torch.randn(n, generator=gen, dtype=torch.float64)
            norm = float(k_support_norm(x, k))
            inside, _ = _fw_min_distance_sq(ball, x / (norm * 1.03))
            assert inside < 1e-6
            _, lower = _fw_min_distance_sq(ball, x / (norm * 0.97))
            assert lower > 0


def test_k_support_norm_hand_example() -> None:
    # x = (1, 1, 1), k = 2: x = (1/2)[(1,1,0) + (0,1,1) + (1,0,1)], norm 3·√2/2 = √4.5
    assert math.isclose(
        float(k_support_norm(torch.tensor([1.0, 1.0, 1.0]), 2)), math.sqrt(4.5), rel_tol=1e-6
    )
    # x = (3, 2, 0), k = 2: 2-sparse, so the norm is the L2 norm
    assert math.isclose(
        float(k_support_norm(torch.tensor([3.0, 2.0, 0.0]), 2)), math.sqrt(13), rel_tol=1e-6
    )


def test_unconstrained() -> None:
    c = Unconstrained(5)
    x = torch.randn(5) * 1e6
    assert c.contains(x) and torch.equal(c.shift_inside(x), x)
    assert math.isinf(c.l2_diameter)
    with pytest.raises(ValueError, match="no linear minimization oracle"):
        c.lmo(x)


@pytest.mark.parametrize(
    "build, bad",
    [
        (lambda: KSparsePolytope(n=5, k=0, radius=1.0), "k: 0"),
        (lambda: KSparsePolytope(n=5, k=6, radius=1.0), "k: 6"),
        (lambda: KSparsePolytope(n=5, k=2, radius=0.0), "radius: 0.0"),
        (lambda: KSparsePolytope(n=5, k=2, radius=-1.0), "radius: -1.0"),
        (lambda: KSparsePolytope(n=5, k=2, radius=float("nan")), "radius: nan"),
        (lambda: KSparsePolytope(n=5, k=2), "exactly one"),
        (lambda: KSparsePolytope(n=5, k=2, radius=1.0, l2_diameter=2.0), "exactly one"),
        (lambda: KSparsePolytope(n=0, k=1, radius=1.0), "n: 0"),
        (lambda: KSupportNormBall(n=5, k=0, radius=1.0), "k: 0"),
        (lambda: KSupportNormBall(n=5, k=9, radius=1.0), "k: 9"),
        (lambda: LpBall(n=5, p=0.5, radius=1.0), "p: 0.5"),
        (lambda: LpBall(n=5, p="two", radius=1.0), "p: 'two'"),
        (lambda: LpBall(n=5, p=2, radius=-3.0), "radius: -3.0"),
        (lambda: LpBall(n=5, p=2, l2_diameter=0), "l2_diameter: 0"),
        (lambda: make_constraint("l3", 5, radius=1.0), "kind: 'l3'"),
        (lambda: make_constraint("k_sparse", 5, radius=1.0), "k: None"),
    ],
)
def test_bad_arguments_raise_naming_the_value(build, bad: str) -> None:
    with pytest.raises(ValueError, match="Invalid") as info:
        build()
    assert bad in str(info.value)


def test_wrong_numel_is_refused() -> None:
    with pytest.raises(ValueError, match="7 elements"):
        KSparsePolytope(n=5, k=2, radius=1.0).lmo(torch.randn(7))
