"""NMSparsePolytope: LMO against vertex enumeration and random feasible points, sizes, gauge."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from sfwprune.constraints import NMSparsePolytope, constraint_from_group, make_constraint


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def group_vertices(m: int, k: int, radius: float) -> list[torch.Tensor]:
    rows = []
    for support in itertools.combinations(range(m), k):
        for signs in itertools.product((-1.0, 1.0), repeat=k):
            v = torch.zeros(m)
            v[list(support)] = radius * torch.tensor(signs)
            rows.append(v)
    return rows


def product_vertices(groups: int, m: int, k: int, radius: float) -> torch.Tensor:
    per_group = group_vertices(m, k, radius)
    return torch.stack([torch.cat(c) for c in itertools.product(per_group, repeat=groups)])


@pytest.mark.parametrize(("groups", "m"), [(1, 3), (2, 2), (2, 3), (3, 2), (2, 4)])
def test_lmo_matches_vertex_enumeration(groups: int, m: int) -> None:
    gen = torch.Generator().manual_seed(groups * 10 + m)
    for k in range(1, m + 1):
        cset = NMSparsePolytope(n=groups * m, k=k, group_size=m, radius=0.7)
        verts = product_vertices(groups, m, k, 0.7)
        for _ in range(3):
            g = torch.randn(groups * m, generator=gen)
            v = cset.lmo(g)
            assert torch.isclose(v @ g, (verts @ g).min(), atol=1e-12)
            assert cset.contains(v)
        # Diameter: the largest distance between two vertices.
        assert math.isclose(cset.l2_diameter, float(torch.cdist(verts, verts).max()), rel_tol=1e-12)


def test_lmo_beats_random_feasible_points() -> None:
    gen = torch.Generator().manual_seed(0)
    cset = NMSparsePolytope(n=6 * 8, k=2, group_size=8, radius=0.3)
    for _ in range(20):
        g = torch.randn(48, generator=gen)
        v = cset.lmo(g)
        u = cset.shift_inside(torch.randn(48, generator=gen) * 5)
        assert cset.contains(u)
        assert v @ g <= u @ g + 1e-12


def test_lmo_per_group_top_n_exact() -> None:
    cset = NMSparsePolytope(n=8, k=2, group_size=4, radius=2.0)
    g = torch.tensor([[0.1, -3.0, 2.0, 0.0, 1.0, 0.5, -0.2, 4.0]])
    v = cset.lmo(g)
    assert v.shape == g.shape and v.dtype == g.dtype
    assert v.tolist() == [[0.0, 2.0, -2.0, 0.0, -2.0, 0.0, 0.0, -2.0]]
    # A zero gradient gives the zero vertex (sign 0), not an arbitrary one.
    assert torch.count_nonzero(cset.lmo(torch.zeros(8))) == 0
    # float32 kept
    assert cset.lmo(torch.randn(2, 4, dtype=torch.float32)).dtype == torch.float32


def test_gauge_and_shift_inside_are_minimal() -> None:
    cset = NMSparsePolytope(n=8, k=2, group_size=4, radius=1.0)
    # group 1 is inside; group 2 breaks the L1 bound (sum 3 > 2): factor 1.5
    x = torch.tensor([0.5, 0.5, 0.0, 0.0, 0.75, 0.75, 0.75, 0.75])
    assert math.isclose(float(cset.scale_factor(x)), 1.5)
    assert not cset.contains(x)
    y = cset.shift_inside(x)
    assert cset.contains(y) and math.isclose(float(cset.scale_factor(y)), 1.0)
    assert torch.allclose(y, x / 1.5)
    # an L_inf violation: factor 3
    x = torch.tensor([3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert math.isclose(float(cset.scale_factor(x)), 3.0)
    inside = torch.full((8,), 0.25)
    assert torch.equal(cset.shift_inside(inside), inside)


def test_group_values_round_trip_and_sizes() -> None:
    cset = NMSparsePolytope(n=16, k=2, group_size=4, l2_diameter=8.0)
    assert math.isclose(cset.radius, 8.0 / (2 * math.sqrt(2 * 4)))
    group = cset.to_group()
    assert group["constraint"] == "n_m" and group["k"] == 2 and group["group_size"] == 4
    again = constraint_from_group(group, 16)
    assert isinstance(again, NMSparsePolytope) and again.radius == cset.radius


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 8, "k": 3, "group_size": 2}, "Invalid N:M: 3:2"),
        ({"n": 10, "k": 2, "group_size": 4}, "Invalid M: 4"),
        ({"n": 8, "k": 0, "group_size": 4}, "Invalid N: 0"),
        ({"n": 8, "k": 2, "group_size": 0}, "Invalid M: 0"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NMSparsePolytope(radius=1.0, **kwargs)


def test_make_constraint_needs_group_size() -> None:
    with pytest.raises(ValueError, match="group_size=None"):
        make_constraint("n_m", 8, k=2, radius=1.0)


def _steps(model: torch.nn.Module, groups: list[dict], steps: int = 4) -> list[float]:
    from sfwprune import SFW

    # the per-tensor reference loop (where the dispatcher sends every set but K-sparse)
    opt = SFW(groups, lr=0.5, momentum=0.9, foreach=False)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 12, 12, generator=gen)
    y = torch.randint(0, 10, (32,), generator=gen)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        for group in opt.param_groups:
            for p in group["params"]:
                assert constraint_from_group(group, p.numel()).contains(p), group["name"]
    return losses


def test_constraint_groups_n_m_rule_and_training() -> None:
    from sfwprune.constraints import constraint_groups
    from sfwprune.models import LeNet5

    torch.manual_seed(0)
    model = LeNet5((1, 12, 12), 10).double()
    groups = constraint_groups(model, "n_m", n=2, m=4)
    by_name = {g["name"]: g for g in groups}
    # rows of 1·5·5 = 25 and 6·5·5 = 150 are not multiples of 4: K-sparse; Linear rows are.
    assert by_name["features.0.weight"]["constraint"] == "k_sparse"
    assert by_name["features.3.weight"]["constraint"] == "k_sparse"
    for name in ("classifier.0.weight", "classifier.2.weight", "classifier.4.weight"):
        assert (by_name[name]["constraint"], by_name[name]["k"]) == ("n_m", 2)
        assert by_name[name]["group_size"] == 4
    assert all(by_name[n]["constraint"] == "k_sparse" for n in by_name if n.endswith("bias"))
    # τ from the expected init norm: D = 2·15·E||θ|| = 2τ√(N·numel/M)
    fc = by_name["classifier.2.weight"]
    cset = constraint_from_group(fc, 120 * 84)
    assert math.isclose(cset.l2_diameter, 2 * cset.radius * math.sqrt(2 * 120 * 84 / 4))
    losses = _steps(model, groups)
    assert losses[-1] < losses[0]


def test_constraint_groups_channel_rule_and_training() -> None:
    from sfwprune.constraints import constraint_groups
    from sfwprune.models import LeNet5

    torch.manual_seed(0)
    model = LeNet5((1, 12, 12), 10).double()
    groups = constraint_groups(model, "channel", k_frac=0.25)
    by_name = {g["name"]: g for g in groups}
    expected = {  # (K = max(1, round(0.25·out)), group size = row length)
        "features.0.weight": (2, 25),
        "features.3.weight": (4, 150),
        "classifier.0.weight": (30, by_name["classifier.0.weight"]["n"] // 120),
        "classifier.2.weight": (21, 120),
    }
    for name, (k, size) in expected.items():
        assert by_name[name]["constraint"] == "channel"
        assert (by_name[name]["k"], by_name[name]["group_size"]) == (k, size)
    # the output layer's units are the classes: K-sparse, never channel-constrained
    assert by_name["classifier.4.weight"]["constraint"] == "k_sparse"
    losses = _steps(model, groups)
    assert losses[-1] < losses[0]


def test_constraint_groups_state_dict_weights_only(tmp_path) -> None:
    from sfwprune import SFW
    from sfwprune.constraints import constraint_groups
    from sfwprune.models import LeNet300

    model = LeNet300((1, 4, 4), 10)
    opt = SFW(constraint_groups(model, "n_m", n=1, m=4), lr=0.1, foreach=False)
    model(torch.randn(2, 1, 4, 4)).sum().backward()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert loaded["param_groups"][0]["group_size"] == 4


def test_constraint_groups_bad_n_m() -> None:
    from sfwprune.constraints import constraint_groups

    with pytest.raises(ValueError, match="Invalid N:M: 5:4"):
        constraint_groups(torch.nn.Linear(8, 2), "n_m", n=5, m=4)
