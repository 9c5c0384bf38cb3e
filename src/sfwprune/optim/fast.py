"""The fast SFW step: the reference step's results with far less work per tensor.

Same math as :mod:`sfwprune.optim.reference` (``m ← ρm + (1-ρ)g``, ``v = lmo(m)``,
``θ ← θ + η(v - θ)``), computed differently:

- Momentum for all tensors at once with ``torch._foreach_lerp_`` (one bucket per ρ).
- Sparse sets (K-sparse, L1 = K-sparse with K = 1, K-support) never build the dense vertex.
  With ``S`` the top-K coordinates of ``|m|`` (exact; see :mod:`.topk`)::

      ||θ - v||² = ||θ with θ_S := 0||² + ||θ_S - v_S||²      (no cancellation)
      θ ← (1-η) θ   off S;     θ_S ← θ_S + η (v_S - θ_S)   on S

  so a step is a few dense passes (two compares, two dot products, one scaling) plus O(K).
- CPU float tensors of K-sparse sets (and L1 balls) take the compiled kernel of
  :mod:`.cpu_kernel` when ``numba`` imports: momentum, threshold and update in four fused
  passes, no index list. Without it (or for K-support sets), NumPy views of the same memory
  (small per-call cost, fast compare and compaction). The top-K threshold is predicted from the last step
  (:class:`.topk.TopKTracker`), so one compare leaves ~1.02·K candidates. Tensors of at most
  ``topk.SMALL`` elements take the reference arithmetic (dense vertex) in a dozen NumPy calls.
- Other tensors (CUDA, half precision) keep every ``η`` on the device (no host
  synchronisation). K-sparse ones of one device and dtype take one batched step
  (:mod:`.flat`: one ``topk`` per group of equal shapes, a fixed number of kernels however many
  tensors); K-support ones (and any, with diagnostics on) go tensor by tensor with
  ``torch.topk`` and ``torch._foreach_*`` norms and scalings.
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
from . import cpu_kernel
from .finite import NonFiniteGradientError, finite_flags
from .flat import FlatEntry, FlatSignPlan
from .reference import step_size
from .topk import SMALL, TopKTracker

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
    CPU tensors. ``vectors``: per-device hyperparameter vectors. ``use_numpy``: CPU float
    tensors take the NumPy kernels; ``False`` forces the torch kernel that CUDA tensors use.
    """

    def __init__(self) -> None:
        self.specs: dict[tuple, _Spec] = {}
        self.plan: _Plan | None = None
        self.plan_key: tuple | None = None
        self.trackers: dict[int, TopKTracker] = {}
        self.vectors: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}
        self.use_numpy = True
        self.use_kernel = cpu_kernel.AVAILABLE
        self.use_graphs = True
        self.kernel_states: dict[int, cpu_kernel.SignKernelState] = {}
        self.fused: tuple[tuple, list[_Fused], list[int]] | None = None
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


def _sign(x: np.ndarray, mm: float) -> np.ndarray:
    """``np.sign(x)`` with NaN mapped to 0, as :func:`torch.sign` does (checked only when
    ``mm = ||m||²`` is not finite), so NaN gradients under ``check_finite=False`` give what the
    reference gives."""
    s = np.sign(x)
    if not math.isfinite(mm):
        s[np.isnan(s)] = 0.0
    return s


def _small_numpy(
    theta: np.ndarray, m: np.ndarray, spec: _Spec, group: dict, want_gap: bool
) -> tuple[float, float | None]:
    """The reference arithmetic (dense vertex) on small 1-d NumPy views: fewest calls."""
    n, k = m.size, spec.k
    a = np.abs(m)
    idx = np.argpartition(a, n - k)[n - k :] if k < n else slice(None)  # NaN counts as largest
    m_s = m[idx]
    mm = float(np.dot(a, a))
    v = np.zeros_like(m)
    if spec.op == "scaled":
        v[idx] = _scaled_vertex(m_s, spec.radius)
    else:
        v[idx] = _sign(m_s, mm) * -spec.radius
    direction = np.subtract(v, theta, out=v)  # v - θ
    gap = -float(np.dot(m, direction)) if want_gap else None
    eta = _eta(group, spec, mm, float(np.dot(direction, direction)))
    direction *= eta
    theta += direction
    return eta, gap


