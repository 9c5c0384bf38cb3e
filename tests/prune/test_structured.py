"""Structured masks: channel (global / layer) and N:M, exact on hand-made weights; bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sfwprune.models import LeNet5, ResNet18
from sfwprune.prune import prune_
from sfwprune.prune.structured import (
    channel_spaces,
    parse_structure,
    structured_masks,
)


def _mlp() -> nn.Sequential:
    """4 -> 4 -> 3 -> 2 with hand-set row norms: layer 0 rows 1, 4, 2, 3; layer 1 rows 0.5, 5, 6."""
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.diag(torch.tensor([1.0, 4.0, 2.0, 3.0])))
        net[2].weight.copy_(torch.tensor([[0.5, 0, 0, 0], [0, 5.0, 0, 0], [0, 0, 6.0, 0]]))
        net[4].weight.fill_(0.01)  # the output layer: smallest of all, never pruned
    return net


def test_channel_global_ranks_all_units_as_given() -> None:
    net = _mlp()
    masks = structured_masks(net, 3 / 7, "channel", scope="global")  # round(3/7 · 7) = 3 units
    # smallest norms over both layers: 0.5 (layer 1), 1, 2 (layer 0)
    assert masks["0.weight"][:, 0].tolist() == [False, True, False, True]
    assert masks["0.bias"].tolist() == [False, True, False, True]
    assert masks["2.weight"][:, 0].tolist() == [False, True, True]
    assert "4.weight" not in masks and "4.bias" not in masks
    assert masks["0.weight"].shape == (4, 4) and masks["0.weight"][0].any().item() is False


def test_channel_l1_norm_ranking() -> None:
    net = _mlp()
    with torch.no_grad():  # row 0: L2 1.8 > row 1's 1.5, but L1 1.8 < row 1's 2.1
        net[0].weight.copy_(
            torch.tensor([[1.8, 0, 0, 0], [0.9, 1.2, 0, 0], [5.0, 0, 0, 0], [5.0, 0, 0, 0]])
        )
    assert structured_masks(net, 0.25, scope="layer")["0.bias"].tolist() == [1, 0, 1, 1]
    assert structured_masks(net, 0.25, scope="layer", norm=1)["0.bias"].tolist() == [0, 1, 1, 1]


def test_channel_layer_scope_and_keep_one_per_layer() -> None:
    net = _mlp()
    masks = structured_masks(net, 0.5, "channel", scope="layer")  # 2 of 4, round(1.5) = 2 of 3
    assert masks["0.bias"].tolist() == [False, True, False, True]
    assert masks["2.bias"].tolist() == [False, False, True]
    masks = structured_masks(net, 0.99, "channel", scope="layer")
    assert masks["0.bias"].sum() == 1 and masks["2.bias"].sum() == 1
    masks = structured_masks(net, 0.99, "channel", scope="global")
    assert masks["0.bias"].tolist() == [False, True, False, False]  # the largest unit stays
    assert masks["2.bias"].tolist() == [False, False, True]


def test_channel_masks_cover_batchnorm_and_prune_in_place() -> None:
    torch.manual_seed(0)
    model = LeNet5((1, 12, 12), 10, batch_norm=True)
    masks = prune_(model, 0.5, structure="channel", scope="layer")
    assert set(masks) == {
        "features.0.weight", "features.0.bias", "features.1.weight", "features.1.bias",
        "features.4.weight", "features.4.bias", "features.5.weight", "features.5.bias",
        "classifier.0.weight", "classifier.0.bias", "classifier.2.weight", "classifier.2.bias",
    }  # fmt: skip
    assert int((~masks["features.1.weight"]).sum()) == 3  # 3 of 6 filters
    pruned = ~masks["features.0.bias"]
    assert torch.all(model.features[0].weight[pruned] == 0)
    assert torch.all(model.features[1].weight[pruned] == 0)
    assert torch.all(model.features[1].bias[pruned] == 0)
    assert torch.all(model.features[0].weight[~pruned] != 0)


def test_resnet_prunes_only_block_internal_convs() -> None:
    torch.manual_seed(0)
    model = ResNet18((3, 8, 8), 10)
    masks = structured_masks(model, 0.5, "channel", scope="layer")
    layers = {name.rsplit(".", 1)[0] for name in masks}
    assert all(name.endswith(("conv1", "bn1")) for name in layers), layers
    assert len(layers) == 16  # conv1 + bn1 of 8 blocks
    tied = [s for s in channel_spaces(model) if s.tied]
    assert [len(s.producers) for s in tied] == [3, 3, 3, 3]  # stem/shortcut + two conv2 each


def test_n_m_keeps_n_largest_per_group_of_rows() -> None:
    net = nn.Linear(8, 2, bias=False)
    with torch.no_grad():
        net.weight.copy_(
            torch.tensor([[0.1, -3.0, 2.0, 0.0, 1.0, 1.0, -0.2, 4.0], [1, 2, 3, 4, 8, 7, 6, 5.0]])
        )
    masks = prune_(net, structure="2:4")
    assert masks["weight"].int().tolist() == [[0, 1, 1, 0, 1, 0, 0, 1], [0, 0, 1, 1, 1, 1, 0, 0]]
    assert net.weight[0].tolist() == [0.0, -3.0, 2.0, 0.0, 1.0, 0.0, 0.0, 4.0]  # tie: lower index
    assert structured_masks(net, 0.5, "2:4")["weight"].sum() == 8


def test_n_m_conv_groups_run_along_c_kh_kw() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 2)  # rows of 2·2·2 = 8
    keep = structured_masks(conv, structure="1:4")["weight"]
    assert keep.shape == (3, 2, 2, 2)
    groups = keep.reshape(-1, 4)
    assert torch.all(groups.sum(dim=1) == 1)
    w = conv.weight.detach().abs().reshape(-1, 4)
    assert torch.equal(groups.float().argmax(dim=1), w.argmax(dim=1))


def test_n_m_indivisible_rows() -> None:
    torch.manual_seed(0)
    model = LeNet5((1, 12, 12), 10)  # conv rows 25 and 150
    with pytest.raises(ValueError, match=r"Invalid M: 4 does not divide the rows of features.0"):
        structured_masks(model, structure="2:4")
    masks = structured_masks(model, structure="2:4", indivisible="skip")
    assert set(masks) == {"classifier.0.weight", "classifier.2.weight", "classifier.4.weight"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"structure": "5:4"}, r"Invalid structure: '5:4'"),
        ({"structure": "0:4"}, r"Invalid structure: '0:4'"),
        ({"structure": "2-4"}, r"Invalid structure: '2-4'"),
        ({"structure": "channels", "sparsity": 0.5}, r"Invalid structure: 'channels'"),
        ({"structure": "channel", "sparsity": 1.0}, r"Invalid sparsity: 1.0"),
        ({"structure": "channel", "sparsity": 1.5}, r"Invalid sparsity: 1.5"),
        ({"structure": "channel"}, r"Invalid sparsity: None"),
        ({"structure": "channel", "sparsity": 0.5, "scope": "net"}, r"Invalid scope: 'net'"),
        ({"structure": "2:4", "sparsity": 0.3}, r"Invalid sparsity: 0.3"),
        ({"structure": "2:4", "indivisible": "pad"}, r"Invalid indivisible: 'pad'"),
        ({"structure": "channel", "sparsity": 0.5, "norm": 3}, r"Invalid norm: 3"),
    ],
)
def test_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        structured_masks(_mlp(), **kwargs)


def test_unsupported_models_name_the_module() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"module '1' \(Sigmoid\)"):
        structured_masks(net, 0.5)

    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

    with pytest.raises(ValueError, match="Invalid model: Custom"):
        structured_masks(Custom(), 0.5)
    assert parse_structure("channel") is None and parse_structure("2:4") == (2, 4)
