"""sparsity_report / format_report: per-tensor counts, totals, MACs on hand-made layers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sfwprune.prune import format_report, prune_, sparsity_report


def hand_made() -> nn.Sequential:
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(2 * 5 * 5, 4)
    )
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].weight[0].zero_()  # 9 of 18 conv weights zero
        net[2].weight.fill_(1.0)
        net[2].weight[:, :25].zero_()  # 100 of 200 linear weights zero
        net[2].weight[0, 25:] = 0.0  # +25 -> 125 zero
        net[2].bias.zero_()  # 4 zeros
    return net


def test_rows_and_totals_on_hand_made_weights():
    rep = sparsity_report(hand_made())
    rows = {r["name"]: r for r in rep["layers"]}
    assert list(rows) == ["0.weight", "2.weight", "2.bias"]
    assert rows["0.weight"] == {
        "name": "0.weight",
        "shape": [2, 1, 3, 3],
        "numel": 18,
        "zeros": 9,
        "sparsity": 0.5,
        "prunable": True,
    }
    assert rows["2.weight"]["zeros"] == 125 and rows["2.weight"]["sparsity"] == 125 / 200
    assert rows["2.bias"]["prunable"] is False and rows["2.bias"]["sparsity"] == 1.0
    t = rep["totals"]
    assert (t["params"], t["zeros"], t["nonzero"]) == (222, 138, 84)
    assert t["sparsity"] == 138 / 222 and t["compression_ratio"] == 222 / 84
    assert (t["weight_params"], t["weight_nonzero"]) == (218, 84)
    assert t["weight_sparsity"] == 134 / 218
    assert "macs" not in t


def test_macs_with_input_shape():
    rep = sparsity_report(hand_made(), input_shape=(1, 5, 5))
    rows = {r["name"]: r for r in rep["layers"]}
    # conv: 25 output positions x 18 weights (9 nonzero); linear: 1 position x 200 (75 nonzero)
    assert (rows["0.weight"]["macs"], rows["0.weight"]["nonzero_macs"]) == (450, 225)
    assert (rows["2.weight"]["macs"], rows["2.weight"]["nonzero_macs"]) == (200, 75)
    assert "macs" not in rows["2.bias"]
    t = rep["totals"]
    assert (t["macs"], t["nonzero_macs"]) == (650, 300)
    assert t["theoretical_speedup"] == 650 / 300


def test_strided_conv_and_fully_pruned_model():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, bias=False))
    rep = sparsity_report(net, input_shape=(3, 9, 9))
    assert rep["totals"]["macs"] == 16 * 108  # 4x4 output positions
    prune_(net, 1.0)
    t = sparsity_report(net, input_shape=(3, 9, 9))["totals"]
    assert t["nonzero"] == 0 and t["nonzero_macs"] == 0
    assert math.isinf(t["compression_ratio"]) and math.isinf(t["theoretical_speedup"])


def test_report_leaves_model_and_bn_stats_alone(convbn):
    convbn.train()
    state = {k: v.clone() for k, v in convbn.state_dict().items()}
    rep = sparsity_report(convbn, input_shape=(3, 8, 8))
    assert rep["totals"]["macs"] > 0
    assert all(torch.equal(v, state[k]) for k, v in convbn.state_dict().items())
    assert all(m.training for m in convbn.modules())


def test_lenet_after_global_pruning(lenet300):
    prune_(lenet300, 0.9)
    t = sparsity_report(lenet300, input_shape=(1, 28, 28))["totals"]
    assert t["weight_params"] == 266_200 and t["weight_nonzero"] == 26_620
    assert t["macs"] == 266_200 and t["nonzero_macs"] == 26_620
    assert t["theoretical_speedup"] == pytest.approx(10.0)


def test_format_report_table():
    text = format_report(sparsity_report(hand_made(), input_shape=(1, 5, 5)))
    lines = text.splitlines()
    head = ["name", "shape", "numel", "zeros", "sparsity", "MACs", "nonzero", "MACs"]
    assert lines[0].split() == head
    assert lines[2].split() == ["0.weight", "2x1x3x3", "18", "9", "50.00%", "450", "225"]
    assert "222 params, 84 nonzero" in text and "compression 2.64x" in text
    assert "theoretical speedup 2.17x" in text
    assert "MACs" not in format_report(sparsity_report(hand_made()))


@pytest.mark.parametrize("shape", [(0, 5, 5), (1.5, 5), ("a",), 5])
def test_bad_input_shape_raises(shape):
    with pytest.raises(ValueError, match="Invalid input_shape"):
        sparsity_report(hand_made(), input_shape=shape)


def test_near_one_sparsity_never_prints_as_100_percent():
    from sfwprune.prune.report import format_ratio, format_sparsity

    assert format_sparsity(0.9999) == "99.99%" and format_sparsity(0.99999) == "99.999%"
    assert format_sparsity(1 - 1e-7) == "99.99999%" and format_sparsity(1e-6) == "0.0001%"
    assert format_sparsity(1.0) == "100.00%" and format_sparsity(0.0) == "0.00%"
    assert format_sparsity(1 - 1e-12) == ">99.999999%"
    assert format_ratio(float("inf"), "MACs") == "unbounded (no nonzero MACs left)"
    assert format_ratio(2.0) == "2.00x"
    net = nn.Linear(100, 100, bias=False)
    with torch.no_grad():
        net.weight.zero_()
        net.weight[0, 0] = 1.0
    text = format_report(sparsity_report(net, input_shape=(100,)))
    assert "99.99%" in text and "100.00%" not in text and "infx" not in text
    with torch.no_grad():
        net.weight.zero_()
    text = format_report(sparsity_report(net, input_shape=(100,)))
    assert "infx" not in text and "theoretical speedup unbounded (no nonzero MACs left)" in text


class _TokenModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 4)

    def forward(self, ids):
        return self.head(self.norm(self.embed(ids)).mean(dim=1))


def test_report_for_token_id_models():
    model = _TokenModel()
    ids = torch.randint(0, 50, (3, 7))
    by_input = sparsity_report(model, example_input=ids)
    by_dtype = sparsity_report(model, input_shape=(7,), input_dtype=torch.long)
    assert by_input["totals"]["macs"] == by_dtype["totals"]["macs"] == 16 * 4  # head, per sample
    rows = {r["name"]: r for r in by_input["layers"]}
    assert rows["embed.weight"]["prunable"] and rows["head.weight"]["prunable"]
    assert not rows["norm.weight"]["prunable"] and not rows["head.bias"]["prunable"]
    assert by_input["totals"]["weight_params"] == 50 * 16 + 16 * 4
    with pytest.raises(ValueError, match="input_shape or example_input, not both"):
        sparsity_report(model, input_shape=(7,), example_input=ids)
    with pytest.raises(ValueError, match="Invalid input_dtype"):
        sparsity_report(model, input_shape=(7,), input_dtype="long")
