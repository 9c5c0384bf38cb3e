"""SFW-Init (Lu et al. 2022, Algorithm 3): learn one scale per tensor for the first SFW step.

With ``θ_j = α_j·θ⁰_j`` (direction fixed, ``α_j`` starts at 1), minimise over ``α`` with Adam

    L_B(θ + η(v - θ)) / lr,    v = lmo(∇L_A(θ)) held constant,

i.e. choose the scales that make one SFW step reduce the loss the most (docs/algorithm.md §5). Then
write ``α_j·θ⁰_j`` into the model and shift every tensor back inside its set.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sized
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..optim import SFW
from .batches import half_overlapping_pairs
from .virtual_step import (
    LossFn,
    batch_stats_mode,
    objective_lr,
    scaled_objective,
    tensor_specs,
    to_device,
)


@dataclass
class SFWInitResult:
    """What :func:`sfw_init` learned.

    Attributes:
        scales: the learned ``α_j`` per parameter name (before the final shift inside the sets).
        objective: ``L_B(θ') / lr`` at each iteration, before that iteration's Adam step.
        iters: number of iterations run.
        seconds: wall time of the whole call.
    """

    scales: dict[str, float]
    objective: list[float] = field(default_factory=list)
    iters: int = 0
    seconds: float = 0.0


def _check_number(name: str, value: object, *, low: float, high: float, low_open: bool) -> float:
    bounds = f"{'(' if low_open else '['}{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {name}: {value!r} (expected a number in {bounds})")
    v = float(value)
    if not (math.isfinite(v) and (v > low if low_open else v >= low) and v <= high):
        raise ValueError(f"Invalid {name}: {value!r} (expected a finite number in {bounds})")
    return v


def _check_iters(iters: object, batches: object) -> int:
    if iters is None:
        if not isinstance(batches, Sized):
            raise ValueError(
                "Invalid iters: None with batches of unknown length (pass iters, e.g. the number "
                "of batches in one epoch)"
            )
        iters = len(batches)
        if iters < 1:
            raise ValueError("Invalid batches: empty (expected at least one (x, y) batch)")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"Invalid iters: {iters!r} (expected an integer >= 1)")
    return iters


def sfw_init(
    model: nn.Module,
    optimizer: SFW,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    iters: int | None = None,
    lr: float = 1e-3,
    min_scale: float = 0.01,
    grad_clip: float = 1.0,
    loss_fn: LossFn = F.cross_entropy,
) -> SFWInitResult:
    """Learn per-tensor scales ``α`` through one virtual SFW step, then rescale ``model`` in place.

    Each iteration: ``θ = α·θ⁰``; ``g = ∇L_A(θ)`` (graph kept); per tensor
    ``θ' = θ + η(v - θ)``, ``v = lmo(g)`` constant, ``η`` from the group's rescale and lr
    (unconstrained tensors ``θ' = θ - lr·g``); objective ``L_B(θ')/lr`` on a half-overlapping
    batch ``B`` (see :mod:`sfwprune.init.batches`), backpropagated to ``α`` through the step
    (second order); Adam on ``α``, gradient norm clipped to ``grad_clip``, ``α`` floored at
    ``min_scale`` (0 for tensors whose name ends in ``bias``). BatchNorm uses batch statistics;
    running statistics, modules' train/eval flags and the optimizer are left untouched. At the
    end every tensor becomes ``shift_inside(α_j·θ⁰_j)`` (radial, so directions are unchanged).

    Args:
        model: the network, with parameters already inside their sets.
        optimizer: an :class:`~sfwprune.SFW` built from ``constraint_groups(model)``; only read
            (sets, lr, rescale), never stepped.
        batches: ``(x, y)`` batches (moved to the model's device); cycled if exhausted.
        iters: number of Adam steps on ``α``; default ``len(batches)`` (about one epoch).
        lr: Adam's learning rate on ``α`` (default 1e-3).
        min_scale: floor on ``α`` for non-bias tensors, in [0, 1] (default 0.01).
        grad_clip: max L2 norm of the gradient wrt all ``α`` (default 1.0).
        loss_fn: ``loss_fn(model(x), y)`` -> scalar (default cross-entropy).

    Returns:
        :class:`SFWInitResult` with the scales, the objective trace, iters and seconds.

    Example:
        >>> opt = SFW(constraint_groups(model), lr=1.0, momentum=0.9)
        >>> result = sfw_init(model, opt, train_batches, iters=390)
        >>> fit(model, opt, ...)  # SFW training then starts from the learned scales
    """
    start = time.perf_counter()
    iters = _check_iters(iters, batches)
    lr = _check_number("lr", lr, low=0.0, high=math.inf, low_open=True)
    min_scale = _check_number("min_scale", min_scale, low=0.0, high=1.0, low_open=False)
    grad_clip = _check_number("grad_clip", grad_clip, low=0.0, high=math.inf, low_open=True)
    specs = tensor_specs(model, optimizer, min_scale)
    if not specs:
        raise ValueError("Invalid model: no trainable parameters (nothing to scale)")
    lr_ref = objective_lr(specs)
    device = specs[0].param.device

    # α in at least float32 (Adam on half-precision scalars stalls), cast to θ's dtype on use.
    alphas = [
        torch.ones(
            (),
            dtype=torch.promote_types(s.param.dtype, torch.float32),
            device=s.param.device,
            requires_grad=True,
        )
        for s in specs
    ]
    floors = [s.floor for s in specs]
    adam = torch.optim.Adam(alphas, lr=lr)
    trace: list[torch.Tensor] = []  # kept on device: no host sync per iteration
    with torch.enable_grad(), batch_stats_mode(model) as buffers:
        for grad_batch, eval_batch in half_overlapping_pairs(batches, iters):
            adam.zero_grad(set_to_none=True)
            objective = scaled_objective(
                model,
                specs,
                alphas,
                buffers,
                to_device(grad_batch, device),
                to_device(eval_batch, device),
                loss_fn,
                lr_ref,
            )
            objective.backward()
            torch.nn.utils.clip_grad_norm_(alphas, grad_clip)
            adam.step()
            with torch.no_grad():
                for a, floor in zip(alphas, floors, strict=True):
                    a.clamp_(min=floor)
            trace.append(objective.detach())

    # One host copy at the end (tensors may differ in dtype or device).
    values = torch.stack([a.detach().to("cpu", torch.float64) for a in alphas])
    if not bool(torch.isfinite(values).all()):
        bad = [s.name for s, v in zip(specs, values.tolist(), strict=True) if not math.isfinite(v)]
        raise FloatingPointError(
            f"SFW-Init diverged: non-finite scales for {bad} (model left unchanged; "
            "try a smaller lr or grad_clip)"
        )
    with torch.no_grad():
        for s, a in zip(specs, alphas, strict=True):
            s.param.copy_(s.cset.shift_inside(s.param * a.to(s.param.dtype)))
    objective_trace = torch.stack(trace).double().cpu().tolist()
    return SFWInitResult(
        scales={s.name: float(v) for s, v in zip(specs, values.tolist(), strict=True)},
        objective=objective_trace,
        iters=iters,
        seconds=time.perf_counter() - start,
    )
