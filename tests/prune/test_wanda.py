"""Wanda criterion: |w_ij|·rms(X_j), needs calibration, global ranking, sweep agreement."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sfwprune.prune import Ranking, prune_
from sfwprune.prune.masks import wanda_norms


def test_hand_made_linear_keeps_the_entry_with_the_larger_input():
    net = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[2.0, 1.0]]))  # magnitude would prune the second entry
    x = torch.tensor([[0.1, 3.0], [-0.1, -3.0]])  # rms: 0.1 and 3 -> scores 0.2 and 3
    assert prune_(net, 0.5, criterion="wanda", calibration=[x])["weight"].tolist() == [
        [False, True]
    ]


def test_conv_norms_are_rms_of_unfolded_patches_per_channel_and_position():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.Flatten(), nn.Linear(6 * 25, 3))
    x = torch.randn(5, 4, 5, 5)
    norms = wanda_norms(net, [x[:2], x[2:]])
    cols = F.unfold(x, 3, padding=1)  # (5, 36, 25): channel-major features
    rms = cols.pow(2).mean((0, 2)).sqrt().view(2, 18)  # per group
    want = rms.unsqueeze(1).expand(2, 3, 18).reshape(6, 2, 3, 3)
    torch.testing.assert_close(norms["0.weight"].float(), want, rtol=1e-5, atol=1e-6)
    h = net[1](net[0](x))
    torch.testing.assert_close(
        norms["2.weight"].float(), h.pow(2).mean(0).sqrt().expand(3, -1), rtol=1e-5, atol=1e-6
    )


def test_global_wanda_ranks_all_layers_together(make_lenet300):
    net = make_lenet300()
    x = torch.randn(64, 1, 28, 28)
    masks = prune_(net, 0.9, criterion="wanda", calibration=[x])
    kept = [m.float().mean().item() for m in masks.values()]
    total = sum(m.sum() for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert abs(total.item() - 0.1) < 1e-5
    assert len(set(round(k, 3) for k in kept)) > 1  # layers keep different fractions


def test_wanda_needs_calibration(make_lenet300):
    net = make_lenet300()
    before = [p.clone() for p in net.parameters()]
    with pytest.raises(ValueError, match="needs calibration"):
        prune_(net, 0.5, criterion="wanda")
    with pytest.raises(ValueError, match="NaN"):
        prune_(net, 0.5, criterion="wanda", calibration=[torch.full((2, 1, 28, 28), float("nan"))])
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


def test_ranking_masks_equal_prune(make_lenet300):
    x = torch.randn(32, 1, 28, 28)
    ranking = Ranking(make_lenet300(), criterion="wanda", calibration=[x])
    for level in (0.5, 0.95):
        want = prune_(make_lenet300(), level, criterion="wanda", calibration=[x])
        got = ranking.masks(level)
        assert all(torch.equal(got[k], want[k]) for k in want)
