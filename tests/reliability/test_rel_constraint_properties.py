"""Property-based tests of every constraint set (hypothesis, float64).

For random shapes, k, radii, p and gradients:
- the LMO output is feasible, has the gradient's shape and dtype, and attains the closed-form
  minimum ``min_{v in C} <g, v> = -radius · (dual norm of g)``;
- it is optimal against random feasible points built *from the set's definition* (not from the
  class under test): ``<g, v> <= <g, u> + tol``;
- ``shift_inside`` lands inside, moves a point radially, and is a no-op for inside points.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sfwprune.constraints import KSparsePolytope, KSupportNormBall, LpBall, Unconstrained

SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
F64 = torch.float64


@st.composite
def shapes(draw) -> tuple[int, ...]:
    return tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))


@st.composite
def tensors(draw, shape: tuple[int, ...], scale: float = 1e3) -> torch.Tensor:
    """A float64 tensor of ``shape``: mixed magnitudes, exact zeros and ties included."""
    n = math.prod(shape)
    pool = st.one_of(
        st.floats(-scale, scale, allow_nan=False, allow_infinity=False),
        st.sampled_from([0.0, 1.0, -1.0, 1e-12]),
    )
    values = draw(st.lists(pool, min_size=n, max_size=n))
    return torch.tensor(values, dtype=F64).reshape(shape)


radii = st.floats(1e-3, 1e3, allow_nan=False, allow_infinity=False)
p_values = st.one_of(st.sampled_from([1.0, 2.0, math.inf]), st.floats(1.1, 8.0))


def _tol(*scales: float) -> float:
    return 1e-9 * (1.0 + max(scales))


# --- feasible points from the definitions -------------------------------------------------


def _k_sparse_points(gen: torch.Generator, n: int, k: int, radius: float, count: int = 8):
    """Points of ``B_1(k·r) ∩ B_inf(r)``: random vectors divided by their own gauge (computed
    here from the definition), times a random factor in [0, 1]."""
    for _ in range(count):
        x = torch.randn(n, generator=gen, dtype=F64)
        gauge = max(float(x.abs().max()) / radius, float(x.abs().sum()) / (k * radius))
        yield x / gauge * float(torch.rand((), generator=gen, dtype=F64)) if gauge > 0 else x


def _k_support_points(gen: torch.Generator, n: int, k: int, radius: float, count: int = 8):
    """Convex combinations of k-sparse vectors of L2 norm <= r (the set's definition)."""
    for _ in range(count):
        parts = []
        for _ in range(3):
            v = torch.zeros(n, dtype=F64)
            idx = torch.randperm(n, generator=gen)[:k]
            v[idx] = torch.randn(k, generator=gen, dtype=F64)
            v *= radius * float(torch.rand((), generator=gen, dtype=F64)) / float(v.norm())
            parts.append(v)
        w = torch.rand(3, generator=gen, dtype=F64)
        w /= w.sum()
        yield sum(wi * v for wi, v in zip(w, parts))


def _lp_points(gen: torch.Generator, n: int, p: float, radius: float, count: int = 8):
    for _ in range(count):
        x = torch.randn(n, generator=gen, dtype=F64)
        yield (
            x
            / float(torch.linalg.vector_norm(x, ord=p))
            * radius
            * float(torch.rand((), generator=gen, dtype=F64))
        )


def _check_lmo(cset, g: torch.Tensor, points, best: float) -> None:
    v = cset.lmo(g)
    assert v.shape == g.shape and v.dtype == g.dtype
    assert torch.isfinite(v).all()
    assert cset.contains(v, atol=1e-9)
    value = float((g * v).sum())
    gnorm = float(g.abs().sum())
    tol = _tol(gnorm * cset.l2_diameter)
    assert math.isclose(value, best, rel_tol=1e-9, abs_tol=tol), (value, best)
    for u in points:
        u = u.reshape(g.shape)
        assert cset.contains(u, atol=1e-9)
        assert value <= float((g * u).sum()) + tol


def _check_shift_inside(cset, x: torch.Tensor, inside_points) -> None:
    y = cset.shift_inside(x)
    assert y.shape == x.shape and cset.contains(y, atol=1e-9)
    # radial: y = x / c with c >= 1, so y is x scaled by a factor in (0, 1]
    i = int(x.reshape(-1).abs().argmax())
    if x.reshape(-1)[i] != 0:
        factor = float(y.reshape(-1)[i] / x.reshape(-1)[i])
        assert 0.0 < factor <= 1.0 + 1e-12
        assert torch.allclose(y, factor * x, rtol=1e-9, atol=0.0)
    for u in inside_points:
        assert torch.equal(cset.shift_inside(u), u)  # a no-op inside


# --- the sets --------------------------------------------------------------------------------


@SETTINGS
@given(data=st.data(), shape=shapes(), radius=radii, seed=st.integers(0, 2**31 - 1))
def test_k_sparse_polytope(data, shape, radius, seed) -> None:
    n = math.prod(shape)
    k = data.draw(st.integers(1, n), label="k")
    g = data.draw(tensors(shape), label="g")
    cset = KSparsePolytope(n, k, radius)
    # min over the set: -r · (sum of the k largest |g_i|)
    best = -radius * float(torch.topk(g.reshape(-1).abs(), k).values.sum())
    gen = torch.Generator().manual_seed(seed)
    _check_lmo(cset, g, list(_k_sparse_points(gen, n, k, radius)), best)
    x = data.draw(tensors(shape, scale=1e4), label="x")
    _check_shift_inside(cset, x, [u.reshape(shape) for u in _k_sparse_points(gen, n, k, radius)])


@SETTINGS
@given(data=st.data(), shape=shapes(), radius=radii, seed=st.integers(0, 2**31 - 1))
def test_k_support_norm_ball(data, shape, radius, seed) -> None:
    n = math.prod(shape)
    k = data.draw(st.integers(1, n), label="k")
    g = data.draw(tensors(shape), label="g")
    # g = 0 or |g| < 1e-154 (its squares underflow): see test_lmo_of_a_zero_or_tiny_gradient
    assume(float(g.abs().max()) > 1e-100)
    cset = KSupportNormBall(n, k, radius)
    # dual of the k-support norm: the L2 norm of the k largest |g_i|
    best = -radius * float(torch.topk(g.reshape(-1).abs(), k).values.norm())
    gen = torch.Generator().manual_seed(seed)
    _check_lmo(cset, g, list(_k_support_points(gen, n, k, radius)), best)
    x = data.draw(tensors(shape, scale=1e4), label="x")
    inside = [u.reshape(shape) for u in _k_support_points(gen, n, k, radius)]
    _check_shift_inside(cset, x, inside)


@SETTINGS
@given(data=st.data(), shape=shapes(), radius=radii, p=p_values, seed=st.integers(0, 2**31 - 1))
def test_lp_ball(data, shape, radius, p, seed) -> None:
    n = math.prod(shape)
    g = data.draw(tensors(shape), label="g")
    # p = 2 with g = 0 or |g| < 1e-154: see test_lmo_of_a_zero_or_tiny_gradient
    assume(p != 2.0 or float(g.abs().max()) > 1e-100)
    cset = LpBall(n, p, radius)
    q = 1.0 if math.isinf(p) else (math.inf if p == 1.0 else p / (p - 1.0))
    best = -radius * float(torch.linalg.vector_norm(g.reshape(-1), ord=q))  # Hölder
    gen = torch.Generator().manual_seed(seed)
    _check_lmo(cset, g, list(_lp_points(gen, n, p, radius)), best)
    x = data.draw(tensors(shape, scale=1e4), label="x")
    _check_shift_inside(cset, x, [u.reshape(shape) for u in _lp_points(gen, n, p, radius)])


@settings(SETTINGS, max_examples=20)
@given(data=st.data(), shape=shapes())
def test_unconstrained(data, shape) -> None:
    n = math.prod(shape)
    cset = Unconstrained(n)
    x = data.draw(tensors(shape, scale=1e6), label="x")
    assert cset.contains(x)
    assert torch.equal(cset.shift_inside(x), x)
    assert math.isinf(cset.l2_diameter)


@settings(SETTINGS, max_examples=20)
@given(shape=shapes(), k_extra=st.integers(1, 5), radius=st.floats(-1e3, 0.0))
def test_invalid_sizes_are_refused(shape, k_extra, radius) -> None:
    n = math.prod(shape)
    for build in (
        lambda: KSparsePolytope(n, n + k_extra, 1.0),
        lambda: KSupportNormBall(n, 0, 1.0),
        lambda: KSparsePolytope(n, 1, radius),
        lambda: LpBall(n, 2.0, radius),
        lambda: LpBall(n, 1.0 - k_extra / 10, 1.0),
    ):
        try:
            build()
        except ValueError as exc:
            assert str(exc).startswith("Invalid ")
        else:
            raise AssertionError("accepted an invalid size")


def _zero_tiny_cases():
    sets = [KSparsePolytope(6, 2, 4.0), LpBall(6, 1.0, 4.0), LpBall(6, 3.0, 4.0),
            LpBall(6, math.inf, 4.0), LpBall(6, 2.0, 4.0), LpBall(6, 2.0, 1.0),
            KSupportNormBall(6, 2, 4.0), KSupportNormBall(6, 2, 1.0)]  # fmt: skip
    for cset in sets:
        for size in ("zero", "tiny"):
            yield pytest.param(cset, size, id=f"{size}-{cset!r}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cset, size", _zero_tiny_cases())
def test_lmo_of_a_zero_or_tiny_gradient(cset, dtype, size) -> None:
    # a dead unit, or a layer whose gradient is vanishingly small this step
    value = 0.0 if size == "zero" else (1e-25 if dtype == torch.float32 else 1e-170)
    g = torch.tensor([0.0, value, 0.0, -value / 2, 0.0, 0.0], dtype=dtype)
    v = cset.lmo(g)
    assert torch.isfinite(v).all(), v
    assert cset.contains(v.double(), atol=1e-6), v
