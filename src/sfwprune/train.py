"""Fit and evaluate: the training loop, optimizers and learning-rate schedules. No file I/O.

Optimizers: ``sfw`` (docs/algorithm.md §3 defaults: lr 1.0, gradient rescale, momentum 0.9,
K-sparse sets with k_frac 0.05 and radius_scale 15) and ``sgd`` (momentum 0.9, Nesterov, weight
decay 5e-4), either of them optionally wrapped in CrAM / CrAM+ (docs/algorithm.md §8).
Schedules are per step: ``step`` (÷10 at 1/3 and 2/3 of training), ``cosine``, ``constant``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import option
from .constraints import constraint_groups
from .constraints.groups import KINDS, MODES
from .optim import SFW
from .optim.cram import CrAM
from .optim.finite import finite_flags
from .optim.sfw import RESCALES
from .prune.masks import apply_masks_

Tensor = torch.Tensor
OPTIMIZERS = ("sfw", "sgd")
CRAM = ("none", "cram", "cram+")
SCHEDULES = ("step", "cosine", "constant")
PRECISIONS = ("fp32", "bf16")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the weights were not updated by that step."""


#: Which tensors SFW constrains: every parameter, or the weights (dim >= 2) alone.
CONSTRAINED_TENSORS = ("all", "weights")


@dataclass(frozen=True)
class OptimizerSpec:
    """What :func:`build_optimizer` needs; every field has the paper's default (docs/algorithm.md).

    Each field is one CLI flag of ``sfwprune train`` (``name`` is ``--optimizer``); the older
    config keys ``value``, ``mode`` and ``constrain`` still load as their aliases.
    """

    name: str = option("sfw", "optimizer", choices=OPTIMIZERS, flag="optimizer")
    lr: float | None = option(None, "learning rate (default 1.0 for sfw, 0.1 for sgd)",
                              low=0, low_open=True)  # fmt: skip
    momentum: float = option(0.9, "momentum", low=0, high=1, high_open=True)
    weight_decay: float | None = option(None, "sgd only (default 5e-4); sfw refuses it", low=0)
    constraint: str = option("k_sparse", "the set each constrained tensor lives in (sfw)",
                             choices=KINDS)  # fmt: skip
    k_frac: float = option(0.05, "K = max(k_min, k_frac·numel) for k_sparse / k_support",
                           low=0, high=1, low_open=True)  # fmt: skip
    k_min: int = option(10, "smallest K of a tensor", low=1)
    nm_n: int = option(2, "N of constraint=n_m: at most N non-zeros per M consecutive row entries",
                       low=1)  # fmt: skip
    nm_m: int = option(4, "M of constraint=n_m (the group length along each weight row)", low=1)
    radius_scale: float = option(
        15.0, "set size: with radius_from=initialization, L2 diameter = 2·radius_scale·"
        "E||θ_init||; otherwise the radius or diameter itself", low=0, low_open=True,
        aliases=("value",),
    )  # fmt: skip
    radius_from: str = option("initialization", "how radius_scale sizes each set",
                              choices=MODES, aliases=("mode",))  # fmt: skip
    rescale: str | None = option("gradient", "step-size rescaling (none: plain lr)",
                                 choices=RESCALES)  # fmt: skip
    constrained_tensors: str = option("all", "which tensors SFW constrains (weights: dim >= 2)",
                                      choices=CONSTRAINED_TENSORS, aliases=("constrain",))  # fmt: skip
    cram: str = option("none", "wrap the optimizer in CrAM or CrAM+ (two passes a step)",
                       choices=CRAM)  # fmt: skip
    cram_rho: float = option(0.05, "CrAM perturbation radius ρ", low=0)
    cram_sparsities: tuple[float, ...] = option(
        default_factory=lambda: (0.9, 0.95, 0.98), low=0, high=1,
        help="CrAM: sparsities drawn one per step (comma-separated); default 0.9,0.95,0.98",
    )  # fmt: skip


def default_lr(name: str) -> float:
    return 1.0 if name == "sfw" else 0.1


