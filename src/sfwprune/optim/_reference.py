"""The plain per-tensor SFW step: the readable ground truth every fast path is tested against.

Per tensor, with momentum ``ρ`` (docs/algorithm.md):

    m   = g                       on the first step, else  m = ρ m + (1-ρ) g
    v   = lmo(m)
    η   = clamp(lr·||m||/||θ - v||, 0, 1)   (rescale="gradient")
        | clamp(lr / D, 0, 1)                (rescale="diameter", D the L2 diameter)
        | clamp(lr, 0, 1)                    (rescale=None)
    θ  <- θ + η (v - θ)

Unconstrained tensors take ``θ <- θ - lr·m``. Every set kind, and diagnostics, run here.
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


def reference_update_(p: Tensor, m: Tensor, group: dict[str, Any]) -> dict[str, Any]:
    """``θ`` of ``p`` stepped from its already updated momentum ``m``; returns the diagnostics
    row (``fw_gap = <m, θ - v>``, ``step_size = η``; ``fw_gap`` None when unconstrained)."""
    lr = group["lr"]
    cset = constraint_from_group(group, p.numel())
    if cset.kind == "unconstrained":
        p.add_(m, alpha=-lr)
        return {"fw_gap": None, "step_size": torch.tensor(float(lr))}
    direction = cset.lmo(m).sub_(p)
    eta = step_size(group["rescale"], lr, m, direction, cset.l2_diameter)
    # FW gap <m, θ - v> >= 0: an upper bound on the (linearized) suboptimality.
    row = {"fw_gap": -torch.sum(m * direction), "step_size": eta.detach().clone()}
    p.add_(direction.mul_(eta))
    return row


@torch.no_grad()
def reference_step_(
    params: list[Tensor], group: dict[str, Any], state: dict[Tensor, dict[str, Any]]
) -> list[dict[str, Any]]:
    """One SFW step of every tensor in ``params`` (all with a gradient); one row each."""
    rows = []
    for p in params:
        m = update_momentum_(state[p], p.grad, group["momentum"])
        rows.append(reference_update_(p, m, group))
    return rows
