"""constraint_groups: sizes from initialization (docs/algorithm.md §3), include filters, feasibility."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sfwprune import constraint_groups
from sfwprune.constraints import expected_init_norms, k_from_fraction


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)
    )


def test_k_formula() -> None:
    assert k_from_fraction(1000, 0.05, 10) == 50
    assert k_from_fraction(100, 0.05, 10) == 10  # k_min
    assert k_from_fraction(8, 0.05, 10) == 8  # capped at numel
    assert k_from_fraction(1999, 0.01, 10) == 19


def test_groups_sized_from_expected_init_norm() -> None:
    model = _net()
    groups = constraint_groups(model, "k_sparse", k_frac=0.05, k_min=10, value=15.0)
    by_name = {g["name"]: g for g in groups}
    assert list(by_name) == ["0.weight", "0.bias", "1.weight", "1.bias", "4.weight", "4.bias"]
    # BN weight inits to ones: E||θ|| = √8; BN bias inits to zeros: fallback norm 1. Keyed by
    # name, so the two (same shape) don't share a norm (the public code's shape-keyed bug).
    bn_w, bn_b = by_name["1.weight"], by_name["1.bias"]
    assert bn_w["k"] == 8 and bn_b["k"] == 8
    assert math.isclose(bn_w["radius"] * 2 * math.sqrt(8), 2 * 15.0 * math.sqrt(8), rel_tol=1e-6)
    assert math.isclose(bn_b["radius"] * 2 * math.sqrt(8), 2 * 15.0 * 1.0, rel_tol=1e-6)
    # Linear weight: kaiming_uniform(a=√5) -> U(-b, b), b = 1/√fan_in: E||θ||² = numel·b²/3
    lin = by_name["4.weight"]
    numel, fan_in = 10 * 128, 128
    expected_norm = math.sqrt(numel / (3 * fan_in))
    k = k_from_fraction(numel, 0.05, 10)
    assert lin["k"] == k
    d = lin["radius"] * 2 * math.sqrt(k)
    assert math.isclose(d, 2 * 15.0 * expected_norm, rel_tol=0.02)


def test_expected_norms_leave_model_and_rng_alone() -> None:
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    expected_init_norms(model)
    after_call = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after_call, torch.rand(3))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_params_moved_inside_and_include_filter() -> None:
    model = _net()
    with torch.no_grad():
        model[4].weight.mul_(1000)  # far outside any init-sized set
    groups = constraint_groups(model, "k_sparse", value=1.0, include="weights")
    kinds = {g["name"]: g["constraint"] for g in groups}
    assert kinds == {
        "0.weight": "k_sparse",
        "0.bias": "unconstrained",
        "1.weight": "unconstrained",
        "1.bias": "unconstrained",
        "4.weight": "k_sparse",
        "4.bias": "unconstrained",
    }
    from sfwprune.constraints import constraint_from_group

    for g in groups:
        assert constraint_from_group(g, g["params"][0].numel()).contains(g["params"][0])
    skip_bn = constraint_groups(_net(), "l2", include=lambda name, p: not name.startswith("1."))
    assert [g["constraint"] for g in skip_bn] == [
        "lp",
        "lp",
        "unconstrained",
        "unconstrained",
        "lp",
        "lp",
    ]


def test_modes_radius_and_diameter() -> None:
    g = constraint_groups(_net(), "l2", mode="radius", value=3.0)
    assert all(x["radius"] == 3.0 for x in g)
    g = constraint_groups(_net(), "k_sparse", mode="diameter", value=4.0, k_frac=0.5)
    for x in g:
        assert math.isclose(2 * x["radius"] * math.sqrt(x["k"]), 4.0)


def test_frozen_params_left_out() -> None:
    model = _net()
    model[0].weight.requires_grad_(False)
    assert "0.weight" not in [g["name"] for g in constraint_groups(model)]


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        ({"kind": "sparse"}, "kind: 'sparse'"),
        ({"mode": "init"}, "mode: 'init'"),
        ({"value": -1.0}, "value: -1.0"),
        ({"radius_from": "init"}, "radius_from: 'init'"),
        ({"radius_scale": 0.0}, "radius_scale: 0.0"),
        ({"k_frac": 0.0}, "k_frac: 0.0"),
        ({"k_frac": 1.5}, "k_frac: 1.5"),
        ({"k_min": 0}, "k_min: 0"),
        ({"include": "biases"}, "include: 'biases'"),
    ],
)
def test_bad_arguments(kwargs, bad) -> None:
    with pytest.raises(ValueError, match="Invalid") as info:
        constraint_groups(_net(), **kwargs)
    assert bad in str(info.value)


def test_old_names_value_and_mode_give_the_same_sets() -> None:
    new = constraint_groups(_net(), "l2", radius_from="radius", radius_scale=3.0)
    old = constraint_groups(_net(), "l2", mode="radius", value=3.0)
    assert [g["radius"] for g in new] == [g["radius"] for g in old]
