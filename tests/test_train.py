"""train.py: optimizers, schedules, fine-tuning with fixed masks, non-finite loss."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sfwprune import SFW, prune_
from sfwprune.train import (
    NonFiniteLossError,
    OptimizerSpec,
    build_optimizer,
    build_scheduler,
    evaluate,
    fit,
    lr_factor,
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))


def _batches(n: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 3, generator=gen)
    out = []
    for _ in range(n):
        x = torch.randn(32, 1, 4, 4, generator=gen)
        out.append((x, (x.flatten(1) @ w).argmax(1)))
    return out


def test_lr_factor_schedules() -> None:
    assert [lr_factor("step", s, 90) for s in (0, 29, 30, 59, 60, 89)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01]
    )
    assert lr_factor("cosine", 0, 10) == 1.0 and lr_factor("cosine", 10, 10) == pytest.approx(0.0)
    assert lr_factor("cosine", 5, 10) == pytest.approx(0.5)
    assert lr_factor("constant", 7, 10) == 1.0
    with pytest.raises(ValueError, match="Invalid schedule: 'linear'"):
        lr_factor("linear", 0, 10)


def test_build_optimizer_defaults() -> None:
    sfw = build_optimizer(_model(), OptimizerSpec("sfw"))
    assert isinstance(sfw, SFW)
    g = sfw.param_groups[0]
    assert (g["lr"], g["momentum"], g["rescale"], g["constraint"]) == (
        1.0,
        0.9,
        "gradient",
        "k_sparse",
    )
    sgd = build_optimizer(_model(), OptimizerSpec("sgd"))
    g = sgd.param_groups[0]
    assert (g["lr"], g["momentum"], g["nesterov"], g["weight_decay"]) == (0.1, 0.9, True, 5e-4)
    with pytest.raises(ValueError, match="Invalid optimizer: 'adam'"):
        build_optimizer(_model(), OptimizerSpec("adam"))
    with pytest.raises(ValueError, match="Invalid weight_decay"):
        build_optimizer(_model(), OptimizerSpec("sfw", weight_decay=1e-4))


def test_scheduler_state_round_trip() -> None:
    opt = build_optimizer(_model(), OptimizerSpec("sfw"))
    sched = build_scheduler(opt, "step", 9)
    for _ in range(4):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = build_optimizer(_model(), OptimizerSpec("sfw"))
    sched2 = build_scheduler(opt2, "step", 9)
    sched2.load_state_dict(state)
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())
    assert sched.get_last_lr() == pytest.approx([0.1] * len(opt.param_groups))


def test_fit_learns_and_reports() -> None:
    model = _model()
    data = _batches()
    opt = build_optimizer(model, OptimizerSpec("sfw"))
    before = evaluate(model, data)
    hist = fit(
        model, data, opt, epochs=4, scheduler=build_scheduler(opt, "cosine", 32), eval_batches=data
    )
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    assert hist[-1]["test_loss"] < before["loss"]
    assert hist[-1]["test_accuracy"] > before["accuracy"]


def test_finetune_keeps_pruned_weights_at_zero() -> None:
    model = _model()
    data = _batches()
    masks = prune_(model, 0.5)
    opt = build_optimizer(model, OptimizerSpec("sgd", lr=0.05))
    fit(model, data, opt, epochs=2, masks=masks)
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        assert torch.all(params[name][~keep] == 0)
    assert any(torch.any(params[n][k] != 0) for n, k in masks.items())


def test_non_finite_loss_stops_before_the_step() -> None:
    model = _model()
    data = _batches(3)
    x, y = data[1]
    data[1] = (torch.full_like(x, float("nan")), y)
    opt = build_optimizer(model, OptimizerSpec("sfw"))
    with pytest.raises(NonFiniteLossError, match="epoch 1, step 2"):
        fit(model, data, opt, epochs=1)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_evaluate_restores_mode_and_rejects_empty() -> None:
    model = _model().train()
    out = evaluate(model, _batches(2))
    assert model.training and 0 <= out["accuracy"] <= 100 and math.isfinite(out["loss"])
    with pytest.raises(ValueError, match="no batches"):
        evaluate(model, [])
