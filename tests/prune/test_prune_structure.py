"""prune_ / sparsity_sweep with structure="channel" | "N:M": exact masks, reconstruction keeps
removed units at zero (so shrink drops them), bit-identical sweeps, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sfwprune.models import build_model
from sfwprune.prune import prune_, recalibrate_bn, shrink, sparsity_sweep, structured_masks
from sfwprune.prune.semi_structured import follows_n_m


def _mlp() -> nn.Sequential:
    """4 -> 4 -> 3 -> 2: layer 0 row norms 1, 4, 2, 3; layer 1 row norms 0.5, 5, 6."""
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.diag(torch.tensor([1.0, 4.0, 2.0, 3.0])))
        net[2].weight.copy_(torch.tensor([[0.5, 0, 0, 0], [0, 5.0, 0, 0], [0, 0, 6.0, 0]]))
        net[4].weight.fill_(0.01)
    return net


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], model: nn.Module) -> bool:
    return all(torch.equal(a[k], v) for k, v in model.state_dict().items())


def _lenet5(batch_norm: bool = False, seed: int = 0) -> nn.Module:
    name = "lenet5bn" if batch_norm else "lenet5"
    return build_model(name, input_shape=(1, 28, 28), num_classes=10, seed=seed)


def _inputs(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_channel_exact_masks_global_and_layer() -> None:
    net = _mlp()
    masks = prune_(net, 3 / 7, structure="channel")  # 3 of 7 units: norms 0.5, 1, 2
    assert masks["0.bias"].tolist() == [False, True, False, True]
    assert masks["2.bias"].tolist() == [False, True, True]
    assert masks["0.weight"][:, 0].tolist() == [False, True, False, True]
    assert net[0].weight.diagonal().tolist() == [0.0, 4.0, 0.0, 3.0]
    assert net[0].bias[[0, 2]].tolist() == [0.0, 0.0] and net[0].bias[[1, 3]].ne(0).all()
    assert torch.all(net[2].weight[0] == 0) and "4.weight" not in masks
    net = _mlp()
    masks = prune_(net, 0.5, structure="channel", scope="layer")
    assert masks["0.bias"].tolist() == [False, True, False, True]
    assert masks["2.bias"].tolist() == [False, False, True]  # round(1.5) = 2 of 3
    # the same masks as structured_masks on the same weights
    ref = structured_masks(_mlp(), 0.5, "channel", scope="layer")
    assert all(torch.equal(ref[k], masks[k]) for k in ref) and set(ref) == set(masks)


def test_channel_l1_norm() -> None:
    net = _mlp()
    with torch.no_grad():  # row 0: L2 1.8 > row 1's 1.5, but L1 1.8 < row 1's 2.1
        net[0].weight.copy_(
            torch.tensor([[1.8, 0, 0, 0], [0.9, 1.2, 0, 0], [5.0, 0, 0, 0], [5.0, 0, 0, 0]])
        )
    l2 = prune_(copy.deepcopy(net), 0.25, structure="channel", scope="layer")
    l1 = prune_(net, 0.25, structure="channel", scope="layer", norm=1)
    assert l2["0.bias"].tolist() == [True, False, True, True]
    assert l1["0.bias"].tolist() == [False, True, True, True]


def test_n_m_exact_masks() -> None:
    net = nn.Linear(8, 2)
    w = torch.tensor([[0.1, -3.0, 2.0, 0.0, 1.0, 1.0, -0.2, 4.0], [1, 2, 3, 4, 8, 7, 6, 5.0]])
    with torch.no_grad():
        net.weight.copy_(w)
    bias = net.bias.detach().clone()
    masks = prune_(net, structure="2:4")
    assert set(masks) == {"weight"}  # biases are not N:M pruned
    assert masks["weight"].int().tolist() == [[0, 1, 1, 0, 1, 0, 0, 1], [0, 0, 1, 1, 1, 1, 0, 0]]
    assert net.weight[0].tolist() == [0.0, -3.0, 2.0, 0.0, 1.0, 0.0, 0.0, 4.0]  # tie: lower index
    assert torch.equal(net.bias, bias)
    with torch.no_grad():
        net.weight.copy_(w)
    assert torch.equal(prune_(net, 0.5, structure="2:4")["weight"], masks["weight"])
    with torch.no_grad():
        net.weight.copy_(w)
    one = prune_(net, 0.75, structure="1:4")["weight"]
    assert one.int().tolist() == [[0, 1, 0, 0, 0, 0, 0, 1], [0, 0, 0, 1, 1, 0, 0, 0]]


def test_unstructured_default_unchanged() -> None:
    torch.manual_seed(0)
    a, b = nn.Linear(16, 8), nn.Linear(16, 8)
    b.load_state_dict(a.state_dict())
    ma = prune_(a, 0.5)
    mb = prune_(b, 0.5, structure=None)
    assert set(ma) == {"weight"} and torch.equal(ma["weight"], mb["weight"])
    assert int((~ma["weight"]).sum()) == 64 and torch.equal(a.weight, b.weight)


@pytest.mark.parametrize("batch_norm", [False, True], ids=["lenet5", "lenet5bn"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_channel_reconstruct_keeps_removed_units_zero_and_shrinks(
    batch_norm: bool, scope: str
) -> None:
    model = _lenet5(batch_norm)
    calib = _inputs(256)
    if batch_norm:  # the statistics of the data, as after training
        recalibrate_bn(model, [calib])
    plain = copy.deepcopy(model)
    masks_plain = prune_(plain, 0.5, structure="channel", scope=scope)
    dense = copy.deepcopy(model).eval()
    masks = prune_(model, 0.5, structure="channel", scope=scope, calibration=[calib],
                   reconstruct=True)  # fmt: skip
    assert all(torch.equal(masks[k], masks_plain[k]) for k in masks) and set(masks) == set(
        masks_plain
    )
    params = dict(model.named_parameters())
    for name, keep in masks.items():  # weights, biases and BN scale/shift of removed units
        assert torch.all(params[name][~keep] == 0), name
    # reconstruction moved the kept weights
    assert not torch.equal(params["classifier.2.weight"], dict(plain.named_parameters())[
        "classifier.2.weight"])  # fmt: skip
    model.eval()
    plain.eval()
    if batch_norm:  # recalibrated statistics of a removed unit: its input is exactly 0
        removed = ~masks["features.1.weight"]
        assert torch.all(model.features[1].running_mean[removed] == 0)
    small = shrink(model)  # no masks given: the zero units are found in the weights
    n_small = sum(p.numel() for p in small.parameters())
    assert n_small < 0.75 * sum(p.numel() for p in model.parameters())
    x = _inputs(32, seed=2)
    with torch.no_grad():
        assert torch.allclose(small.eval()(x), model(x), atol=1e-5, rtol=1e-4)
        # closer to the dense network than plain masking, on the calibration inputs
        err_rec = (model(calib) - dense(calib)).norm()
        err_plain = (plain(calib) - dense(calib)).norm()
    assert err_rec < err_plain


def test_n_m_reconstruct_keeps_pattern() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    calib = torch.randn(128, 64, generator=torch.Generator().manual_seed(3))
    masks = prune_(model, structure="2:4", calibration=[calib], reconstruct=True)
    assert set(masks) == {"1.weight", "3.weight"}
    for name in masks:
        w = model.get_parameter(name)
        assert follows_n_m(w, 2, 4) and torch.all(w[~masks[name]] == 0)


def test_n_m_skip_indivisible_lenet5() -> None:
    model = _lenet5()
    with pytest.raises(ValueError, match=r"Invalid M: 4 does not divide the rows of features.0"):
        prune_(model, structure="2:4")
    masks = prune_(model, structure="2:4", indivisible="skip")
    # conv rows 1·5·5 = 25 and 6·5·5 = 150 stay dense; the classifier's 400, 120, 84 are pruned
    assert set(masks) == {"classifier.0.weight", "classifier.2.weight", "classifier.4.weight"}
    assert not follows_n_m(model.features[0].weight)
    assert all(follows_n_m(model.get_parameter(n)) for n in masks)


@pytest.mark.parametrize("reconstruct", [False, True])
def test_sweep_with_structure_matches_prune_and_restores(reconstruct: bool) -> None:
    model = _lenet5(batch_norm=True)
    model.train()
    before = _state(model)
    calib = [_inputs(128)] if reconstruct else None
    x = _inputs(16, seed=4)

    def evaluate(m: nn.Module) -> dict:
        with torch.no_grad():
            out = m.eval()(x)
        return {"accuracy": 0.0, "loss": 0.0, "out": out}

    levels = [0.25, 0.5, 0.75]
    rows = sparsity_sweep(model, evaluate, levels, structure="channel", scope="layer",
                          calibration=calib, reconstruct=reconstruct)  # fmt: skip
    assert _same(before, model) and model.training
    for row, s in zip(rows, levels, strict=True):
        ref = copy.deepcopy(model)
        prune_(ref, s, structure="channel", scope="layer", calibration=calib,
               reconstruct=reconstruct)  # fmt: skip
        expected = evaluate(ref)["out"]
        assert torch.allclose(row["out"], expected, atol=1e-6), s
        # LeNet-5's prunable units: 6 + 16 conv filters, 120 + 84 hidden units
        counts = [round(s * 6), round(s * 16), round(s * 120), round(s * 84)]
        assert row["measured_sparsity"] == pytest.approx(sum(counts) / 226)
    rows = sparsity_sweep(model, evaluate, [0.5], structure="2:4", indivisible="skip")
    assert rows[0]["measured_sparsity"] == pytest.approx(0.5) and _same(before, model)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((None,), {"structure": "5:4"}, r"Invalid structure: '5:4'"),
        ((None,), {"structure": "2:4"}, r"Invalid M: 4 does not divide the rows of features.0"),
        ((1.0,), {"structure": "channel"}, r"Invalid sparsity: 1.0"),
        ((0.5,), {"structure": "blocks"}, r"Invalid structure: 'blocks'"),
        ((0.5,), {"structure": 4}, r"Invalid structure: 4"),
        ((0.3,), {"structure": "2:4", "indivisible": "skip"}, r"Invalid sparsity: 0.3"),
        ((None,), {"structure": "channel"}, r"Invalid sparsity: None"),
        ((None,), {}, r"Invalid sparsity: None"),
        ((0.5,), {"structure": "channel", "criterion": "wanda"}, r"Invalid criterion: 'wanda'"),
        ((0.5,), {"structure": "channel", "include": "all"}, r"Invalid include: 'all'"),
        ((0.5,), {"structure": "channel", "scope": "net"}, r"Invalid scope: 'net'"),
        ((0.5,), {"norm": 1}, r"Invalid norm/indivisible: 1/'error'"),
        ((None,), {"structure": "2:4", "norm": 1}, r"Invalid norm: 1"),
        ((0.5,), {"structure": "channel", "reconstruct": True}, r"Invalid calibration"),
    ],
)
def test_bad_input_leaves_model_unchanged(args: tuple, kwargs: dict, match: str) -> None:
    model = _lenet5()
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        prune_(model, *args, **kwargs)
    assert _same(before, model)


def test_sweep_bad_input_leaves_model_unchanged() -> None:
    model = _lenet5()
    before = _state(model)

    def evaluate(m: nn.Module) -> dict:
        return {"accuracy": 0.0, "loss": 0.0}

    with pytest.raises(ValueError, match=r"Invalid sparsity: 1.0"):
        sparsity_sweep(model, evaluate, [0.5, 1.0], structure="channel")
    with pytest.raises(ValueError, match=r"Invalid sparsity: 0.25"):
        sparsity_sweep(model, evaluate, [0.5, 0.25], structure="2:4", indivisible="skip")
    with pytest.raises(ValueError, match=r"Invalid prune_kwargs: \['norm'\]"):
        sparsity_sweep(model, evaluate, [0.5], norm=1)
    assert _same(before, model)