def _scaled_vertex(m_s: np.ndarray, radius: float) -> np.ndarray:
    """K-support vertex on the selected entries: ``-radius · m_s / ||m_s||``; 0 where m_s = 0.

    Scaled by ``max|m_s|`` first, so a tiny (or huge) ``m_s`` neither under- nor overflows."""
    amax = float(np.abs(m_s).max()) if m_s.size else 0.0
    if not amax > 0:
        return np.zeros_like(m_s)
    a = m_s / amax
    return a * (-radius / max(math.sqrt(float(np.dot(a, a))), 1.0))


def _sparse_numpy(
    theta: np.ndarray,
    m: np.ndarray,
    spec: _Spec,
    group: dict,
    tracker: TopKTracker,
    scratch: np.ndarray,
    want_gap: bool,
) -> tuple[float, float | None]:
    """One sparse-set step on 1-d NumPy views, in place; returns ``(η, fw_gap or None)``."""
    mm = float(np.dot(m, m))
    idx, m_s = tracker.select(m, spec.k, mm, scratch)
    th_s = theta.take(idx)
    if spec.op == "scaled":
        v_s = _scaled_vertex(m_s, spec.radius)
    else:
        v_s = _sign(m_s, mm)
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
            amax = m_s.abs().max()
            a = m_s / torch.clamp(amax, min=torch.finfo(m.dtype).tiny)
            v_s = a * ((-spec.radius) / torch.clamp(torch.linalg.vector_norm(a), min=1.0))
            v_s = torch.where(amax > 0, v_s, torch.zeros_like(v_s))
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


def _split_fused(items: list[tuple], cache: FastStepCache) -> tuple[list[_Fused], list[int]]:
    """``(fused, rest)``: tensors the compiled kernel steps, and the indices of the others.

    Fused: CPU float32/float64, contiguous, a K-sparse (or L1) set. Cached while the tensors,
    their storage and their sets are unchanged.
    """
    # A new storage (p.data = ...) changes data_ptr; so do dtype, size and layout changes.
    key = (cache.use_numpy, cache.use_kernel, len(items)) + tuple(
        x
        for _, g, p in items
        for x in (id(p), p.data_ptr(), g.get("constraint"), g.get("k"), g.get("p"), g.get("radius"))
    )
    if cache.fused is not None and cache.fused[0] == key:
        return cache.fused[1], cache.fused[2]
    fused, rest = [], []
    for i, (_, group, p) in enumerate(items):
        spec = cache.spec(group, p.numel())
        ok = (
            cache.use_numpy
            and cache.use_kernel
            and spec.op == "sign"
            and p.device.type == "cpu"
            and p.dtype in _NUMPY_DTYPES
            and p.is_contiguous()
        )
        if not ok:
            rest.append(i)
            continue
        dtype = np.dtype(str(p.dtype).removeprefix("torch."))
        kst = cache.kernel_states.get(id(p))
        if kst is None or kst.band.size != p.numel() or kst.band.dtype != dtype:
            kst = cache.kernel_states[id(p)] = cpu_kernel.SignKernelState(p.numel(), dtype)
        fused.append(_Fused(i, p, spec, kst))
    cache.fused = (key, fused, rest)
    return fused, rest


class _Fused:
    """One tensor the compiled kernel steps: its flat NumPy views and kernel state."""

    __slots__ = ("i", "p", "theta", "spec", "kst", "views")

    def __init__(self, i: int, p: Tensor, spec: _Spec, kst: cpu_kernel.SignKernelState):
        self.i, self.p, self.spec, self.kst = i, p, spec, kst
        self.theta = p.detach().view(-1).numpy()
        self.views: dict[int, np.ndarray] = {}  # NumPy view of the momentum buffer, by address

    def view(self, buf: Tensor) -> np.ndarray:
        ptr = buf.data_ptr()
        found = self.views.get(ptr)
        if found is None:
            self.views.clear()
            found = self.views[ptr] = buf.detach().view(-1).numpy()
        return found


