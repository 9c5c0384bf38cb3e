"""The compiled SFW step for K-sparse CPU tensors (numba): four fused passes, no index list.

Same math as :mod:`._reference` for the K-sparse polytope. With ``t`` the K-th largest ``|m_i|``
the vertex is ``v_i = -r·sign(m_i)`` where ``|m_i| >= t`` and 0 elsewhere, so the selection is
a *threshold*, not an index list, and every pass vectorizes:

1. momentum: ``m ← m + (1-ρ)(g - m)`` in place, with ``||m||²``;
2. threshold: ``t`` is predicted as ``t_prev·||m||/||m_prev||`` (within ~0.5% in training); one
   pass counts ``#{|m_i| >= hi}`` and flags the band ``lo <= |m_i| < hi``, and ``t`` is the
   right order statistic of the band's few values. A band that misses ``t`` widens once; the
   last resort partitions all of ``|m|``, so ``t`` is always exact. Tensors of at most
   :data:`SMALL` entries always partition;
3. ``||θ - v||²`` in one read of ``m`` and ``θ``, then ``η`` (:func:`_eta`, the only place);
4. ``θ ← θ + η(v - θ)`` in one read-modify-write.

Ties at ``t`` (more than K entries with ``|m_i| >= t``) keep the lowest indices (entries equal
to ``t`` count only up to index ``cut``); any choice among tied entries is an LMO minimizer.
Reductions sum blocks in the arrays' dtype and blocks in float64 (``fastmath`` allows only
reassociation and contraction: NaN and inf propagate). A non-finite ``||m||`` (NaN/inf
gradients with ``check_finite=False``) leaves ``θ`` to :func:`._reference.reference_update_`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ._reference import reference_update_

try:  # a dependency (pyproject); a broken install falls back to the batched torch path
    from numba import carray, njit, types
    from numba.core import cgutils
    from numba.extending import intrinsic

    @intrinsic
    def _address(typingctx, addr):  # pragma: no cover - compiled
        """An int64 address as a ``void*`` (for ``carray``)."""

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], cgutils.voidptr_t)

        return types.voidptr(types.int64), codegen

    AVAILABLE = True
except Exception:  # pragma: no cover - exercised where numba is missing or broken
    AVAILABLE = False

    def njit(*_args: Any, **_kwargs: Any):  # type: ignore[no-redef]
        return lambda fn: fn


Tensor = torch.Tensor
_FM = {"reassoc", "contract"}
# Tensors this small skip the band: partitioning all of |m| is cheap.
SMALL = 16384
# Reductions sum BLOCK entries in the arrays' dtype (vectorized), then add blocks in float64.
BLOCK = 512
MODE_LERP, MODE_FIRST = 0, 1  # _momentum_pass: m ← m + w(g - m), or m ← g (first step)
RESCALE_CODES = {"gradient": 0, "diameter": 1, None: 2}
_increment_version = getattr(torch.autograd.graph, "increment_version", None)


def _compiled(**options: Any):
    """``numba.njit`` with an on-disk cache, or without one where no cache folder is writable."""

    def wrap(fn):
        try:
            return njit(cache=True, nogil=True, **options)(fn)
        except RuntimeError:  # pragma: no cover - read-only install and home
            return njit(cache=False, nogil=True, **options)(fn)

    return wrap


@_compiled(fastmath=_FM)
def all_finite(x: np.ndarray) -> bool:  # pragma: no cover - compiled
    """True when no entry is NaN or ±inf (``x - x`` is NaN exactly there)."""
    s = x.dtype.type(0.0)
    for i in range(x.size):
        s += x[i] - x[i]
    return s == 0.0


@_compiled(fastmath=_FM)
def _momentum_pass(m, g, w, mode):  # pragma: no cover - compiled
    """In place: ``m ← m + w(g - m)`` (mode 0) or ``m ← g`` (mode 1); returns ``||m||²``."""
    n = m.size
    z = m.dtype.type(0.0)
    mm = 0.0
    for s0 in range(0, n, BLOCK):
        size = min(BLOCK, n - s0)
        mb = m[s0 : s0 + size]
        gb = g[s0 : s0 + size]
        acc = z
        if mode == 0:
            for i in range(size):
                x = mb[i] + w * (gb[i] - mb[i])
                mb[i] = x
                acc += x * x
        else:
            for i in range(size):
                x = gb[i]
                mb[i] = x
                acc += x * x
        mm += np.float64(acc)
    return mm


@_compiled(fastmath=_FM)
def _band_flags(m, lo, hi, flags):  # pragma: no cover - compiled
    """``flags[i] = lo <= |m_i| < hi``; returns ``#{|m_i| >= hi}``."""
    n = m.size
    z = m.dtype.type(0.0)
    one = m.dtype.type(1.0)
    c_hi = 0
    for s0 in range(0, n, BLOCK):
        size = min(BLOCK, n - s0)
        mb = m[s0 : s0 + size]
        fb = flags[s0 : s0 + size]
        cnt = z
        for i in range(size):
            a = abs(mb[i])
            cnt += one if a >= hi else z
            fb[i] = (a >= lo) & (a < hi)
        c_hi += int(cnt)
    return c_hi


