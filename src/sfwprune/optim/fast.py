"""The fast SFW step: the reference step's results with far less work per tensor.

Same math as :mod:`sfwprune.optim.reference` (``m ← ρm + (1-ρ)g``, ``v = lmo(m)``,
``θ ← θ + η(v - θ)``), computed differently:

- Momentum for all tensors at once with ``torch._foreach_*`` (one bucket per ρ).
- Sparse sets (K-sparse, L1 = K-sparse with K = 1, K-support) never build the dense vertex.
  With ``S`` the top-K coordinates of ``|m|`` (exact; see :mod:`.topk`)::

      ||θ - v||² = ||θ with θ_S := 0||² + ||θ_S - v_S||²     (no cancellation)
      θ ← (1-η) θ   off S;     θ_S ← θ_S + η (v_S - θ_S)   on S

  so a step is a few dense passes (|m|, a compare, two norms, one scale) plus O(K) work.
- CPU float tensors run that kernel through NumPy views of the same memory (tiny per-call
  overhead, fast compare/compaction) with the previous step's K-th value as the selection hint.
  Other tensors (CUDA, half precision) use ``torch.topk`` and keep every ``η`` on the device as a
  0-dim tensor: no host synchronisation, norms and scalings batched with ``torch._foreach_*``.
- Dense L_p vertices (p > 1) are dense by nature: the reference arithmetic, in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..constraints import constraint_from_group
from ..constraints.lp_ball import lp_ball_lmo
from .reference import step_size
from .topk import select_top_k

Tensor = torch.Tensor
_NUMPY_DTYPES = (torch.float32, torch.float64)
_increment_version = getattr(torch.autograd.graph, "increment_version", None)


@dataclass(frozen=True)
class _Spec:
    """A param group's set, resolved for one tensor size: what the step does with it."""

    op: str  # "unconstrained" | "sign" (K-sparse, L1) | "scaled" (K-support) | "dense" (L_p)
    k: int = 0
    radius: float = 0.0
    l2_diameter: float = math.inf
    p: float = 0.0


class FastStepCache:
    """What the fast step remembers between calls; none of it changes results.

    ``specs``: resolved sets per (group values, numel). ``vectors``: per-device hyperparameter
    vectors (rebuilt when a value changes). ``steps``: calls so far (varies the top-K sample).
    ``use_numpy``: CPU float tensors take the NumPy kernel; ``False`` forces the torch kernel
    that CUDA tensors use (for tests and comparisons).
    """

    def __init__(self) -> None:
        self.specs: dict[tuple, _Spec] = {}
        self.vectors: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}
        self.steps = 0
        self.use_numpy = True
        self._scratch: dict[np.dtype, np.ndarray] = {}

    def scratch(self, n: int, dtype: np.dtype) -> np.ndarray:
        """A reusable 1-d work array of ``n`` elements (one per dtype, grown as needed)."""
        buf = self._scratch.get(dtype)
        if buf is None or buf.size < n:
            buf = self._scratch[dtype] = np.empty(n, dtype=dtype)
        return buf[:n]

    def spec(self, group: dict[str, Any], n: int) -> _Spec:
        key = (group.get("constraint"), group.get("k"), group.get("p"), group.get("radius"), n)
        found = self.specs.get(key)
        if found is None:
            found = self.specs[key] = _resolve(group, n)
        return found


def _resolve(group: dict[str, Any], n: int) -> _Spec:
    cset = constraint_from_group(group, n)
    if cset.kind == "unconstrained":
        return _Spec("unconstrained")
    if cset.kind == "k_sparse":
        return _Spec("sign", cset.k, cset.radius, cset.l2_diameter)
    if cset.kind == "k_support":
        return _Spec("scaled", cset.k, cset.radius, cset.l2_diameter)
    if cset.p == 1.0:  # the L1 ball's vertices are the K-sparse polytope's with K = 1
        return _Spec("sign", 1, cset.radius, cset.l2_diameter)
    return _Spec("dense", 0, cset.radius, cset.l2_diameter, cset.p)


def _fixed_eta(rescale: str | None, lr: float, l2_diameter: float) -> float:
    return min(max(lr / l2_diameter if rescale == "diameter" else lr, 0.0), 1.0)


def _memory_flat(p: Tensor, m: Tensor) -> tuple[Tensor, Tensor] | None:
    """1-d views of ``p`` and ``m`` in memory order (same order for both), or None.

    Top-K and the update are permutation-equivariant, so any common order will do; memory
    order keeps channels_last tensors as views.
    """
    p = p.detach()
    if p.is_contiguous() and m.is_contiguous():
        return p.view(-1), m.view(-1)
    order = sorted(range(p.dim()), key=p.stride, reverse=True)
    pp, mp = p.permute(order), m.permute(order)
    if pp.is_contiguous() and mp.is_contiguous():
        return pp.view(-1), mp.view(-1)
    return None


