"""prune_: exact masks by scope/criterion, agreement with torch.nn.utils.prune, bad inputs."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn.utils.prune as tprune
from torch import nn

from sfwprune.prune import Ranking, prunable_parameters, prune_


def two_layer(w1: list[list[float]], w2: list[list[float]]) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(len(w1[0]), len(w1)), nn.Linear(len(w2[0]), len(w2)))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor(w1))
        net[1].weight.copy_(torch.tensor(w2))
        net[0].bias.fill_(0.01)  # smallest of all: must stay when include="weights"
        net[1].bias.fill_(0.01)
    return net


W1 = [[1.0, -5.0], [3.0, 0.5]]
W2 = [[2.0, -0.1, 4.0], [-0.7, 6.0, 0.2]]


def test_global_magnitude_hand_made():
    net = two_layer(W1, W2)
    masks = prune_(net, 4 / 10)  # 10 weights, prune |w| in {0.1, 0.2, 0.5, 0.7}
    assert list(masks) == ["0.weight", "1.weight"]
    assert masks["0.weight"].tolist() == [[True, True], [True, False]]
    assert masks["1.weight"].tolist() == [[True, False, True], [False, True, False]]
    assert net[0].weight.tolist() == [[1.0, -5.0], [3.0, 0.0]]
    assert net[1].weight.tolist() == [[2.0, 0.0, 4.0], [0.0, 6.0, 0.0]]
    assert net[0].bias.tolist() == pytest.approx([0.01, 0.01])


def test_layer_magnitude_hand_made():
    net = two_layer(W1, W2)
    masks = prune_(net, 0.5, scope="layer")  # round(2.0) = 2 of 4, round(3.0) = 3 of 6
    assert masks["0.weight"].tolist() == [[False, True], [True, False]]
    assert masks["1.weight"].tolist() == [[True, False, True], [False, True, False]]


def test_include_all_ranks_biases():
    net = two_layer(W1, W2)
    masks = prune_(net, 4 / 14, include="all")  # the four 0.01 biases go first
    assert list(masks) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert not masks["0.bias"].any() and not masks["1.bias"].any()
    assert masks["0.weight"].all() and masks["1.weight"].all()


def test_ties_broken_by_flat_index_within_and_across_tensors():
    net = two_layer([[1.0, 1.0], [1.0, 1.0]], [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    masks = prune_(net, 0.5)  # 5 of 10 equal weights: the first five in concatenated order
    assert masks["0.weight"].tolist() == [[False, False], [False, False]]
    assert masks["1.weight"].tolist() == [[False, True, True], [True, True, True]]
    net = two_layer([[1.0, 1.0], [1.0, 1.0]], [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    masks = prune_(net, 0.5, scope="layer")
    assert masks["0.weight"].tolist() == [[False, False], [True, True]]
    assert masks["1.weight"].tolist() == [[False, False, False], [True, True, True]]


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_random_hand_made_matches_the_generator_draws(scope):
    g = torch.Generator().manual_seed(3)
    r1 = torch.rand(4, generator=g, dtype=torch.float64)
    r2 = torch.rand(6, generator=g, dtype=torch.float64)
    if scope == "global":
        r = torch.cat([r1, r2])
        keep = r > r.sort().values[4]  # 5 lowest pruned
        expected = [keep[:4].view(2, 2), keep[4:].view(2, 3)]
    else:
        expected = [(r1 > r1.sort().values[1]).view(2, 2), (r2 > r2.sort().values[2]).view(2, 3)]
    net = two_layer(W1, W2)
    masks = prune_(
        net, 0.5, scope=scope, criterion="random", generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(masks["0.weight"], expected[0])
    assert torch.equal(masks["1.weight"], expected[1])


def test_random_masks_reproduce_differ_across_seeds_and_ignore_values(make_lenet300):
    def masks(seed, net_seed=0):
        gen = torch.Generator().manual_seed(seed)
        return prune_(make_lenet300(net_seed), 0.9, criterion="random", generator=gen)

    a, b, c, d = masks(1), masks(1), masks(2), masks(1, net_seed=5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a[k], d[k]) for k in a)  # weights do not matter
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("criterion", ["magnitude", "random"])
@pytest.mark.parametrize("sparsity", [0.0, 0.123, 0.5, 0.95, 0.999, 1.0])
def test_measured_sparsity_is_exact_per_ranked_set(make_lenet300, scope, criterion, sparsity):
    net = make_lenet300()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    masks = prune_(net, sparsity, scope=scope, criterion=criterion)
    params = dict(net.named_parameters())
    sets = [list(masks)] if scope == "global" else [[n] for n in masks]
    for names in sets:
        n = sum(params[k].numel() for k in names)
        zeros = sum(int((params[k] == 0).sum()) for k in names)
        assert zeros == round(sparsity * n)  # init has no zeros: exact, not just within one
        assert sum(int((~masks[k]).sum()) for k in names) == zeros
    for name, p in params.items():
        if name in masks:
            assert masks[name].dtype == torch.bool and masks[name].shape == p.shape
            assert torch.equal(p[masks[name]], before[name][masks[name]])
            assert (p[~masks[name]] == 0).all()
        else:
            assert torch.equal(p, before[name])  # biases untouched


def test_global_magnitude_equals_torch_global_unstructured(lenet300):
    ref = copy.deepcopy(lenet300)
    layers = [(m, "weight") for m in ref.modules() if isinstance(m, nn.Linear)]
    tprune.global_unstructured(layers, pruning_method=tprune.L1Unstructured, amount=0.9)
    masks = prune_(lenet300, 0.9)
    weights = torch.cat([m.weight_orig.detach().abs().reshape(-1) for m, _ in layers])
    threshold = weights.sort().values[round(0.9 * weights.numel()) - 1]
    for (name, keep), (module, _) in zip(masks.items(), layers, strict=True):
        theirs = module.weight_mask.bool()
        tied = module.weight_orig.detach().abs() == threshold  # ties aside
        assert torch.equal(keep[~tied], theirs[~tied]), name
    assert sum(int(m.sum()) for m in masks.values()) == sum(
        int(m.weight_mask.sum()) for m, _ in layers
    )


def test_layer_magnitude_equals_torch_l1_unstructured(lenet300):
    ref = copy.deepcopy(lenet300)
    masks = prune_(lenet300, 0.7, scope="layer")
    for name, module in ref.named_modules():
        if isinstance(module, nn.Linear):
            tprune.l1_unstructured(module, "weight", amount=0.7)
            assert torch.equal(masks[f"{name}.weight"], module.weight_mask.bool())


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_selection_path_equals_one_sort_ranking_with_many_ties(scope):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 30), nn.Linear(30, 20))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randint(-3, 4, p.shape).float())  # heavy ties, some zeros
    ranking = Ranking(net, scope=scope, include="all")
    for s in [0.0, 0.1, 0.33, 0.5, 0.77, 1.0]:
        got = prune_(copy.deepcopy(net), s, scope=scope, include="all")
        want = ranking.masks(s)
        assert all(torch.equal(got[k], want[k]) for k in want), s


def test_weights_selection_covers_conv_and_linear_not_bn(convbn):
    names = [n for n, _ in prunable_parameters(convbn)]
    assert names == ["0.weight", "3.weight", "8.weight"]
    assert len(prunable_parameters(convbn, "all")) == len(list(convbn.parameters()))
    masks = prune_(convbn, 0.5)
    assert list(masks) == names
    assert convbn[1].weight.eq(1).all()  # BatchNorm affine untouched


def test_shared_parameter_ranked_once():
    lin = nn.Linear(5, 5, bias=False)
    net = nn.Sequential(lin, nn.ReLU(), lin)
    masks = prune_(net, 0.4)
    assert list(masks) == ["0.weight"]
    assert int((lin.weight == 0).sum()) == 10


BAD_SPARSITY = [-0.1, 1.5, math.nan, "0.5", None, True, math.inf]


@pytest.mark.parametrize("value", BAD_SPARSITY)
def test_bad_sparsity_raises(lenet300, value):
    with pytest.raises(ValueError, match=re.escape(f"Invalid sparsity: {value!r}")):
        prune_(lenet300, value)


@pytest.mark.parametrize(
    "kwarg, value",
    [
        ("scope", "model"),
        ("criterion", "l2"),
        ("include", "biases"),
        ("scope", None),
        ("generator", 42),
    ],
)
def test_unknown_options_raise(lenet300, kwarg, value):
    before = [p.detach().clone() for p in lenet300.parameters()]
    with pytest.raises(ValueError, match=re.escape(f"Invalid {kwarg}: {value!r}")):
        prune_(lenet300, 0.5, **{kwarg: value})
    assert all(torch.equal(a, b) for a, b in zip(before, lenet300.parameters(), strict=True))


def test_nothing_to_prune_and_nan_weights_raise():
    with pytest.raises(ValueError, match="no parameters to prune"):
        prune_(nn.Sequential(nn.BatchNorm1d(3)), 0.5)
    net = nn.Linear(3, 2)
    with torch.no_grad():
        net.weight[0, 0] = math.nan
    with pytest.raises(ValueError, match="'weight' contains NaN"):
        prune_(net, 0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_give_the_float32_masks(make_lenet300, dtype):
    # |w| rounded to the dtype may create ties, so start from weights exact in every dtype
    net = make_lenet300()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randint(-200, 200, p.shape) / 64)  # 8 significant bits
    want = prune_(copy.deepcopy(net), 0.9, scope="layer")
    got = prune_(net.to(dtype), 0.9, scope="layer")
    assert all(torch.equal(got[k], want[k]) for k in want)
