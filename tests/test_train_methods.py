"""Train-once peers through the one training loop: CrAM / CrAM+ (optimizer) and AC/DC (masks)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sfwprune.experiments.config import TrainConfig
from sfwprune.experiments.runner import train_run
from sfwprune.optim import SFW
from sfwprune.optim.cram import CrAM
from sfwprune.train import OptimizerSpec, build_optimizer, train_epoch


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))


def _batches(n: int = 6):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 3, generator=gen)
    out = []
    for _ in range(n):
        x = torch.randn(32, 1, 4, 4, generator=gen)
        out.append((x, (x.flatten(1) @ w).argmax(1)))
    return out


@pytest.mark.parametrize("name, base", [("sgd", torch.optim.SGD), ("sfw", SFW)])
def test_cram_spec_builds_the_wrapper_and_takes_two_passes_a_step(name, base):
    model = _model()
    opt = build_optimizer(
        model, OptimizerSpec(name, cram="cram+", cram_rho=0.1, cram_sparsities=(0.5, 0.7))
    )
    assert isinstance(opt, CrAM) and isinstance(opt.base_optimizer, base)
    assert opt.plus and opt.rho == 0.1 and opt.sparsities == (0.5, 0.7)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    batches = _batches()
    before = [p.detach().clone() for p in model.parameters()]
    metrics = train_epoch(model, batches, opt)
    assert len(calls) == 2 * len(batches)
    assert metrics["train_loss"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.count_nonzero() > 0.9 * p.numel() for p in model.parameters() if p.dim() > 1)


def test_plain_spec_is_not_wrapped():
    assert not isinstance(build_optimizer(_model(), OptimizerSpec("sgd")), CrAM)


def test_cram_fields_round_trip_through_config_json_values():
    cfg = TrainConfig.from_dict(
        {"optimizer": {"name": "sgd", "cram": "cram", "cram_sparsities": [0.5, 1]}}
    )
    assert cfg.optimizer.cram_sparsities == (0.5, 1.0)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="Invalid cram_sparsities"):
        TrainConfig.from_dict({"optimizer": {"cram_sparsities": [0.5, 2.0]}})
    with pytest.raises(ValueError, match="Invalid cram"):
        TrainConfig.from_dict({"optimizer": {"cram": "sam"}})
    with pytest.raises(ValueError, match="Invalid acdc_sparsity"):
        TrainConfig.from_dict({"acdc_sparsity": 1.5})


def test_acdc_run_trains_sparse_phases_with_fixed_masks(tmp_path):
    cfg = TrainConfig.from_dict(
        {"dataset": "synthetic", "epochs": 5, "optimizer": "sgd", "acdc_sparsity": 0.8,
         "device": "cpu"}
    )  # fmt: skip
    # 5 epochs: warm-up 1, then sparse epoch 1, dense 2, sparse 3? final dense = 2 epochs
    result = train_run(cfg, tmp_path / "acdc", quiet=True, stop_after_epoch=2)
    weights = [p for p in result.model.parameters() if p.dim() > 1]
    zeros = sum(int((p == 0).sum()) for p in weights)
    total = sum(p.numel() for p in weights)
    assert zeros == round(0.8 * total)  # epoch 2 (index 1) was a sparse epoch
    resumed = train_run(cfg, tmp_path / "acdc", resume=True, quiet=True)
    weights = [p for p in resumed.model.parameters() if p.dim() > 1]
    assert sum(int((p == 0).sum()) for p in weights) < 0.5 * total  # the final dense phase