def _momentum_(items: list[tuple[int, dict, Tensor]], state: dict) -> list[Tensor]:
    """``m = g`` (first step) or ``m = ρm + (1-ρ)g`` for every item; returns the buffers."""
    ms: list[Tensor] = []
    buckets: dict[float, list[int]] = {}
    for i, (_, group, p) in enumerate(items):
        st = state[p]
        buf = st.get("momentum_buffer")
        if buf is None:
            buf = p.grad.detach().clone(memory_format=torch.preserve_format)
            st["momentum_buffer"] = buf
        else:
            buckets.setdefault(float(group["momentum"]), []).append(i)
        ms.append(buf)
    for rho, idx in buckets.items():
        # ρm + (1-ρ)g as m + (1-ρ)(g - m): one pass instead of two, equal up to rounding.
        torch._foreach_lerp_([ms[i] for i in idx], [items[i][2].grad for i in idx], 1.0 - rho)
    return ms


def _row(gap: Tensor | None, eta: Tensor) -> dict[str, Any]:
    return {"fw_gap": gap, "step_size": eta}


def _reference_update(
    p: Tensor, m: Tensor, group: dict, spec: _Spec, want_row: bool
) -> dict[str, Any] | None:
    """The reference arithmetic for one tensor (dense L_p sets and unusual memory layouts)."""
    if spec.op == "dense":
        v = lp_ball_lmo(m, spec.p, spec.radius)
    else:
        v = constraint_from_group(group, p.numel()).lmo(m)
    direction = v.sub_(p)
    eta = step_size(group["rescale"], group["lr"], m, direction, spec.l2_diameter)
    row = _row(-torch.sum(m * direction), eta.detach().clone()) if want_row else None
    p.add_(direction.mul_(eta))
    return row


def _sparse_numpy(
    theta: np.ndarray,
    m: np.ndarray,
    spec: _Spec,
    group: dict,
    cache: FastStepCache,
    want_gap: bool,
) -> tuple[float, float | None]:
    """One sparse-set step on 1-d NumPy views, in place; returns ``(η, fw_gap or None)``."""
    a = np.abs(m, out=cache.scratch(m.size, m.dtype))
    idx, _, _ = select_top_k(a, spec.k, offset=cache.steps)
    m_s, th_s = m.take(idx), theta.take(idx)
    if spec.op == "scaled":
        norm = max(math.sqrt(float(np.dot(m_s, m_s))), np.finfo(m.dtype).tiny)
        v_s = m_s * (-spec.radius / norm)
    else:
        v_s = np.sign(m_s)
        v_s *= -spec.radius
    d_s = v_s - th_s  # (v - θ) on S
    gap = float(np.dot(m, theta)) - float(np.dot(m_s, v_s)) if want_gap else None
    theta[idx] = 0.0
    lr, rescale = float(group["lr"]), group["rescale"]
    if rescale == "gradient":
        d2 = float(np.dot(theta, theta)) + float(np.dot(d_s, d_s))
        eta = lr * math.sqrt(float(np.dot(a, a)) / d2) if d2 > 0 else 0.0
        eta = min(max(eta, 0.0), 1.0) if eta == eta else eta
    else:
        eta = _fixed_eta(rescale, lr, spec.l2_diameter)
    theta *= 1.0 - eta
    d_s *= eta
    d_s += th_s
    theta[idx] = d_s
    return eta, gap