@_compiled()
def _band_select(m, lo, hi, k, flags, words, band):  # pragma: no cover - compiled
    """``(status, t, #{|m_i| >= t})`` from the band ``[lo, hi)``: status 0 when the K-th
    largest ``|m_i|`` is in it, +1 when it is above, -1 below. ``words`` is ``flags`` viewed
    as uint64: zero words skip 8 entries."""
    c_hi = _band_flags(m, lo, hi, flags)
    need = k - c_hi
    if need < 1:
        return 1, m.dtype.type(0.0), 0
    n, b = m.size, 0
    for wi in range(words.size):
        if words[wi] != 0:
            for i in range(wi * 8, min(wi * 8 + 8, n)):
                if flags[i]:
                    band[b] = abs(m[i])
                    b += 1
    if need > b:
        return -1, m.dtype.type(0.0), 0
    vals = band[:b]
    t = np.partition(vals, b - need)[b - need]
    count = c_hi
    for i in range(b):
        count += vals[i] >= t
    return 0, t, count


@_compiled()
def _full_select(m, k, scratch):  # pragma: no cover - compiled
    """``(t, #{|m_i| >= t})`` by partitioning all of ``|m|``."""
    n = m.size
    for i in range(n):
        scratch[i] = abs(m[i])
    a = scratch[:n]
    t = a.min() if k >= n else np.partition(a, n - k)[n - k]
    count = 0
    for i in range(n):
        count += abs(m[i]) >= t
    return t, count


@_compiled()
def _tie_cut(m, t, take):  # pragma: no cover - compiled
    """Index of the ``take``-th entry (in index order) with ``|m_i| == t``."""
    seen = 0
    for i in range(m.size):
        if abs(m[i]) == t:
            seen += 1
            if seen == take:
                return i
    return m.size


@_compiled(inline="always")
def _vertex(x, a, t, r, z):  # pragma: no cover - compiled
    """``-r·sign(x)`` where ``|x| = a >= t``, else 0 (also 0 for x = 0)."""
    return -math.copysign(r, x) if (a >= t) & (x != z) else z


@_compiled(fastmath=_FM)
def _distance_pass(theta, m, t, cut, r):  # pragma: no cover - compiled
    """``||θ - v||²`` for the vertex selected by ``(t, cut)``: entries equal to ``t`` count as
    selected up to index ``cut`` (``cut >= n``: all of them, the vectorized loop)."""
    n = m.size
    z = m.dtype.type(0.0)
    d2 = 0.0
    for s0 in range(0, n, BLOCK):
        size = min(BLOCK, n - s0)
        mb = m[s0 : s0 + size]
        tb = theta[s0 : s0 + size]
        acc = z
        if cut >= n:
            for i in range(size):
                x = mb[i]
                d = _vertex(x, abs(x), t, r, z) - tb[i]
                acc += d * d
        else:
            for i in range(size):
                x = mb[i]
                a = abs(x)
                d = (_vertex(x, a, t, r, z) if (a > t) | (s0 + i <= cut) else z) - tb[i]
                acc += d * d
        d2 += np.float64(acc)
    return d2