def build_optimizer(model: nn.Module, spec: OptimizerSpec) -> torch.optim.Optimizer:
    """SFW over :func:`constraint_groups` (moves the params inside their sets) or SGD, wrapped in
    :class:`~sfwprune.optim.cram.CrAM` when ``spec.cram`` is ``"cram"`` or ``"cram+"``."""
    if spec.name not in OPTIMIZERS:
        raise ValueError(
            f"Invalid optimizer: {spec.name!r} (expected one of {', '.join(OPTIMIZERS)})"
        )
    lr = default_lr(spec.name) if spec.lr is None else spec.lr
    params: Any
    if spec.name == "sgd":
        wd = 5e-4 if spec.weight_decay is None else spec.weight_decay
        params, cls = model.parameters(), torch.optim.SGD
        kwargs = {"lr": lr, "momentum": spec.momentum, "nesterov": spec.momentum > 0,
                  "weight_decay": wd}  # fmt: skip
    else:
        if spec.weight_decay:
            raise ValueError(
                f"Invalid weight_decay: {spec.weight_decay!r} (SFW takes none: the set constrains)"
            )
        params = constraint_groups(
            model, spec.constraint, k_frac=spec.k_frac, k_min=spec.k_min,
            radius_scale=spec.radius_scale, radius_from=spec.radius_from,
            include=spec.constrained_tensors, n=spec.nm_n, m=spec.nm_m,
        )  # fmt: skip
        # train_epoch checks loss and gradients before every step, so the optimizer's own
        # check (a second pass over the gradients) is switched off here.
        cls = SFW
        kwargs = {"lr": lr, "momentum": spec.momentum, "rescale": spec.rescale,
                  "check_finite": False}  # fmt: skip
    if spec.cram == "none":
        return cls(params, **kwargs)
    return CrAM(
        params, cls, rho=spec.cram_rho, sparsities=spec.cram_sparsities,
        plus=spec.cram == "cram+", **kwargs,
    )  # fmt: skip


def lr_factor(schedule: str, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """Multiplier of the base lr after ``step`` of ``total_steps`` optimizer steps; the first
    ``warmup_steps`` steps scale it linearly up from ``1/warmup_steps`` (a linear warm-up)."""
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"Invalid warmup_steps: {warmup_steps!r} (expected an integer >= 0)")
    t = min(step, total_steps) / max(total_steps, 1)
    if schedule == "constant":
        factor = 1.0
    elif schedule == "step":
        factor = 0.1 ** ((t >= 1 / 3) + (t >= 2 / 3))
    elif schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * t))
    else:
        raise ValueError(f"Invalid schedule: {schedule!r} (expected one of {', '.join(SCHEDULES)})")
    return factor * min(1.0, (step + 1) / warmup_steps) if warmup_steps else factor


class _Factor:
    """Picklable lr lambda (LambdaLR keeps non-function lambdas in its state_dict)."""

    def __init__(self, schedule: str, total_steps: int, warmup_steps: int = 0):
        lr_factor(schedule, 0, total_steps, warmup_steps)  # validates
        self.schedule, self.total_steps, self.warmup_steps = schedule, total_steps, warmup_steps

    def __call__(self, step: int) -> float:
        return lr_factor(self.schedule, step, self.total_steps, self.warmup_steps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, warmup_steps: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step :class:`~torch.optim.lr_scheduler.LambdaLR` following ``schedule``, after a
    linear warm-up over the first ``warmup_steps`` steps."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, _Factor(schedule, total_steps, warmup_steps)
    )


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision not in PRECISIONS:
        raise ValueError(
            f"Invalid precision: {precision!r} (expected one of {', '.join(PRECISIONS)})"
        )
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    precision: str = "fp32",
) -> dict[str, float]:
    """Top-1 ``accuracy`` (percent) and mean cross-entropy ``loss`` over ``batches``.

    The model is put in eval mode for the pass and its previous mode restored.
    """
    was_training = model.training
    model.eval()
    device = _device_of(model)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    try:
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, precision):
                out = model(x)
            loss_sum += F.cross_entropy(out.float(), y, reduction="sum").double()
            correct += (out.argmax(1) == y).sum()
            count += y.numel()
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("Invalid evaluation data: no batches (expected at least one sample)")
    return {"accuracy": 100.0 * float(correct) / count, "loss": float(loss_sum) / count}


