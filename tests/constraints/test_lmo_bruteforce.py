"""Every LMO against brute force on small n, and against random feasible points."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from sfwprune import KSparsePolytope, KSupportNormBall, LpBall


@pytest.fixture(autouse=True)
def _float64():
    """These tests compare exact optima: float64, restored afterwards (no global leak)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def k_sparse_vertices(n: int, k: int, radius: float) -> torch.Tensor:
    rows = []
    for support in itertools.combinations(range(n), k):
        for signs in itertools.product((-1.0, 1.0), repeat=k):
            v = torch.zeros(n)
            v[list(support)] = radius * torch.tensor(signs)
            rows.append(v)
    return torch.stack(rows)


def l1_vertices(n: int, radius: float) -> torch.Tensor:
    eye = torch.eye(n) * radius
    return torch.cat([eye, -eye])


def linf_vertices(n: int, radius: float) -> torch.Tensor:
    return radius * torch.tensor(list(itertools.product((-1.0, 1.0), repeat=n)))


def max_pairwise_distance(vertices: torch.Tensor) -> float:
    return float(torch.cdist(vertices, vertices).max())


GRADS = [
    torch.randn(n, generator=torch.Generator().manual_seed(n * 7 + s), dtype=torch.float64)
    for n in range(1, 6)
    for s in range(4)
]


@pytest.mark.parametrize("g", GRADS, ids=lambda g: f"n{g.numel()}")
def test_k_sparse_lmo_matches_vertex_enumeration(g: torch.Tensor) -> None:
    n = g.numel()
    for k in range(1, n + 1):
        cset = KSparsePolytope(n=n, k=k, radius=0.7)
        v = cset.lmo(g)
        best = (k_sparse_vertices(n, k, 0.7) @ g).min()
        assert torch.isclose(v @ g, best, atol=1e-12)
        # the LMO returns a vertex: k nonzeros of magnitude τ
        assert int((v != 0).sum()) == k
        assert torch.allclose(v[v != 0].abs(), torch.tensor(0.7))


@pytest.mark.parametrize("g", GRADS, ids=lambda g: f"n{g.numel()}")
def test_l1_and_linf_lmo_match_vertex_enumeration(g: torch.Tensor) -> None:
    n = g.numel()
    for p, vertices in ((1, l1_vertices(n, 1.3)), (math.inf, linf_vertices(n, 1.3))):
        v = LpBall(n=n, p=p, radius=1.3).lmo(g)
        assert torch.isclose(v @ g, (vertices @ g).min(), atol=1e-12)


@pytest.mark.parametrize("g", GRADS, ids=lambda g: f"n{g.numel()}")
def test_k_support_lmo_matches_support_enumeration(g: torch.Tensor) -> None:
    # min over conv{k-sparse, ||v||_2 <= r} of <g, v> = min over supports S, |S| = k, of -r||g_S||.
    n = g.numel()
    for k in range(1, n + 1):
        v = KSupportNormBall(n=n, k=k, radius=2.0).lmo(g)
        best = min(-2.0 * float(g[list(s)].norm()) for s in itertools.combinations(range(n), k))
        assert math.isclose(float(v @ g), best, abs_tol=1e-12)
        assert math.isclose(float(v.norm()), 2.0, rel_tol=1e-12)


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 3.0, 7.0, math.inf])
def test_lp_lmo_attains_holder_bound(p: float) -> None:
    # min_{||v||_p <= r} <g, v> = -r ||g||_q (Hölder), attained by the LMO's vertex.
    gen = torch.Generator().manual_seed(3)
    for n in (1, 2, 5, 40):
        g = torch.randn(n, generator=gen)
        q = 1.0 if math.isinf(p) else (math.inf if p == 1 else p / (p - 1))
        cset = LpBall(n=n, p=p, radius=0.9)
        v = cset.lmo(g)
        assert math.isclose(
            float(v @ g), -0.9 * float(torch.linalg.vector_norm(g, ord=q)), rel_tol=1e-9
        )
        assert math.isclose(float(torch.linalg.vector_norm(v, ord=p)), 0.9, rel_tol=1e-9)


def random_feasible(cset, n: int, gen: torch.Generator, count: int = 200) -> torch.Tensor:
    """Random points of the set: random directions and scales, radially shifted inside."""
    pts = torch.randn(count, n, generator=gen) * torch.rand(count, 1, generator=gen) * 5
    heavy = torch.randn(count, n, generator=gen) ** 3  # spiky points near sparse vertices
    out = []
    for x in torch.cat([pts, heavy]):
        y = cset.shift_inside(x)
        assert cset.contains(y)
        out.append(y)
    return torch.stack(out)


