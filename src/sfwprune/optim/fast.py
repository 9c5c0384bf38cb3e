"""The fast SFW step: the reference step's results with far less work per tensor.

Same math as :mod:`sfwprune.optim.reference` (``m ← ρm + (1-ρ)g``, ``v = lmo(m)``,
``θ ← θ + η(v - θ)``), computed differently:

- Momentum for all tensors at once with ``torch._foreach_lerp_`` (one bucket per ρ).
- Sparse sets (K-sparse, L1 = K-sparse with K = 1, K-support) never build the dense vertex.
  With ``S`` the top-K coordinates of ``|m|`` (exact; see :mod:`.topk`)::

      ||θ - v||² = ||θ with θ_S := 0||² + ||θ_S - v_S||²      (no cancellation)
      θ ← (1-η) θ   off S;     θ_S ← θ_S + η (v_S - θ_S)   on S

  so a step is a few dense passes (|m|, a compare, two dot products, one scaling) plus O(K).
- CPU float tensors run that through NumPy views of the same memory (small per-call cost,
  fast compare and compaction); large ones keep their top-K candidates between steps
  (:class:`.topk.TopKTracker`), small ones are stepped together as one concatenation.
- Other tensors (CUDA, half precision) use ``torch.topk``, keep every ``η`` on the device as a
  0-dim tensor (no host synchronisation) and batch norms and scalings with ``torch._foreach_*``.
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
from .topk import TopKTracker

Tensor = torch.Tensor
# CPU tensors up to this many elements are stepped together, as one NumPy concatenation.
TINY = 4096
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


def _spec_key(group: dict[str, Any], n: int) -> tuple:
    return (group.get("constraint"), group.get("k"), group.get("p"), group.get("radius"), n)


class FastStepCache:
    """What the fast step keeps between calls; none of it changes results.

    ``specs``: resolved sets per (group values, numel). ``plan``: how each tensor is stepped,
    rebuilt when the tensors, their storage or their sets change. ``trackers``: top-K state of
    large CPU tensors. ``vectors``: per-device hyperparameter vectors. ``use_numpy``: CPU float
    tensors take the NumPy kernels; ``False`` forces the torch kernel that CUDA tensors use.
    """

    def __init__(self) -> None:
        self.specs: dict[tuple, _Spec] = {}
        self.plan: _Plan | None = None
        self.plan_key: tuple | None = None
        self.trackers: dict[int, TopKTracker] = {}
        self.vectors: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}
        self.use_numpy = True
        self._scratch: dict[np.dtype, np.ndarray] = {}

    def spec(self, group: dict[str, Any], n: int) -> _Spec:
        key = _spec_key(group, n)
        found = self.specs.get(key)
        if found is None:
            found = self.specs[key] = _resolve(group, n)
        return found

    def scratch(self, n: int, dtype: np.dtype) -> np.ndarray:
        """A reusable 1-d work array of ``n`` elements (one per dtype, grown as needed)."""
        buf = self._scratch.get(dtype)
        if buf is None or buf.size < n:
            buf = self._scratch[dtype] = np.empty(n, dtype=dtype)
        return buf[:n]


def _fixed_eta(rescale: str | None, lr: float, l2_diameter: float) -> float:
    return min(max(lr / l2_diameter if rescale == "diameter" else lr, 0.0), 1.0)


def _eta(group: dict, spec: _Spec, mm: float, d2: float) -> float:
    """``η`` as a Python float from ``||m||²`` and ``||θ - v||²`` (NaN propagates)."""
    lr, rescale = float(group["lr"]), group["rescale"]
    if rescale != "gradient":
        return _fixed_eta(rescale, lr, spec.l2_diameter)
    eta = lr * math.sqrt(mm / d2) if d2 > 0 else 0.0
    return min(max(eta, 0.0), 1.0) if eta == eta else eta


def _memory_flat(p: Tensor, m: Tensor) -> tuple[Tensor, Tensor] | None:
    """1-d views of ``p`` and ``m`` in memory order (the same order for both), or None.

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
    tracker: TopKTracker,
    scratch: np.ndarray,
    want_gap: bool,
) -> tuple[float, float | None]:
    """One sparse-set step of a large tensor on 1-d NumPy views, in place: ``(η, fw_gap)``."""
    a = np.abs(m, out=scratch)
    mm = float(np.dot(a, a))
    idx = tracker.select(a, spec.k, mm)
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
    d2 = float(np.dot(theta, theta)) + float(np.dot(d_s, d_s))
    eta = _eta(group, spec, mm, d2)
    theta *= 1.0 - eta
    d_s *= eta
    d_s += th_s
    theta[idx] = d_s
    return eta, gap


