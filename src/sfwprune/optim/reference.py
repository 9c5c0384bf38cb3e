"""The plain per-tensor SFW step: the readable ground truth every fast path is tested against.

Per tensor, with momentum ``ρ`` (REFERENCE §2):

    m   = g                       on the first step, else  m = ρ m + (1-ρ) g
    v   = lmo(m)
    η   = clamp(lr·||m||/||θ - v||, 0, 1)   (rescale="gradient")
        | clamp(lr / D, 0, 1)                (rescale="diameter", D the L2 diameter)
        | clamp(lr, 0, 1)                    (rescale=None)
    θ  <- θ + η (v - θ)

Unconstrained tensors take ``θ <- θ - lr·m``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..constraints import constraint_from_group

Tensor = torch.Tensor


def update_momentum_(state: dict[str, Any], grad: Tensor, momentum: float) -> Tensor:
    """``m = g`` on the first call, then ``m = ρ m + (1-ρ) g``; returns the buffer."""
    buf = state.get("momentum_buffer")
    if buf is None:
        buf = grad.detach().clone(memory_format=torch.preserve_format)
        state["momentum_buffer"] = buf
    else:
        buf.mul_(momentum).add_(grad, alpha=1.0 - momentum)
    return buf


def step_size(
    rescale: str | None, lr: float, m: Tensor, direction: Tensor, l2_diameter: float
) -> Tensor:
    """The Frank-Wolfe step ``η`` in [0, 1] as a 0-dim tensor; ``direction = v - θ``."""
    if rescale == "gradient":
        d_norm = torch.linalg.vector_norm(direction)
        eta = lr * torch.linalg.vector_norm(m) / d_norm
        # θ already at the vertex: any η gives the same point.
        eta = torch.where(d_norm > 0, eta, torch.zeros_like(eta))
    elif rescale == "diameter":
        eta = torch.tensor(lr / l2_diameter, dtype=m.dtype, device=m.device)
    else:
        eta = torch.tensor(lr, dtype=m.dtype, device=m.device)
    return torch.clamp(eta, 0.0, 1.0)


@torch.no_grad()
def sfw_group_step_reference(
    group: dict[str, Any], state: dict[Tensor, dict[str, Any]], diagnostics: list | None
) -> None:
    """One SFW step for every parameter with a gradient in ``group`` (a torch param group)."""
    lr, momentum, rescale = group["lr"], group["momentum"], group["rescale"]
    for p in group["params"]:
        if p.grad is None:
            continue
        m = update_momentum_(state[p], p.grad, momentum)
        cset = constraint_from_group(group, p.numel())
        if cset.kind == "unconstrained":
            p.add_(m, alpha=-lr)
            if diagnostics is not None:
                diagnostics.append({"fw_gap": None, "step_size": torch.tensor(float(lr))})
            continue
        v = cset.lmo(m)
        direction = v - p
        eta = step_size(rescale, lr, m, direction, cset.l2_diameter)
        if diagnostics is not None:
            # FW gap <m, θ - v> >= 0: an upper bound on the (linearized) suboptimality.
            gap = -torch.sum(m * direction)
            diagnostics.append({"fw_gap": gap, "step_size": eta.detach().clone()})
        p.add_(direction * eta)