SETS = [
    lambda n: KSparsePolytope(n=n, k=max(1, n // 4), radius=0.3),
    lambda n: KSupportNormBall(n=n, k=max(1, n // 3), radius=1.7),
    lambda n: LpBall(n=n, p=1, radius=1.0),
    lambda n: LpBall(n=n, p=2, radius=1.0),
    lambda n: LpBall(n=n, p=math.inf, radius=0.2),
    lambda n: LpBall(n=n, p=2.5, radius=3.0),
]


@pytest.mark.parametrize("make", SETS)
def test_lmo_beats_random_feasible_points(make) -> None:
    gen = torch.Generator().manual_seed(11)
    for n in (3, 17, 64):
        cset = make(n)
        pts = random_feasible(cset, n, gen)
        for _ in range(5):
            g = torch.randn(n, generator=gen)
            v = cset.lmo(g)
            assert cset.contains(v)
            assert float(v @ g) <= float((pts @ g).min()) + 1e-9


def test_l2_diameter_matches_largest_vertex_distance() -> None:
    for n in range(1, 6):
        for k in range(1, n + 1):
            c = KSparsePolytope(n=n, k=k, radius=0.5)
            assert math.isclose(c.l2_diameter, max_pairwise_distance(k_sparse_vertices(n, k, 0.5)))
        c1 = LpBall(n=n, p=1, radius=2.0)
        assert math.isclose(c1.l2_diameter, max_pairwise_distance(l1_vertices(n, 2.0)))
        cinf = LpBall(n=n, p=math.inf, radius=2.0)
        assert math.isclose(cinf.l2_diameter, max_pairwise_distance(linf_vertices(n, 2.0)))
        assert math.isclose(LpBall(n=n, p=2, radius=2.0).l2_diameter, 4.0)
        # K-support ball: vertices are k-sparse vectors of norm r; ±r e_1 are 2r apart, the max.
        assert math.isclose(KSupportNormBall(n=n, k=1, radius=2.0).l2_diameter, 4.0)


def test_l2_diameter_constructor_inverts() -> None:
    for cset in (
        KSparsePolytope(n=50, k=5, l2_diameter=3.0),
        LpBall(n=50, p=1, l2_diameter=3.0),
        LpBall(n=50, p=math.inf, l2_diameter=3.0),
        LpBall(n=50, p=4, l2_diameter=3.0),
        KSupportNormBall(n=50, k=5, l2_diameter=3.0),
    ):
        assert math.isclose(cset.l2_diameter, 3.0)


def test_lmo_keeps_shape_dtype_device() -> None:
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        g = torch.randn(3, 4, 5).to(dtype)
        for cset in (
            KSparsePolytope(n=60, k=7, radius=1.0),
            LpBall(n=60, p=1, radius=1.0),
            LpBall(n=60, p=2, radius=1.0),
            LpBall(n=60, p=3, radius=1.0),
            LpBall(n=60, p=math.inf, radius=1.0),
            KSupportNormBall(n=60, k=7, radius=1.0),
        ):
            v = cset.lmo(g)
            assert v.shape == g.shape and v.dtype == g.dtype and v.device == g.device


def test_zero_gradient_gives_zero_vertex() -> None:
    g = torch.zeros(6)
    assert torch.equal(KSparsePolytope(n=6, k=2, radius=1.0).lmo(g), g)
    assert torch.equal(KSupportNormBall(n=6, k=2, radius=1.0).lmo(g), g)
    assert torch.equal(LpBall(n=6, p=2, radius=1.0).lmo(g), g)
    assert torch.equal(LpBall(n=6, p=3, radius=1.0).lmo(g), g)
    assert torch.equal(LpBall(n=6, p=math.inf, radius=1.0).lmo(g), g)


def test_hand_made_cases() -> None:
    g = torch.tensor([0.1, -3.0, 2.0, 0.0])
    assert torch.equal(
        KSparsePolytope(n=4, k=2, radius=1.0).lmo(g), torch.tensor([0.0, 1.0, -1.0, 0.0])
    )
    assert torch.equal(LpBall(n=4, p=1, radius=2.0).lmo(g), torch.tensor([0.0, 2.0, 0.0, 0.0]))
    assert torch.equal(
        LpBall(n=4, p=math.inf, radius=2.0).lmo(g), torch.tensor([-2.0, 2.0, -2.0, 0.0])
    )
    v = KSupportNormBall(n=4, k=2, radius=13.0).lmo(torch.tensor([0.0, 12.0, -5.0, 1.0]))
    assert torch.allclose(v, torch.tensor([0.0, -12.0, 5.0, 0.0]))