def _check_finite(loss: Tensor, model: nn.Module, epoch: int, step: int) -> None:
    """Raise before the optimizer step if the loss or any gradient is NaN/inf (one host sync)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not (bool(torch.isfinite(loss.detach())) and bool(finite_flags(grads).all())):
        value = float(loss.detach())
        what = f"loss ({value})" if not math.isfinite(value) else f"gradient (loss {value})"
        raise NonFiniteLossError(
            f"Non-finite {what} at epoch {epoch + 1}, step {step + 1}: training stopped "
            "before this step touched the weights"
        )


ForwardBackward = Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor]]


def cross_entropy_step(precision: str = "fp32", label_smoothing: float = 0.0) -> ForwardBackward:
    """The default ``forward_backward`` of :func:`train_epoch`: forward (under autocast),
    cross-entropy, backward; returns ``(loss, logits)``."""

    def forward_backward(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        with autocast(x.device, precision):
            out = model(x)
        loss = F.cross_entropy(out.float(), y, label_smoothing=label_smoothing)
        loss.backward()
        return loss, out

    return forward_backward


def train_epoch(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    masks: Mapping[str, Tensor] | None = None,
    precision: str = "fp32",
    epoch: int = 0,
    on_batch: Callable[[int, float], None] | None = None,
    label_smoothing: float = 0.0,
    forward_backward: ForwardBackward | None = None,
) -> dict[str, float]:
    """One pass over ``batches``; returns ``train_loss`` and ``train_accuracy`` (percent).

    ``masks`` (name -> bool keep mask) keep pruned weights at zero: gradients are masked before
    the step and weights after it (the fine-tuning baseline). The mapping is read at every
    step, so a caller may change it in place between epochs. ``forward_backward(model, x, y)``
    replaces the default :func:`cross_entropy_step` (it must leave the gradients in ``.grad``
    and return ``(loss, logits)``). A non-finite loss raises :class:`NonFiniteLossError`
    *before* the optimizer step, so the weights stay finite.
    """
    model.train()
    device = _device_of(model)
    named = dict(model.named_parameters())
    step_fn = forward_backward or cross_entropy_step(precision, label_smoothing)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    for step, (x, y) in enumerate(batches):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        loss, out = step_fn(model, x, y)
        _check_finite(loss, model, epoch, step)
        if masks:
            for name, mask in masks.items():
                if named[name].grad is not None:
                    named[name].grad.mul_(mask)
        if isinstance(optimizer, CrAM):  # its second pass, at the compressed point
            optimizer.step(lambda: step_fn(model, x, y)[0])  # noqa: B023 (called right here)
        else:
            optimizer.step()
        if masks:
            apply_masks_(model, masks)
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.detach().double() * y.numel()
        correct += (out.argmax(1) == y).sum()
        count += y.numel()
        if on_batch is not None:
            on_batch(step, float(loss.detach()))
    if count == 0:
        raise ValueError("Invalid training data: no batches (expected at least one sample)")
    return {"train_loss": float(loss_sum) / count, "train_accuracy": 100.0 * float(correct) / count}


def fit(
    model: nn.Module,
    train_batches: Iterable[tuple[Tensor, Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    eval_batches: Iterable[tuple[Tensor, Tensor]] | None = None,
    masks: Mapping[str, Tensor] | None = None,
    precision: str = "fp32",
    start_epoch: int = 0,
    label_smoothing: float = 0.0,
    on_epoch_start: Callable[[int], None] | None = None,
    epoch_batches: Callable[[int, Iterable], Iterable] | None = None,
    forward_backward: ForwardBackward | None = None,
    after_train: Callable[[int, dict[str, Any]], dict[str, Any]] | None = None,
    evaluate_fn: Callable[[], dict[str, float]] | None = None,
    on_epoch_end: Callable[[int, dict[str, Any]], bool | None] | None = None,
) -> list[dict[str, Any]]:
    """Train for epochs ``start_epoch .. epochs-1``; one metrics dict per epoch.

    The one epoch loop of the package; callers plug in through hooks, in the order they run
    in each epoch (``epoch`` counts from 0):

    - ``on_epoch_start(epoch)``: timers, or a sparsity schedule changing ``masks`` in place;
    - ``epoch_batches(epoch, train_batches)``: the iterable this epoch trains on (a progress
      bar around it, say);
    - ``forward_backward(model, x, y) -> (loss, logits)``: the per-batch loss and backward
      (default :func:`cross_entropy_step`), e.g. a method that takes gradients elsewhere;
    - ``after_train(epoch, metrics) -> metrics``: e.g. averaging over data-parallel ranks;
    - ``evaluate_fn() -> {"accuracy", "loss"}``: replaces ``evaluate(model, eval_batches)``;
    - ``on_epoch_end(epoch, metrics)``: checkpoint and log (this module does no file I/O);
      returning ``True`` stops training after this epoch.

    Example::

        opt = build_optimizer(model, OptimizerSpec("sfw"))
        fit(model, train_loader, opt, epochs=10, eval_batches=test_loader)
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"Invalid epochs: {epochs!r} (expected an integer >= 1)")
    history = []
    for epoch in range(start_epoch, epochs):
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        batches = train_batches if epoch_batches is None else epoch_batches(epoch, train_batches)
        metrics: dict[str, Any] = {"epoch": epoch + 1}
        metrics.update(
            train_epoch(model, batches, optimizer, scheduler, masks=masks, precision=precision,
                        epoch=epoch, label_smoothing=label_smoothing,
                        forward_backward=forward_backward)
        )  # fmt: skip
        if after_train is not None:
            metrics = after_train(epoch, metrics)
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        test = None
        if evaluate_fn is not None:
            test = evaluate_fn()
        elif eval_batches is not None:
            test = evaluate(model, eval_batches, precision=precision)
        if test is not None:
            metrics.update({"test_accuracy": test["accuracy"], "test_loss": test["loss"]})
        history.append(metrics)
        if on_epoch_end is not None and on_epoch_end(epoch, metrics):
            break
    return history