class _TinyBatch:
    """Small CPU tensors of one dtype, stepped as one concatenation (few NumPy calls in all).

    Per-tensor sums are ``np.bincount`` over segment ids; only the top-K partition runs per
    tensor.
    """

    def __init__(self, entries: list[tuple], dtype: np.dtype) -> None:
        # entries: (item index, param, θ view, m view, spec)
        self.index = [e[0] for e in entries]
        self.params = [e[1] for e in entries]
        self.thetas = [e[2] for e in entries]
        self.ms = [e[3] for e in entries]
        self.specs = [e[4] for e in entries]
        sizes = np.array([t.size for t in self.thetas])
        ks = np.array([s.k for s in self.specs])
        ends = np.cumsum(sizes)
        starts = ends - sizes
        count = len(entries)
        self.bounds = [(int(s), int(e), int(k)) for s, e, k in zip(starts, ends, ks)]
        # k == n: every coordinate is selected, in index order
        self.fixed = [np.arange(s, e) if k >= e - s else None for s, e, k in self.bounds]
        self.seg = np.repeat(np.arange(count), sizes)
        self.seg_s = np.repeat(np.arange(count), ks)
        self.radius_s = np.repeat([s.radius for s in self.specs], ks).astype(dtype)
        scaled = np.array([s.op == "scaled" for s in self.specs])
        self.scaled_s = np.repeat(scaled, ks) if scaled.any() else None
        self.m_all = np.empty(int(sizes.sum()), dtype=dtype)
        self.theta_all = np.empty(int(sizes.sum()), dtype=dtype)
        self.tiny = np.finfo(dtype).tiny

    def step(self, groups: list[dict], want_gap: bool) -> tuple[list[float], list | None]:
        count = len(self.thetas)
        m, theta = self.m_all, self.theta_all
        np.concatenate(self.ms, out=m)
        np.concatenate(self.thetas, out=theta)
        a = np.abs(m)
        parts = []
        for (s, e, k), fixed in zip(self.bounds, self.fixed):
            if fixed is None:
                parts.append(np.argpartition(a[s:e], e - s - k)[e - s - k :] + s)
            else:
                parts.append(fixed)
        idx = np.concatenate(parts)  # segment-major: matches seg_s
        m_s, th_s = m[idx], theta[idx]
        v_s = np.sign(m_s)
        v_s *= -self.radius_s
        if self.scaled_s is not None:
            norm = np.sqrt(np.bincount(self.seg_s, m_s * m_s, count))
            coef = -self.radius_s / np.maximum(norm, self.tiny)[self.seg_s]
            v_s = np.where(self.scaled_s, m_s * coef, v_s).astype(m.dtype)
        d_s = v_s - th_s
        gaps = None
        if want_gap:
            gaps = np.bincount(self.seg, m * theta, count) - np.bincount(
                self.seg_s, m_s * v_s, count
            )
        theta[idx] = 0.0
        d2 = np.bincount(self.seg, theta * theta, count) + np.bincount(self.seg_s, d_s * d_s, count)
        mm = np.bincount(self.seg, a * a, count)
        etas = [_eta(g, s, float(x), float(y)) for g, s, x, y in zip(groups, self.specs, mm, d2)]
        eta = np.array(etas)
        theta *= (1.0 - eta)[self.seg]
        d_s *= eta[self.seg_s]
        d_s += th_s
        theta[idx] = d_s
        for (s, e, _), view in zip(self.bounds, self.thetas):
            view[...] = theta[s:e]
        return etas, None if gaps is None else gaps.tolist()