@_compiled(fastmath=_FM)
def _update_pass(theta, m, t, cut, r, eta):  # pragma: no cover - compiled
    """``θ ← θ + η(v - θ)`` (selection as in :func:`_distance_pass`)."""
    n = m.size
    z = m.dtype.type(0.0)
    if cut >= n:
        for i in range(n):
            x = m[i]
            theta[i] = theta[i] + eta * (_vertex(x, abs(x), t, r, z) - theta[i])
    else:
        for i in range(n):
            x = m[i]
            a = abs(x)
            v = _vertex(x, a, t, r, z) if (a > t) | (i <= cut) else z
            theta[i] = theta[i] + eta * (v - theta[i])


@_compiled()
def _eta(code, lr, mm, d2, l2_diameter):  # pragma: no cover - compiled
    """``η``: ``clamp(lr·||m||/||θ - v||, 0, 1)`` (0 where ``θ = v``) for code 0 (gradient),
    ``clamp(lr/D, 0, 1)`` for 1 (diameter), ``clamp(lr, 0, 1)`` for 2 (none); NaN stays."""
    if code == 0:
        eta = lr * math.sqrt(mm / d2) if d2 > 0 else 0.0
    elif code == 1:
        eta = lr / l2_diameter
    else:
        eta = lr
    return min(max(eta, 0.0), 1.0) if eta == eta else eta


@_compiled()
def _apply(theta, m, t, cut, r, mm, code, lr, l2_diameter):  # pragma: no cover - compiled
    """Passes 3 and 4 with ``η`` between them; returns ``η``."""
    d2 = _distance_pass(theta, m, t, cut, r) if code == 0 else 0.0
    eta = _eta(code, lr, mm, d2, l2_diameter)
    _update_pass(theta, m, t, cut, r, m.dtype.type(eta))
    return eta


@_compiled()
def _ties_apply(theta, m, t, count, k, radius, mm, code, lr, l2_diameter):  # pragma: no cover
    """Passes 3-4 for the threshold ``t`` reached by ``count`` entries: ties at ``t`` keep the
    lowest indices (the cut), then :func:`_apply`."""
    n = m.size
    cut = n
    if count > k:
        above = 0
        for i in range(n):
            above += abs(m[i]) > t
        cut = _tie_cut(m, t, k - above)
    return _apply(theta, m, t, cut, m.dtype.type(radius), mm, code, lr, l2_diameter)


@_compiled()
def _band_step(theta, m, k, mm, pred, counts, flags, words, band, scratch, radius, code, lr,
               l2_diameter):  # fmt: skip  # pragma: no cover - compiled
    """Passes 2-4 of one large tensor. ``pred = [t_prev, ||m_prev||², δ]`` (updated): ``t`` is
    predicted as ``t_prev·||m||/||m_prev||`` and looked for in the band ``[t(1-δ), t(1+δ))``,
    which widens once on the side that missed; the last resort partitions all of ``|m|``.
    ``δ`` then follows the prediction's error. ``counts = [band misses, full partitions]``."""
    dt = m.dtype.type
    t_prev, mm_prev, delta = pred[0], pred[1], pred[2]
    guess, status, t, count = 0.0, 1, dt(0.0), 0
    if t_prev > 0 and mm_prev > 0 and mm > 0:
        guess = t_prev * math.sqrt(mm / mm_prev)
        lo, hi = guess * (1.0 - delta), guess * (1.0 + delta)
        for attempt in range(2):
            status, t, count = _band_select(m, dt(lo), dt(hi), k, flags, words, band)
            if status == 0:
                break
            if attempt == 0:
                counts[0] += 1
            if status > 0:
                lo, hi = hi, 1.5 * hi
            else:
                lo, hi = 0.5 * lo, lo
    if guess == 0.0 or status != 0:
        counts[1] += 1
        t, count = _full_select(m, k, scratch)
    tf = np.float64(t)
    if guess > 0 and tf > 0:  # the band follows the prediction's error
        err = 0.001 + 2.5 * abs(tf / guess - 1.0)
        pred[2] = min(0.25, max(max(0.002, err), 0.8 * delta))
    pred[0], pred[1] = tf, mm
    _ties_apply(theta, m, t, count, k, radius, mm, code, lr, l2_diameter)


