"""GroupKSparsePolytope: LMO value, random feasible points, diameter, gauge, hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch

from sfwprune.constraints import GroupKSparsePolytope, constraint_from_group


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def random_feasible(cset: GroupKSparsePolytope, gen: torch.Generator) -> torch.Tensor:
    """Points spread over the set: scaled to its boundary, or convex mixtures of vertices."""
    x = torch.randn(cset.n, generator=gen) * torch.rand(1, generator=gen) * 10
    return cset.shift_inside(x)


@pytest.mark.parametrize(("groups", "size"), [(1, 3), (3, 1), (4, 2), (5, 3)])
def test_lmo_value_is_minus_tau_sum_of_k_largest_norms(groups: int, size: int) -> None:
    gen = torch.Generator().manual_seed(groups * 7 + size)
    for k in range(1, groups + 1):
        cset = GroupKSparsePolytope(n=groups * size, k=k, group_size=size, radius=0.6)
        for _ in range(4):
            g = torch.randn(groups * size, generator=gen)
            v = cset.lmo(g)
            norms = torch.linalg.vector_norm(g.view(groups, size), dim=1)
            best = -0.6 * norms.topk(k).values.sum()
            assert torch.isclose(v @ g, best, atol=1e-12)
            assert cset.contains(v)
            # exactly k active groups, each on the group sphere of radius τ
            vn = torch.linalg.vector_norm(v.view(groups, size), dim=1)
            assert int((vn > 0).sum()) == k
            assert torch.allclose(vn[vn > 0], torch.full((k,), 0.6))
            for _ in range(5):
                u = random_feasible(cset, gen)
                assert cset.contains(u)
                assert v @ g <= u @ g + 1e-12


def test_lmo_hand_made_and_zero_groups() -> None:
    cset = GroupKSparsePolytope(n=6, k=2, group_size=2, radius=1.0)
    g = torch.tensor([3.0, 4.0, 0.0, 0.0, 0.0, 0.0]).view(3, 2)  # shape kept
    v = cset.lmo(g)
    assert v.shape == (3, 2)
    # the second pick has a zero gradient: it stays 0 (no NaN from 0/0)
    assert torch.allclose(v, torch.tensor([[-0.6, -0.8], [0.0, 0.0], [0.0, 0.0]]), atol=1e-15)
    assert torch.count_nonzero(v[1:]) == 0
    assert cset.lmo(torch.zeros(6, dtype=torch.float32)).dtype == torch.float32
    assert torch.count_nonzero(cset.lmo(torch.zeros(6))) == 0


def test_diameter_attained_and_not_exceeded() -> None:
    gen = torch.Generator().manual_seed(1)
    cset = GroupKSparsePolytope(n=12, k=2, group_size=3, radius=0.5)
    g = torch.randn(12, generator=gen)
    v, w = cset.lmo(g), cset.lmo(-g)
    assert math.isclose(float(torch.linalg.vector_norm(v - w)), cset.l2_diameter, rel_tol=1e-12)
    assert math.isclose(cset.l2_diameter, 2 * 0.5 * math.sqrt(2))
    for _ in range(50):
        a, b = random_feasible(cset, gen), random_feasible(cset, gen)
        assert float(torch.linalg.vector_norm(a - b)) <= cset.l2_diameter + 1e-12


def test_gauge_and_shift_inside() -> None:
    cset = GroupKSparsePolytope(n=6, k=1, group_size=2, radius=1.0)
    x = torch.tensor([0.6, 0.8, 0.0, 0.0, 0.0, 0.0])  # one group on the sphere: on the boundary
    assert math.isclose(float(cset.scale_factor(x)), 1.0) and cset.contains(x)
    x = torch.tensor([0.6, 0.8, 0.6, 0.8, 0.0, 0.0])  # Σ r_g = 2 > Kτ = 1: factor 2
    assert math.isclose(float(cset.scale_factor(x)), 2.0) and not cset.contains(x)
    y = cset.shift_inside(x)
    assert torch.allclose(y, x / 2) and math.isclose(float(cset.scale_factor(y)), 1.0)
    wide = GroupKSparsePolytope(n=6, k=3, group_size=2, radius=1.0)
    x = torch.tensor([3.0, 4.0, 0.0, 0.0, 0.0, 0.0])  # a group norm of 5 > τ: factor 5
    assert math.isclose(float(wide.scale_factor(x)), 5.0)


def test_group_values_round_trip() -> None:
    cset = GroupKSparsePolytope(n=20, k=2, group_size=5, l2_diameter=4.0)
    assert math.isclose(cset.radius, 4.0 / (2 * math.sqrt(2)))
    group = cset.to_group()
    assert (group["constraint"], group["k"], group["group_size"]) == ("channel", 2, 5)
    again = constraint_from_group(group, 20)
    assert isinstance(again, GroupKSparsePolytope) and again.radius == cset.radius


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 6, "k": 4, "group_size": 2}, "Invalid k: 4"),
        ({"n": 7, "k": 1, "group_size": 2}, "Invalid group_size: 2"),
        ({"n": 6, "k": 1, "group_size": 0}, "Invalid group_size: 0"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GroupKSparsePolytope(radius=1.0, **kwargs)
