"""One *virtual* SFW step, differentiable in the parameters, and SFW-Init's objective.

For a tensor ``θ`` with gradient ``g`` (the first SFW step has ``m_0 = g_0``):

    v = lmo(g)  (a constant),   θ' = θ + η (v - θ),   η = clamp(lr·||g|| / ||θ - v||, 0, 1)

(``η = clamp(lr/D, 0, 1)`` for ``rescale="diameter"``, ``clamp(lr, 0, 1)`` for ``None``);
unconstrained tensors take ``θ' = θ - lr·g``. SFW-Init (docs/algorithm.md §5) minimises
``L_B(θ') / lr`` over per-tensor scales ``α`` with ``θ = α·θ⁰``, differentiating through ``g``
(second order) but not through ``v``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..constraints import ConstraintSet, constraint_from_group
from ..optim import SFW

Tensor = torch.Tensor
Batch = tuple[Tensor, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class TensorSpec:
    """What SFW-Init needs about one trainable parameter tensor (from its SFW param group)."""

    name: str
    param: nn.Parameter
    cset: ConstraintSet
    lr: float
    rescale: str | None
    floor: float  # smallest allowed scale α: min_scale, or 0 for biases


def tensor_specs(model: nn.Module, optimizer: SFW, min_scale: float) -> list[TensorSpec]:
    """One :class:`TensorSpec` per trainable parameter of ``model``, in ``named_parameters`` order.

    Raises ``ValueError`` unless ``optimizer`` is an :class:`~sfwprune.SFW` whose param groups
    hold exactly the model's trainable parameters, each once.
    """
    if not isinstance(optimizer, SFW):
        raise ValueError(
            f"Invalid optimizer: {type(optimizer).__name__} (expected an sfwprune.SFW built "
            "from sfwprune.constraint_groups(model))"
        )
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    group_of: dict[int, dict] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError(
                    f"Invalid optimizer: group {group.get('name', '?')!r} holds a tensor of shape "
                    f"{tuple(p.shape)} that is not a trainable parameter of the model"
                )
            if id(p) in group_of:
                raise ValueError(f"Invalid optimizer: parameter {names[id(p)]!r} is in two groups")
            group_of[id(p)] = group
    missing = [n for i, n in names.items() if i not in group_of]
    if missing:
        raise ValueError(
            f"Invalid optimizer: no param group for {missing!r} (expected groups covering "
            "every trainable parameter, e.g. from sfwprune.constraint_groups(model))"
        )
    specs = []
    for name, p in model.named_parameters():
        if id(p) not in group_of:
            continue
        group = group_of[id(p)]
        specs.append(
            TensorSpec(
                name=name,
                param=p,
                cset=constraint_from_group(group, p.numel()),
                lr=float(group["lr"]),
                rescale=group["rescale"],
                floor=0.0 if name.endswith("bias") else float(min_scale),
            )
        )
    return specs


def objective_lr(specs: list[TensorSpec]) -> float:
    """The SFW lr the objective is divided by: the largest lr of the constrained tensors (they
    are usually equal; unconstrained groups carry their own lr, see ``unconstrained_lr``)."""
    constrained = [s for s in specs if getattr(s.cset, "kind", None) != "unconstrained"]
    lr = max((s.lr for s in constrained or specs), default=0.0)
    if not lr > 0:
        raise ValueError(
            f"Invalid optimizer lr: {lr!r} (expected an SFW lr > 0; a step of size 0 leaves "
            "nothing for SFW-Init to learn)"
        )
    return lr


def step_size(
    rescale: str | None, lr: float, grad: Tensor, direction: Tensor, cset: ConstraintSet
) -> Tensor:
    """The SFW step ``η`` in [0, 1], differentiable in ``grad`` and ``direction = v - θ``.

    Unlike the optimizer's version, a zero ``||θ - v||`` is replaced *before* dividing, so the
    backward pass never multiplies 0 by inf (``vector_norm``'s own derivative at 0 is 0).
    """
    if rescale == "gradient":
        d_norm = torch.linalg.vector_norm(direction)
        g_norm = torch.linalg.vector_norm(grad)
        d_ok = d_norm > 0
        safe_d = torch.where(d_ok, d_norm, torch.ones_like(d_norm))
        # θ already at the vertex: any η gives the same point; take 0 like the optimizer.
        eta = torch.where(d_ok, lr * g_norm / safe_d, torch.zeros_like(d_norm))
    elif rescale == "diameter":
        eta = torch.tensor(lr / cset.l2_diameter, dtype=grad.dtype, device=grad.device)
    else:
        eta = torch.tensor(lr, dtype=grad.dtype, device=grad.device)
    return torch.clamp(eta, 0.0, 1.0)


def virtual_sfw_step(
    theta: Tensor, grad: Tensor, cset: ConstraintSet, lr: float, rescale: str | None
) -> Tensor:
    """``θ' = θ + η (v - θ)`` with ``v = lmo(g)`` held constant (``θ - lr·g`` if unconstrained).

    Differentiable in ``theta`` and ``grad`` (pass ``grad`` from ``autograd.grad(...,
    create_graph=True)`` to differentiate through the gradient).

    Example:
        >>> cset = KSparsePolytope(n=3, k=1, radius=1.0)
        >>> virtual_sfw_step(torch.zeros(3), torch.tensor([0.0, 2.0, 0.0]), cset, 0.5, None)
        tensor([ 0.0000, -0.5000,  0.0000])
    """
    if cset.kind == "unconstrained":
        return theta - lr * grad
    v = cset.lmo(grad.detach())
    direction = v - theta
    return theta + step_size(rescale, lr, grad, direction, cset) * direction


@contextmanager
def batch_stats_mode(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Train mode for the block (BatchNorm uses batch statistics); yields *copies* of the buffers.

    Pass the copies to ``functional_call`` so running statistics update the copies, never the
    model. Each module's ``training`` flag is restored on exit.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.train()
    try:
        yield {n: b.detach().clone() for n, b in model.named_buffers()}
    finally:
        for m, flag in flags:
            m.training = flag


def to_device(batch: Batch, device: torch.device) -> Batch:
    """``(x, y)`` on ``device`` (a no-op when already there)."""
    x, y = batch
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def scaled_objective(
    model: nn.Module,
    specs: list[TensorSpec],
    alphas: list[Tensor],
    buffers: Mapping[str, Tensor],
    grad_batch: Batch,
    eval_batch: Batch,
    loss_fn: LossFn,
    lr_ref: float,
) -> Tensor:
    """``L_B(θ') / lr_ref`` with ``θ_j = α_j·θ⁰_j``, ``θ'`` one virtual SFW step on ``grad_batch``.

    ``θ⁰`` is the current value of each ``spec.param``; ``buffers`` are passed to
    ``functional_call`` (give copies to keep running statistics untouched).
    """
    thetas = [s.param.detach() * a.to(s.param.dtype) for s, a in zip(specs, alphas, strict=True)]
    # Constant scales (e.g. a finite-difference probe) still need g = ∂L/∂θ.
    thetas = [t if t.requires_grad else t.requires_grad_() for t in thetas]
    params = {s.name: theta for s, theta in zip(specs, thetas, strict=True)}
    x, y = grad_batch
    loss = loss_fn(functional_call(model, (params, dict(buffers)), (x,)), y)
    grads = torch.autograd.grad(loss, thetas, create_graph=True, allow_unused=True)
    stepped = {}
    for s, theta, g in zip(specs, thetas, grads, strict=True):
        g = torch.zeros_like(theta) if g is None else g
        stepped[s.name] = virtual_sfw_step(theta, g, s.cset, s.lr, s.rescale)
    x, y = eval_batch
    return loss_fn(functional_call(model, (stepped, dict(buffers)), (x,)), y) / lr_ref


def first_step_objective(
    model: nn.Module,
    optimizer: SFW,
    scales: Mapping[str, Tensor],
    grad_batch: Batch,
    eval_batch: Batch,
    *,
    loss_fn: LossFn = F.cross_entropy,
) -> Tensor:
    """SFW-Init's objective ``L_B(θ + η(v - θ)) / lr`` at ``θ_j = scales[j]·θ_j`` (differentiable).

    Uses batch statistics for BatchNorm and leaves running statistics and the model untouched.
    ``scales`` maps every trainable parameter name to a 0-dim tensor (missing names: scale 1).

    Example:
        >>> a = {n: torch.ones((), requires_grad=True) for n, _ in model.named_parameters()}
        >>> first_step_objective(model, opt, a, (x0, y0), (x1, y1)).backward()
    """
    specs = tensor_specs(model, optimizer, 0.0)
    unknown = sorted(set(scales) - {s.name for s in specs})
    if unknown:
        raise ValueError(f"Invalid scales: {unknown!r} (not trainable parameters of the model)")
    alphas = [
        scales.get(s.name, torch.ones((), dtype=s.param.dtype, device=s.param.device))
        for s in specs
    ]
    device = specs[0].param.device if specs else torch.device("cpu")
    with torch.enable_grad(), batch_stats_mode(model) as buffers:
        return scaled_objective(
            model,
            specs,
            alphas,
            buffers,
            to_device(grad_batch, device),
            to_device(eval_batch, device),
            loss_fn,
            objective_lr(specs),
        )