@_compiled()
def _step_rows(proto, rows, vals, mm, scratch):  # pragma: no cover - compiled
    """The whole step of every tensor of ``proto``'s dtype in one call. ``rows[j] = (θ, m, g,
    n, mode, check, k, rescale code, band, pred, counts, flags)`` (addresses and integers;
    ``band`` 0: partition all of ``|m|``, 1: :func:`_band_step` with the tensor's ``pred``
    (3 float64), ``counts`` (2 int64) and ``flags`` (``n`` rounded up to 8 bytes, followed by
    the band's ``n`` values)), ``vals[j] = (1-ρ, lr, radius, diameter)``.

    Pass 1 first reads every checked ``g`` for NaN/inf; the first row that holds one is
    returned (>= 0) with nothing changed. Then every momentum is updated in place
    (``mm[j] ← ||m||²``), and every tensor with a finite ``||m||`` takes passes 2-4; returns
    ``-1 - #rows skipped`` (their ``θ`` is left to the caller)."""
    dt = proto.dtype
    nrows = rows.shape[0]
    for j in range(nrows):
        if rows[j, 5] and not all_finite(carray(_address(rows[j, 2]), rows[j, 3], dt)):
            return j
    for j in range(nrows):
        n = rows[j, 3]
        m = carray(_address(rows[j, 1]), n, dt)
        g = carray(_address(rows[j, 2]), n, dt)
        mm[j] = _momentum_pass(m, g, m.dtype.type(vals[j, 0]), rows[j, 4])
    skipped = 0
    for j in range(nrows):
        if not math.isfinite(mm[j]):
            skipped += 1
            continue
        n, k, code = rows[j, 3], rows[j, 6], rows[j, 7]
        theta = carray(_address(rows[j, 0]), n, dt)
        m = carray(_address(rows[j, 1]), n, dt)
        if rows[j, 8]:
            nf = -(-n // 8) * 8
            pred = carray(_address(rows[j, 9]), 3, np.float64)
            counts = carray(_address(rows[j, 10]), 2, np.int64)
            flags = carray(_address(rows[j, 11]), nf, np.uint8)
            words = carray(_address(rows[j, 11]), nf // 8, np.uint64)
            band = carray(_address(rows[j, 11] + nf), n, dt)
            _band_step(theta, m, k, mm[j], pred, counts, flags, words, band, scratch,
                       vals[j, 2], code, vals[j, 1], vals[j, 3])  # fmt: skip
        else:
            t, count = _full_select(m, k, scratch)
            _ties_apply(theta, m, t, count, k, vals[j, 2], mm[j], code, vals[j, 1], vals[j, 3])
    return -1 - skipped


class TensorKernel:
    """One tensor's compiled step: a flat NumPy view, the threshold prediction, work arrays."""

    def __init__(self, p: Tensor) -> None:
        n = p.numel()
        self.p, self.ptr, self.n = p, p.data_ptr(), n
        self.theta = p.detach().view(-1).numpy()
        self.band_step = n > SMALL
        self.pred = np.array([0.0, 0.0, 0.01])  # t_prev, ||m_prev||², band half-width δ
        self.counts = np.zeros(2, dtype=np.int64)  # band misses, full partitions (tested)
        nf = -(-n // 8) * 8 if self.band_step else 0
        # the band's flags (nf bytes), then its values: one address for the compiled step
        self.work = np.zeros(nf + (n if self.band_step else 0) * self.theta.itemsize, np.uint8)

    @property
    def retries(self) -> int:
        return int(self.counts[0])

    @property
    def full(self) -> int:
        return int(self.counts[1])


class StepPlan:
    """The compiled step's rows for one list of tensors, kept between steps while its
    ``key`` holds (the tensors, their memory, momentum buffers and sets; see
    :func:`kernel_step_`). ``lr``, ``ρ``, the gradients' addresses and the modes are
    written into the rows every step."""

    def __init__(self, key: list, tks: list[TensorKernel], bufs: list[Tensor],
                 groups: list[dict[str, Any]], held: list[Tensor | None]) -> None:  # fmt: skip
        self.key, self.tks, self.bufs, self.groups = key, tks, bufs, groups
        # the state's buffers the key names (held: their ids stay theirs), and the rows whose
        # buffer is a new one that goes into the state after a step that is not refused
        self.held = held
        self.store = [j for j, (b, h) in enumerate(zip(bufs, held)) if b is not h]
        self.params = [tk.p for tk in tks]
        self.by_dtype: list[tuple[np.ndarray, list[int], np.ndarray, np.ndarray, np.ndarray]] = []
        self.writes: list[tuple[memoryview, memoryview, list[tuple[int, int, int]]]] = []
        dtypes: dict[np.dtype, list[int]] = {}
        for j, tk in enumerate(tks):
            dtypes.setdefault(tk.theta.dtype, []).append(j)
        for dtype, js in dtypes.items():
            rows = np.zeros((len(js), 12), dtype=np.int64)
            vals = np.zeros((len(js), 4))
            for r, j in enumerate(js):
                tk, group = tks[j], groups[j]
                k, radius = int(group["k"]), float(group["radius"])
                band = tk.band_step and 4 * k <= tk.n
                mode = MODE_FIRST if held[j] is None else MODE_LERP  # the key holds id(None)
                rows[r] = (tk.ptr, bufs[j].data_ptr(), 0, tk.n, mode,
                           bool(group.get("check_finite", True)), k,
                           RESCALE_CODES[group["rescale"]], band, tk.pred.ctypes.data,
                           tk.counts.ctypes.data, tk.work.ctypes.data)  # fmt: skip
                vals[r, 2:] = (radius, 2.0 * radius * math.sqrt(k))  # the polytope's diameter
            proto = np.empty(0, dtype)
            self.by_dtype.append((proto, js, rows, vals, np.empty(len(js))))
            # flat views of rows and vals: one element written per item, no NumPy indexing
            slots = [(j, 12 * r + 2, 4 * r) for r, j in enumerate(js)]
            rflat, vflat = (
                memoryview(rows).cast("B").cast("q"),
                memoryview(vals).cast("B").cast("d"),
            )
            self.writes.append((rflat, vflat, slots))
        self.most = max(tk.n for tk in tks)


def _work(scratch: dict[np.dtype, np.ndarray], dtype: np.dtype, n: int) -> np.ndarray:
    work = scratch.get(dtype)
    if work is None or work.size < n:
        work = scratch[dtype] = np.empty(n, dtype=dtype)
    return work


# kernel_step_(..., strict=True) found the tensors or their layout changed: nothing was done
STALE = object()


def kernel_step_(
    items: list[tuple[dict[str, Any], Tensor]],
    state: dict[Tensor, dict[str, Any]],
    cache: dict[Any, Any],
    scratch: dict[np.dtype, np.ndarray],
    strict: bool = False,
) -> Any:
    """One SFW step of each ``(group, p)``: ``p`` a contiguous float32/float64 CPU tensor of a
    K-sparse group. ``cache`` keeps each tensor's :class:`TensorKernel` (by ``id(p)``) and the
    last :class:`StepPlan` (under ``"plan"``), ``scratch`` one work array per dtype; none of
    them changes results.

    The plan is rebuilt unless every tensor is the same object with the same memory
    (``data_ptr``, ``numel``, dtype, contiguity), the same momentum buffer, and its group the
    same object with the same ``k``, ``radius``, ``rescale`` and ``check_finite``; ``lr`` and
    ``momentum`` are read every step. The step is one compiled call per dtype
    (:func:`_step_rows`): it reads every gradient of a ``check_finite`` group for NaN/inf
    first, and if one holds any, returns with nothing changed; ``kernel_step_`` then returns
    that tensor's group (the caller refuses the step). Else ``None`` is returned at the end.
    With several dtypes every gradient is checked before the first call.

    ``strict=True`` (the caller did not check the items: :meth:`SFW.step`'s cached routing)
    returns :data:`STALE`, with nothing changed, where a gradient is None or the plan would be
    rebuilt. Works with or without autograd enabled (NumPy writes the memory).
    """
    key: list = []
    grads: list[Tensor] = []
    for group, p in items:
        g = p.grad
        if g is None:
            if strict:
                return STALE
            raise ValueError(
                f"Invalid items: a tensor of group {group.get('name')!r} has no gradient"
            )
        if g.dtype is not p.dtype or not g.is_contiguous():  # unusual layout: a contiguous copy
            g = g.detach().to(p.dtype).contiguous()
        grads.append(g)
        key.append((id(group), id(p), p.data_ptr(), p.numel(), p.dtype, p.is_contiguous(),
                    id(state[p].get("momentum_buffer")), group["k"], group["radius"],
                    group["rescale"], group.get("check_finite", True)))  # fmt: skip
    plan = cache.get("plan")
    if plan is None or plan.key != key:
        if strict:
            return STALE
        plan = cache["plan"] = _plan(items, state, cache, key)
    if len(plan.by_dtype) > 1:  # all gradients checked before any momentum changes
        for (group, _p), g in zip(items, grads):
            if group.get("check_finite", True) and not all_finite(g.view(-1).numpy()):
                return group
    groups = plan.groups
    for (proto, js, rows, vals, mm), (rflat, vflat, slots) in zip(plan.by_dtype, plan.writes):
        for j, ri, vi in slots:
            group = groups[j]
            rflat[ri] = grads[j].data_ptr()
            vflat[vi] = 1.0 - float(group["momentum"])
            vflat[vi + 1] = float(group["lr"])
        status = int(_step_rows(proto, rows, vals, mm, _work(scratch, proto.dtype, plan.most)))
        if status >= 0:
            return groups[js[status]]
        if status < -1:  # NaN/inf in m: the reference orders NaN as torch does
            with torch.no_grad():
                for r, j in enumerate(js):
                    if not math.isfinite(mm[r]):
                        plan.tks[j].pred[0] = 0.0
                        reference_update_(plan.params[j], plan.bufs[j], groups[j])
    for j in plan.store:  # into the state once every gradient has passed the check
        state[plan.params[j]]["momentum_buffer"] = plan.bufs[j]
    if _increment_version is not None:  # NumPy wrote p's memory: tell autograd
        try:  # one call for all (torch >= 2.5: 1.0 µs for six tensors, 0.66 µs for one)
            _increment_version(plan.params)
        except (TypeError, RuntimeError):  # torch < 2.5 takes one tensor
            for p in plan.params:
                _increment_version(p)
    return None


def _plan(items: list, state: dict, cache: dict, key: list) -> StepPlan:
    """A new :class:`StepPlan`: each tensor's :class:`TensorKernel` (kept while the tensor's
    memory is), and a contiguous momentum buffer of its dtype (a new one, not yet in the
    state, for a tensor without one)."""
    tks, bufs, held = [], [], []
    for _group, p in items:
        tk = cache.get(id(p))
        if tk is None or tk.p is not p or tk.ptr != p.data_ptr() or tk.n != p.numel():
            tk = cache[id(p)] = TensorKernel(p)
        tks.append(tk)
        buf = state[p].get("momentum_buffer")
        held.append(buf)
        if buf is None:
            buf = torch.empty_like(p, memory_format=torch.contiguous_format)
        elif not buf.is_contiguous() or buf.dtype != p.dtype:
            buf = buf.to(p.dtype).contiguous()
        bufs.append(buf)
    return StepPlan(key, tks, bufs, [group for group, _p in items], held)