def _hyper_vectors(
    cache: FastStepCache, entries: list[tuple], groups: list[dict], device: torch.device,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(lr, fixed η, uses-gradient-rescale) per entry, as device tensors, cached by value."""
    values = tuple(
        (float(g["lr"]), g["rescale"], e[4].l2_diameter) for e, g in zip(entries, groups)
    )
    key = (device, dtype, values)
    found = cache.vectors.get(key)
    if found is None:
        if len(cache.vectors) > 64:
            cache.vectors.clear()
        lr = torch.tensor([v[0] for v in values], dtype=dtype)
        fixed = torch.tensor([_fixed_eta(r, x, d) for x, r, d in values], dtype=dtype)
        grad = torch.tensor([r == "gradient" for _, r, _ in values], dtype=torch.bool)
        found = cache.vectors[key] = (lr.to(device), fixed.to(device), grad.to(device))
    return found


def _sparse_torch(
    entries: list[tuple], groups: list[dict], cache: FastStepCache, rows: list | None
) -> None:
    """Sparse-set steps of same-device, same-dtype tensors; every ``η`` stays on the device.

    ``entries``: ``(item index, param, θ flat, m flat, spec)``.
    """
    idxs, th_ss, d_ss = [], [], []
    for i, _, theta, m, spec in entries:
        n = m.numel()
        if spec.k < n:
            idx = torch.topk(m.abs(), spec.k, sorted=False).indices
        else:
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
    lr, fixed, use_grad = _hyper_vectors(cache, entries, groups, thetas[0].device, thetas[0].dtype)
    m_norm = torch.stack(torch._foreach_norm([e[3] for e in entries]))
    d_norm = torch.hypot(
        torch.stack(torch._foreach_norm(thetas)), torch.stack(torch._foreach_norm(d_ss))
    )
    eta_g = torch.where(d_norm > 0, lr * m_norm / d_norm, torch.zeros_like(d_norm))
    eta = torch.where(use_grad, torch.clamp(eta_g, 0.0, 1.0), fixed)
    etas = eta.unbind(0)
    torch._foreach_mul_(thetas, (1.0 - eta).unbind(0))
    torch._foreach_addcmul_(th_ss, d_ss, etas)  # θ_S + η (v_S - θ_S)
    for j, (i, *_rest) in enumerate(entries):
        thetas[j].index_copy_(0, idxs[j], th_ss[j])
        if rows is not None:
            rows[i]["step_size"] = etas[j].clone()


class _Plan:
    """How each stepped tensor is handled; valid while tensors, storage and sets are unchanged."""

    def __init__(self, items: list[tuple], ms: list[Tensor], cache: FastStepCache) -> None:
        self.unconstrained: list[int] = []
        self.reference: list[tuple[int, _Spec]] = []
        self.large: list[tuple] = []  # (i, param, θ numpy, m numpy, spec, tracker)
        self.tiny: list[_TinyBatch] = []
        self.on_device: dict[tuple, list[tuple]] = {}
        tiny: dict[np.dtype, list[tuple]] = {}
        for i, ((_, group, p), m) in enumerate(zip(items, ms)):
            spec = cache.spec(group, p.numel())
            if spec.op == "unconstrained":
                self.unconstrained.append(i)
                continue
            flat = _memory_flat(p, m) if spec.op != "dense" else None
            if flat is None:
                self.reference.append((i, spec))
                continue
            theta, m_flat = flat
            if cache.use_numpy and theta.device.type == "cpu" and theta.dtype in _NUMPY_DTYPES:
                th_np, m_np = theta.numpy(), m_flat.numpy()
                if th_np.size <= TINY:
                    tiny.setdefault(th_np.dtype, []).append((i, p, th_np, m_np, spec))
                else:
                    tracker = cache.trackers.setdefault(id(p), TopKTracker())
                    self.large.append((i, p, th_np, m_np, spec, tracker))
            else:
                key = (theta.device, theta.dtype)
                self.on_device.setdefault(key, []).append((i, p, theta, m_flat, spec))
        self.tiny = [_TinyBatch(entries, dtype) for dtype, entries in tiny.items()]

    def run(self, items: list[tuple], ms: list[Tensor], cache: FastStepCache, rows: list | None):
        want = rows is not None
        for i, p, theta, m, spec, tracker in self.large:
            scratch = cache.scratch(m.size, m.dtype)
            eta, gap = _sparse_numpy(theta, m, spec, items[i][1], tracker, scratch, want)
            if rows is not None:
                rows[i] = _row(torch.tensor(gap, dtype=p.dtype), torch.tensor(eta, dtype=p.dtype))
        for batch in self.tiny:
            etas, gaps = batch.step([items[i][1] for i in batch.index], want)
            if rows is not None and gaps is not None:
                for i, p, eta, gap in zip(batch.index, batch.params, etas, gaps):
                    rows[i] = _row(
                        torch.tensor(gap, dtype=p.dtype), torch.tensor(eta, dtype=p.dtype)
                    )
        if _increment_version is not None:  # NumPy wrote these tensors: tell autograd
            for entry in self.large:
                _increment_version(entry[1])
            for batch in self.tiny:
                for p in batch.params:
                    _increment_version(p)
        for entries in self.on_device.values():
            _sparse_torch(entries, [items[e[0]][1] for e in entries], cache, rows)
        for i, spec in self.reference:
            row = _reference_update(items[i][2], ms[i], items[i][1], spec, want)
            if rows is not None:
                rows[i] = row
        by_lr: dict[float, list[int]] = {}
        for i in self.unconstrained:
            by_lr.setdefault(float(items[i][1]["lr"]), []).append(i)
        for lr, idx in by_lr.items():
            torch._foreach_add_([items[i][2] for i in idx], [ms[i] for i in idx], alpha=-lr)
            if rows is not None:
                for i in idx:
                    rows[i] = _row(None, torch.tensor(lr))


@torch.no_grad()
def sfw_step_fast(
    param_groups: list[dict[str, Any]],
    state: dict[Tensor, dict[str, Any]],
    diagnostics: list | None,
    cache: FastStepCache,
) -> None:
    """One SFW step for every parameter with a gradient, in all groups at once.

    Same results as :func:`.reference.sfw_group_step_reference` on each group, up to rounding;
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
    ms = _momentum_(items, state)
    key = (
        cache.use_numpy,
        tuple(
            (id(p), p.data_ptr(), m.data_ptr(), p.numel(), p.dtype, _spec_key(g, p.numel()))
            for (_, g, p), m in zip(items, ms)
        ),
    )
    if cache.plan is None or cache.plan_key != key:
        cache.plan, cache.plan_key = _Plan(items, ms, cache), key
    rows: list | None = [None] * len(items) if diagnostics is not None else None
    cache.plan.run(items, ms, cache, rows)
    if diagnostics is not None and rows is not None:
        for (gi, group, _), row in zip(items, rows):
            row["name"] = group.get("name", str(gi))
            diagnostics.append(row)