def _grad_view(f: _Fused) -> np.ndarray | None:
    """The gradient as a flat NumPy view in the weights' memory order, or None (other layout)."""
    g = f.p.grad
    if g.requires_grad:
        g = g.detach()
    return g.view(-1).numpy() if g.is_contiguous() and g.dtype == f.p.dtype else None


def _grad_finite(f: _Fused) -> bool:
    g_np = _grad_view(f)
    return bool(cpu_kernel.all_finite(g_np)) if g_np is not None else bool(
        torch.isfinite(f.p.grad).all()
    )  # fmt: skip


def _fused_momentum(f: _Fused, group: dict, st: dict) -> tuple[np.ndarray, float]:
    """The momentum of ``f.p`` updated in place; ``(m flat, ||m||²)``."""
    p = f.p
    rho = group["momentum"]
    buf = st.get("momentum_buffer")
    mode = cpu_kernel.MODE_LERP
    if buf is None:
        buf = st["momentum_buffer"] = torch.empty_like(p, memory_format=torch.contiguous_format)
        mode = cpu_kernel.MODE_FIRST
    elif not buf.is_contiguous():
        buf = st["momentum_buffer"] = buf.contiguous()
    m = f.view(buf)
    g_np = _grad_view(f)
    if g_np is None:  # unusual gradient layout: torch updates m, the kernel reads it
        g = p.grad.detach()
        if mode == cpu_kernel.MODE_FIRST:
            buf.copy_(g)
        else:
            buf.lerp_(g.to(buf.dtype), 1.0 - rho)
        mode = cpu_kernel.MODE_READY
    return m, cpu_kernel.momentum_(m, g_np, mode, rho)


def _fused_finish(
    f: _Fused, m: np.ndarray, mm: float, group: dict, cache: FastStepCache, want_gap: bool
) -> tuple[float, float | None]:
    """The SFW step of ``f.p`` from its updated momentum ``m`` (``||m||² = mm``)."""
    spec, theta = f.spec, f.theta
    scratch = cache.scratch(m.size, m.dtype)
    rescale, lr = group["rescale"], float(group["lr"])
    use_grad, fixed = rescale == "gradient", _fixed_eta(rescale, lr, spec.l2_diameter)
    if m.size <= SMALL:
        out = cpu_kernel.small_finish(theta, m, spec.k, spec.radius, use_grad, lr, fixed, scratch)
    else:
        out = cpu_kernel.finish(
            theta, m, mm, spec.k, spec.radius, use_grad, lr, fixed, f.kst, scratch
        )
    if out is not None:
        return out[0], (out[1] if want_gap else None)
    # ||m|| not finite (NaN/inf gradients with check_finite=False): θ is untouched so far; the
    # NumPy kernels order NaN as torch.topk does and take sign(NaN) = 0 as torch.sign does.
    if m.size <= SMALL:
        return _small_numpy(theta, m, spec, group, want_gap)
    tracker = cache.trackers.setdefault(id(f.p), TopKTracker())
    return _sparse_numpy(theta, m, spec, group, tracker, scratch, want_gap)


