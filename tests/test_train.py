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


def test_lr_factor_warmup_scales_the_schedule_linearly_then_stops() -> None:
    assert [lr_factor("constant", s, 100, 4) for s in (0, 1, 2, 3, 4, 50)] == pytest.approx(
        [0.25, 0.5, 0.75, 1, 1, 1]
    )
    # multiplies the schedule: cosine at step 1 of 10 is 0.976, times 2/4
    assert lr_factor("cosine", 1, 10, 4) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi / 10)))
    assert lr_factor("step", 50, 90, 4) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="Invalid warmup_steps: -1"):
        lr_factor("step", 0, 10, -1)


def test_warmup_scheduler_survives_a_state_dict_round_trip() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = build_scheduler(opt, "step", 30, warmup_steps=5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02)
    for _ in range(2):
        opt.step()
        sched.step()
    opt2 = torch.optim.SGD(_model().parameters(), lr=0.1)
    sched2 = build_scheduler(opt2, "step", 30, warmup_steps=5)
    sched2.load_state_dict(sched.state_dict())
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.08)


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


def test_fit_hooks_run_in_order_and_can_stop() -> None:
    model = _model()
    opt = build_optimizer(model, OptimizerSpec("sgd", lr=0.05))
    calls: list[tuple] = []

    def forward_backward(m, x, y):
        calls.append(("step",))
        out = m(x)
        loss = torch.nn.functional.cross_entropy(out, y)
        loss.backward()
        return loss, out

    history = fit(
        model, _batches(), opt, epochs=5, eval_batches=_batches(seed=1),
        on_epoch_start=lambda e: calls.append(("start", e)),
        epoch_batches=lambda e, b: (calls.append(("batches", e)), b[:2])[1],
        forward_backward=forward_backward,
        after_train=lambda e, m: (calls.append(("after", e)), {**m, "extra": e})[1],
        evaluate_fn=lambda: (calls.append(("eval",)), {"accuracy": 50.0, "loss": 1.0})[1],
        on_epoch_end=lambda e, m: (calls.append(("end", e)), e == 1)[1],
    )  # fmt: skip
    # two epochs (the end hook stopped it), two batches each through the custom step
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[0]["extra"] == 0 and history[1]["test_accuracy"] == 50.0
    epoch0 = [("start", 0), ("batches", 0), ("step",), ("step",), ("after", 0), ("eval",),
              ("end", 0)]  # fmt: skip
    assert calls[: len(epoch0)] == epoch0 and len(calls) == 2 * len(epoch0)


def test_fit_masks_changed_in_place_between_epochs_apply() -> None:
    model = _model()
    opt = build_optimizer(model, OptimizerSpec("sgd", lr=0.05))
    masks: dict[str, torch.Tensor] = {}
    weight = model[1].weight
    keep = torch.rand(weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5

    def sparse_from_second_epoch(epoch: int) -> None:  # an AC/DC-like switch
        if epoch == 1:
            masks["1.weight"] = keep

    fit(model, _batches(), opt, epochs=2, masks=masks, on_epoch_start=sparse_from_second_epoch)
    assert torch.all(weight[~keep] == 0) and torch.all(weight[keep] != 0)


def test_label_smoothing_changes_the_loss() -> None:
    losses = []
    for smoothing in (0.0, 0.2):
        model = _model()
        opt = build_optimizer(model, OptimizerSpec("sgd", lr=1e-12))
        losses.append(fit(model, _batches(), opt, epochs=1, label_smoothing=smoothing)[0])
    assert losses[1]["train_loss"] != losses[0]["train_loss"]
    assert losses[1]["train_accuracy"] == losses[0]["train_accuracy"]