def _hyper_vectors(
    cache: FastStepCache, entries: list[tuple], device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """(lr, fixed η, uses-gradient-rescale) per entry, as device tensors, cached by value."""
    values = tuple(
        (float(g["lr"]), g["rescale"], spec.l2_diameter) for (_, _, _, _, spec, g) in entries
    )
    key = (device, dtype, values)
    found = cache.vectors.get(key)
    if found is None:
        if len(cache.vectors) > 64:
            cache.vectors.clear()
        lr = torch.tensor([v[0] for v in values], dtype=dtype, device=device)
        fixed = torch.tensor([_fixed_eta(r, lr_, d) for lr_, r, d in values], dtype=dtype)
        grad = torch.tensor([r == "gradient" for _, r, _ in values], dtype=torch.bool)
        found = cache.vectors[key] = (lr, fixed.to(device), grad.to(device))
    return found


def _sparse_torch(
    entries: list[tuple], cache: FastStepCache, rows: list | None
) -> None:
    """Sparse-set steps for same-device, same-dtype tensors, with ``η`` kept on the device.

    ``entries``: ``(item index, p, θ flat, m flat, spec, group)``.
    """
    idxs, th_ss, d_ss = [], [], []
    for i, _, theta, m, spec, _ in entries:
        n = m.numel()
        idx = torch.topk(m.abs(), spec.k, sorted=False).indices if spec.k < n else None
        if idx is None:
            idx = torch.arange(n, device=m.device)
        m_s, th_s = m.index_select(0, idx), theta.index_select(0, idx)
        if spec.op == "scaled":
            norm = torch.clamp(torch.linalg.vector_norm(m_s), min=torch.finfo(m.dtype).tiny)
            v_s = m_s * ((-spec.radius) / norm)
        else:
            v_s = torch.sign(m_s).mul_(-spec.radius)
        if rows is not None:
            rows[i] = _row(torch.dot(m, theta) - torch.dot(m_s, v_s), None)  # type: ignore
        theta.index_fill_(0, idx, 0)
        idxs.append(idx)
        th_ss.append(th_s)
        d_ss.append(v_s.sub_(th_s))
    thetas = [e[2] for e in entries]
    lr, fixed, use_grad = _hyper_vectors(cache, entries, thetas[0].device, thetas[0].dtype)
    m_norm = torch.stack(torch._foreach_norm([e[3] for e in entries]))
    d_norm = torch.hypot(torch.stack(torch._foreach_norm(thetas)), torch.stack(torch._foreach_norm(d_ss)))
    eta_g = torch.where(d_norm > 0, lr * m_norm / d_norm, torch.zeros_like(d_norm))
    eta = torch.where(use_grad, torch.clamp(eta_g, 0.0, 1.0), fixed)
    etas = eta.unbind(0)
    torch._foreach_mul_(thetas, (1.0 - eta).unbind(0))
    torch._foreach_addcmul_(th_ss, d_ss, etas)  # θ_S + η (v_S - θ_S)
    for j, (i, *_rest) in enumerate(entries):
        thetas[j].index_copy_(0, idxs[j], th_ss[j])
        if rows is not None:
            rows[i]["step_size"] = etas[j].clone()


@torch.no_grad()
def sfw_step_fast(
    param_groups: list[dict[str, Any]],
    state: dict[Tensor, dict[str, Any]],
    diagnostics: list | None,
    cache: FastStepCache,
) -> None:
    """One SFW step for every parameter with a gradient, in all groups at once.

    Same results as calling :func:`sfw_group_step_reference` on each group (up to rounding);
    ``diagnostics`` (when a list) gets the same rows in the same order, with ``name``.
    """
    items = [
        (gi, group, p)
        for gi, group in enumerate(param_groups)
        for p in group["params"]
        if p.grad is not None
    ]
    if not items:
        return
    cache.steps += 1
    ms = _momentum_(items, state)
    want = diagnostics is not None
    rows: list[dict[str, Any] | None] | None = [None] * len(items) if want else None
    unconstrained: dict[float, list[int]] = {}
    on_device: dict[tuple, list[tuple]] = {}
    for i, (_, group, p) in enumerate(items):
        m = ms[i]
        spec = cache.spec(group, p.numel())
        if spec.op == "unconstrained":
            unconstrained.setdefault(float(group["lr"]), []).append(i)
            continue
        flat = _memory_flat(p, m) if spec.op != "dense" else None
        if flat is None:
            row = _reference_update(p, m, group, spec, want)
            if rows is not None:
                rows[i] = row
            continue
        theta, m_flat = flat
        if cache.use_numpy and theta.device.type == "cpu" and theta.dtype in _NUMPY_DTYPES:
            eta, gap = _sparse_numpy(theta.numpy(), m_flat.numpy(), spec, group, cache, want)
            if _increment_version is not None:
                _increment_version(p)  # NumPy wrote p's memory; let autograd know
            if rows is not None:
                rows[i] = _row(torch.tensor(gap, dtype=p.dtype), torch.tensor(eta, dtype=p.dtype))
        else:
            key = (theta.device, theta.dtype)
            on_device.setdefault(key, []).append((i, p, theta, m_flat, spec, group))
    for entries in on_device.values():
        _sparse_torch(entries, cache, rows)
    for lr, idx in unconstrained.items():
        torch._foreach_add_([items[i][2] for i in idx], [ms[i] for i in idx], alpha=-lr)
        if rows is not None:
            for i in idx:
                rows[i] = _row(None, torch.tensor(lr))
    if diagnostics is not None and rows is not None:
        for (gi, group, _), row in zip(items, rows):
            assert row is not None
            row["name"] = group.get("name", str(gi))
            diagnostics.append(row)