class _Plan:
    """How each stepped tensor is handled; valid while tensors, storage and sets are unchanged."""

    def __init__(self, items: list[tuple], ms: list[Tensor], cache: FastStepCache) -> None:
        self.unconstrained: list[int] = []
        self.reference: list[tuple[int, _Spec]] = []
        self.on_cpu: list[tuple] = []  # (i, param, θ numpy, m numpy, spec, tracker)
        self.on_device: dict[tuple, list[tuple]] = {}
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
                tracker = (
                    cache.trackers.setdefault(id(p), TopKTracker()) if p.numel() > SMALL else None
                )
                self.on_cpu.append((i, p, theta.numpy(), m_flat.numpy(), spec, tracker))
            else:
                key = (theta.device, theta.dtype, spec.op == "sign")
                self.on_device.setdefault(key, []).append((i, p, theta, m_flat, spec))
        # K-sparse (and L1) tensors of one device and dtype: one batched step (.flat)
        self.flat_entries = {
            key: [FlatEntry(e[2], e[3], e[4].k, e[4].radius) for e in entries]
            for key, entries in self.on_device.items()
            if key[2]
        }
        self.flat = {
            key: FlatSignPlan(ents, graphs=cache.use_graphs)
            for key, ents in self.flat_entries.items()
        }

    def run(self, items: list[tuple], ms: list[Tensor], cache: FastStepCache, rows: list | None):
        want = rows is not None
        for i, p, theta, m, spec, tracker in self.on_cpu:
            if m.size <= SMALL:
                eta, gap = _small_numpy(theta, m, spec, items[i][1], want)
            else:
                scratch = cache.scratch(m.size, m.dtype)
                eta, gap = _sparse_numpy(theta, m, spec, items[i][1], tracker, scratch, want)
            if _increment_version is not None:  # NumPy wrote p's memory: tell autograd
                _increment_version(p)
            if rows is not None:
                rows[i] = _row(torch.tensor(gap, dtype=p.dtype), torch.tensor(eta, dtype=p.dtype))
        for key, entries in self.on_device.items():
            groups = [items[e[0]][1] for e in entries]
            if key in self.flat and rows is None:
                lr, fixed, use_grad = _hyper_vectors(cache, entries, groups, key[0], key[1])
                self.flat[key].step(self.flat_entries[key], lr, fixed, use_grad)
            else:  # K-support sets, or diagnostics (per-tensor FW gaps): tensor by tensor
                _sparse_torch(entries, groups, cache, rows)
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


def _group_name(item: tuple) -> str:
    gi, group, _ = item
    return group.get("name", str(gi))


@torch.no_grad()
def sfw_step_fast(
    param_groups: list[dict[str, Any]],
    state: dict[Tensor, dict[str, Any]],
    diagnostics: list | None,
    cache: FastStepCache,
    check_finite: bool = False,
) -> None:
    """One SFW step for every parameter with a gradient, in all groups at once.

    Same results as :func:`.reference.sfw_group_step_reference` on each group, up to rounding;
    ``diagnostics`` (when a list) gets the same rows in the same order, with ``name``.
    ``check_finite``: raise :class:`.finite.NonFiniteGradientError`, with nothing changed, if
    a gradient holds NaN or inf.
    """
    items = [
        (gi, group, p)
        for gi, group in enumerate(param_groups)
        for p in group["params"]
        if p.grad is not None
    ]
    if not items:
        return
    rows: list | None = [None] * len(items) if diagnostics is not None else None
    fused, rest = _split_fused(items, cache)
    if check_finite and rest:
        grads = [items[i][2].grad for i in rest]
        finite = finite_flags(grads)
        if not bool(finite.all()):
            raise NonFiniteGradientError(_group_name(items[rest[int(torch.nonzero(~finite)[0])]]))
    if check_finite:  # every gradient, before anything changes
        for f in fused:
            if not _grad_finite(f):
                raise NonFiniteGradientError(_group_name(items[f.i]))
    for f in fused:
        _, group, p = items[f.i]
        m, mm = _fused_momentum(f, group, state[p])
        eta, gap = _fused_finish(f, m, mm, group, cache, rows is not None)
        if rows is not None:
            rows[f.i] = _row(torch.tensor(gap, dtype=p.dtype), torch.tensor(eta, dtype=p.dtype))
    if _increment_version is not None:  # NumPy wrote the params: tell autograd
        for f in fused:  # one call each: torch < 2.5 takes no list
            _increment_version(f.p)
    if rest:
        sub = items if len(rest) == len(items) else [items[i] for i in rest]
        ms = _momentum_(sub, state)
        key = (
            cache.use_numpy,
            cache.use_graphs,
            tuple(
                (id(p), p.data_ptr(), m.data_ptr(), p.numel(), p.dtype, _spec_key(g, p.numel()))
                for (_, g, p), m in zip(sub, ms)
            ),
        )
        if cache.plan is None or cache.plan_key != key:
            cache.plan, cache.plan_key = _Plan(sub, ms, cache), key
        sub_rows: list | None = [None] * len(sub) if rows is not None else None
        cache.plan.run(sub, ms, cache, sub_rows)
        if rows is not None and sub_rows is not None:
            for j, i in enumerate(rest):
                rows[i] = sub_rows[j]
    if diagnostics is not None and rows is not None:
        for item, row in zip(items, rows):
            row["name"] = _group_name(item)
            diagnostics.append(row)
