"""recalibrate_bn: exact cumulative statistics; changes running stats and nothing else."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sfwprune.prune import prune_, recalibrate_bn


def batches(n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 3, 8, 8, generator=g) * 2 + 1 for _ in range(n)]


@pytest.mark.parametrize("start_training", [True, False])
def test_changes_running_stats_and_nothing_else(make_convbn, start_training):
    model = make_convbn()
    prune_(model, 0.8)
    model.train(start_training)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    bns[0].momentum = 0.3  # a non-default momentum must come back too
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = {n: b.clone() for n, b in model.named_buffers()}
    flags = [m.training for m in model.modules()]

    assert recalibrate_bn(model, batches()) == 3

    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n
    for n, b in model.named_buffers():
        if n.endswith("num_batches_tracked"):
            assert b.item() == 3
        else:
            assert not torch.equal(b, stats[n]), n  # running_mean / running_var moved
    assert [m.training for m in model.modules()] == flags
    assert bns[0].momentum == 0.3 and bns[1].momentum == 0.1


def test_statistics_are_the_average_of_batch_statistics():
    # Dropout before BN must be off (eval) during recalibration: inputs reach BN unchanged
    model = nn.Sequential(nn.Dropout(0.5), nn.BatchNorm2d(3))
    model[1].running_mean.fill_(5.0)
    xs = batches(2)
    recalibrate_bn(model, [(x, torch.zeros(6)) for x in xs])  # (inputs, targets) tuples
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in xs])
    variances = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in xs])
    torch.testing.assert_close(model[1].running_mean, means.mean(0))
    torch.testing.assert_close(model[1].running_var, variances.mean(0))


def test_no_batchnorm_is_a_no_op_that_reads_nothing():
    def never():
        raise AssertionError("must not be read")
        yield

    assert recalibrate_bn(nn.Linear(3, 2), never()) == 0


def test_empty_batches_raise_and_keep_statistics(convbn):
    stats = {n: b.clone() for n, b in convbn.named_buffers()}
    with pytest.raises(ValueError, match="Invalid batches: empty"):
        recalibrate_bn(convbn, [])
    assert all(torch.equal(b, stats[n]) for n, b in convbn.named_buffers())


def test_failed_forward_restores_statistics_flags_and_momentum(convbn):
    convbn.eval()
    stats = {n: b.clone() for n, b in convbn.named_buffers()}
    bad = torch.randn(2, 5, 8, 8)  # wrong channel count: the first conv raises
    with pytest.raises(RuntimeError):
        recalibrate_bn(convbn, [batches(1)[0], bad])
    assert all(torch.equal(b, stats[n]) for n, b in convbn.named_buffers())
    assert not any(m.training for m in convbn.modules())
    assert all(m.momentum == 0.1 for m in convbn.modules() if isinstance(m, nn.BatchNorm2d))


def test_bad_batch_type_raises(convbn):
    with pytest.raises(ValueError, match="Invalid batch: str"):
        recalibrate_bn(convbn, ["not a tensor"])
