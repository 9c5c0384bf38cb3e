"""Compiled SFW step for one K-sparse CPU tensor: a few fused passes, no top-K index list.

Used by :mod:`.fast` when ``numba`` imports (``pip install sfwprune[fast]``); otherwise the NumPy
kernels there run. Same math as :mod:`.reference` (``m ← ρm + (1-ρ)g``, ``v = lmo(m)``,
``θ ← θ + η(v - θ)``), for the K-sparse polytope (and the L1 ball, K = 1). With ``t`` the K-th
largest ``|m_i|``, the vertex is ``v_i = -r·sign(m_i)`` where ``|m_i| >= t`` and 0 elsewhere, so
the selection is a *threshold*, not an index list, and every pass below vectorizes:

1. :func:`momentum_`: ``m ← m + w(g - m)`` in place, with ``||m||²`` (the optimizer first
   checks every gradient with :func:`all_finite`, while it is still in cache);
2. :func:`finish`: ``t`` is predicted as ``t_prev·||m'||/||m_prev||`` (within ~0.5% in
   training), one pass counts ``#{|m_i| >= hi}`` and flags the band ``lo <= |m_i| < hi``, and
   ``t`` is the right order statistic of the band's few values. A band that misses ``t``
   widens once; the last resort partitions all of ``|m|``, so ``t`` is always exact. Then
   ``||θ - v||²`` and the FW gap in one read of ``m`` and ``θ``, and ``θ ← θ + η(v - θ)`` in one
   read-modify-write.

Tensors of at most :data:`SMALL` entries take :func:`small_finish`: one compiled call that
partitions all of ``|m|``. Ties at ``t`` (more than K entries with ``|m_i| >= t``) keep the
lowest indices (entries equal to ``t`` count only up to index ``cut``); any choice among tied
entries is an LMO minimizer.
Entries with ``m_i = 0`` have ``v_i = 0`` whether selected or not, so ``t = 0`` needs no special
case. Reductions sum blocks in the arrays' dtype and blocks in float64 (``fastmath`` allows only
reassociation and contraction: NaN and inf propagate), so results equal the reference's up to
rounding.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# Tensors this small skip the band: partitioning all of |m| is cheap (the NumPy path's limit).
from .topk import SMALL

try:  # optional: ``pip install sfwprune[fast]``
    from numba import njit

    AVAILABLE = True
except Exception:  # pragma: no cover - exercised where numba is missing or broken
    AVAILABLE = False

    def njit(*_args: Any, **_kwargs: Any):  # type: ignore[no-redef]
        return lambda fn: fn


_FM = {"reassoc", "contract"}


def _compiled(**options: Any):
    """``numba.njit`` with an on-disk cache, or without one where no cache folder is writable
    (numba refuses ``cache=True`` then, when the function is defined)."""

    def wrap(fn):
        try:
            return njit(cache=True, nogil=True, **options)(fn)
        except RuntimeError:  # pragma: no cover - read-only install and home
            return njit(cache=False, nogil=True, **options)(fn)

    return wrap


MODE_LERP, MODE_FIRST, MODE_READY = 0, 1, 2
# Reductions sum BLOCK entries in the arrays' dtype (vectorized), then add blocks in float64.
# Blocks are slices: a loop over a slice from index 0 vectorizes where one over
# range(start, stop) of the whole array does not.
BLOCK = 512


@_compiled(fastmath=_FM)
def all_finite(x: np.ndarray) -> bool:  # pragma: no cover - compiled
    """True when no entry is NaN or ±inf (``x - x`` is NaN exactly there)."""
    s = x.dtype.type(0.0)
    for i in range(x.size):
        s += x[i] - x[i]
    return s == 0.0


@_compiled(fastmath=_FM)
def _momentum_pass(m, g, w, mode):  # pragma: no cover - compiled
    """In place: ``m ← m + w(g - m)`` (mode 0), ``m ← g`` (1) or ``m`` as it is (2); returns
    ``||m||²``. Only ``m`` and ``g`` appear in the loop, so it vectorizes (a loop writing a
    third array that may alias ``m`` does not)."""
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
        elif mode == 1:
            for i in range(size):
                x = gb[i]
                mb[i] = x
                acc += x * x
        else:
            for i in range(size):
                x = mb[i]
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
def _band_values(m, flags, words, out):  # pragma: no cover - compiled
    """Copies ``|m_i|`` of the flagged entries into ``out``; returns how many.

    ``words`` is ``flags`` viewed as uint64 (length padded to 8): zero words skip 8 entries.
    """
    n = m.size
    b = 0
    for wi in range(words.size):
        if words[wi] != 0:
            base = wi * 8
            for i in range(base, min(base + 8, n)):
                if flags[i]:
                    out[b] = abs(m[i])
                    b += 1
    return b


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
    """Pass 3: ``(||θ - v||², <m, θ - v>)`` for the vertex selected by ``(t, cut)``.

    Entries equal to ``t`` count as selected up to index ``cut`` (``cut >= n``: all of them,
    the vectorized loop).
    """
    n = m.size
    z = m.dtype.type(0.0)
    d2 = 0.0
    gap = 0.0
    for s0 in range(0, n, BLOCK):
        size = min(BLOCK, n - s0)
        mb = m[s0 : s0 + size]
        tb = theta[s0 : s0 + size]
        acc_d = z
        acc_g = z
        if cut >= n:
            for i in range(size):
                x = mb[i]
                d = _vertex(x, abs(x), t, r, z) - tb[i]
                acc_d += d * d
                acc_g -= x * d
        else:
            for i in range(size):
                x = mb[i]
                a = abs(x)
                d = (_vertex(x, a, t, r, z) if (a > t) | (s0 + i <= cut) else z) - tb[i]
                acc_d += d * d
                acc_g -= x * d
        d2 += np.float64(acc_d)
        gap += np.float64(acc_g)
    return d2, gap


@_compiled(fastmath=_FM)
def _update_pass(theta, m, t, cut, r, eta):  # pragma: no cover - compiled
    """Pass 4: ``θ ← θ + η(v - θ)`` (selection as in :func:`_distance_pass`)."""
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


@_compiled(fastmath=_FM)
def _small_finish(theta, m, k, r, use_grad, lr, fixed, scratch):  # pragma: no cover
    """:func:`finish` for a small tensor in one call; returns ``(η, fw_gap, ok)``.

    ``ok`` is False, with ``theta`` untouched, when ``||m||²`` is not finite.
    """
    n = m.size
    mm = 0.0
    for i in range(n):
        x = m[i]
        mm += np.float64(x) * np.float64(x)
        scratch[i] = abs(x)
    if not np.isfinite(mm):
        return 0.0, 0.0, False
    a = scratch[:n]
    t = a.min() if k >= n else np.partition(a, n - k)[n - k]
    count = 0
    ties = 0
    for i in range(n):
        count += a[i] >= t
        ties += a[i] == t
    cut = n
    if count > k:
        cut = _tie_cut(m, t, k - (count - ties))
    eta, gap = _apply(theta, m, t, cut, r, mm, use_grad, lr, fixed)
    return eta, gap, True


@_compiled()
def _apply(theta, m, t, cut, r, mm, use_grad, lr, fixed):  # pragma: no cover - compiled
    """Passes 3 and 4 with ``η`` between them; returns ``(η, fw_gap)``.

    ``η = clamp(lr·sqrt(mm)/||θ - v||, 0, 1)`` (0 where ``θ = v``) when ``use_grad``, else
    ``fixed``.
    """
    d2, gap = _distance_pass(theta, m, t, cut, r)
    if use_grad:
        eta = lr * math.sqrt(mm / d2) if d2 > 0 else 0.0
        if eta == eta:
            eta = min(max(eta, 0.0), 1.0)
    else:
        eta = fixed
    _update_pass(theta, m, t, cut, r, m.dtype.type(eta))
    return eta, gap


@_compiled()
def _band_select(m, lo, hi, k, flags, words, band):  # pragma: no cover - compiled
    """``(status, t, #{|m_i| >= t})`` from the band ``[lo, hi)``: status 0 when the K-th
    largest ``|m_i|`` is in it, +1 when it is above, -1 below."""
    c_hi = _band_flags(m, lo, hi, flags)
    need = k - c_hi
    if need < 1:
        return 1, m.dtype.type(0.0), 0
    b = _band_values(m, flags, words, band)
    if need > b:
        return -1, m.dtype.type(0.0), 0
    vals = band[:b]
    t = np.partition(vals, b - need)[b - need]
    count = c_hi
    for i in range(b):
        count += vals[i] >= t
    return 0, t, count


def momentum_(m: np.ndarray, g: np.ndarray | None, mode: int, rho: float) -> float:
    """``m ← ρm + (1-ρ)g`` (``MODE_LERP``), ``m ← g`` (``MODE_FIRST``) or as it is
    (``MODE_READY``), in place; returns ``||m||²``. Check ``g`` with :func:`all_finite` first
    to refuse a non-finite gradient with nothing changed."""
    return float(_momentum_pass(m, m if g is None else g, m.dtype.type(1.0 - rho), mode))


class SignKernelState:
    """Per-tensor state of the compiled step: the threshold prediction and work arrays."""

    def __init__(self, n: int, dtype: np.dtype) -> None:
        self.t_prev = 0.0
        self.mm_prev = 0.0
        self.delta = 0.01
        padded = -(-n // 8) * 8
        self.flags = np.zeros(padded, dtype=np.uint8)
        self.words = self.flags.view(np.uint64)
        self.band = np.empty(n, dtype=dtype)
        self.retries = 0  # band misses (diagnostic; tested)
        self.full = 0  # full partitions of |m|

    def predict(self, n: int, k: int, mm: float) -> float:
        """``t`` predicted from the last step, scaled by ``||m||``; 0 when there is none."""
        if self.t_prev > 0 and self.mm_prev > 0 and mm > 0 and n > SMALL and 4 * k <= n:
            return self.t_prev * math.sqrt(mm / self.mm_prev)
        return 0.0

    def remember(self, t: float, pred: float, mm: float) -> None:
        """Keeps ``t``; the band's half-width follows the prediction's error: up at once to
        2.5 times a new error, down by a fifth a step."""
        if pred > 0 and t > 0:
            err = 0.001 + 2.5 * abs(t / pred - 1.0)
            self.delta = min(0.25, max(0.002, err, 0.8 * self.delta))
        self.t_prev, self.mm_prev = t, mm


def _from_band(
    m: np.ndarray, st: SignKernelState, k: int, lo: float, hi: float
) -> tuple[float, int] | int:
    """``(t, #{|m_i| >= t})`` from the band ``[lo, hi)``; when ``t`` is not in it, +1 (``t``
    is above) or -1 (below)."""
    dt = m.dtype.type
    status, t, count = _band_select(m, dt(lo), dt(hi), k, st.flags, st.words, st.band)
    return (float(t), int(count)) if status == 0 else int(status)


def _threshold(
    m: np.ndarray, st: SignKernelState, k: int, pred: float, scratch: np.ndarray
) -> tuple[float, int]:
    """The exact K-th largest ``|m_i|`` and how many entries reach it."""
    n = m.size
    if k >= n:
        return float(np.abs(m, out=scratch).min()), n
    if pred > 0:
        lo, hi = pred * (1.0 - st.delta), pred * (1.0 + st.delta)
        found = _from_band(m, st, k, lo, hi)
        if isinstance(found, int):
            st.retries += 1  # one wider band on the side that missed, then the last resort
            found = _from_band(m, st, k, *((hi, 1.5 * hi) if found > 0 else (0.5 * lo, lo)))
        if not isinstance(found, int):
            return found
    st.full += 1
    a = np.abs(m, out=scratch)
    t = np.partition(a, n - k)[n - k]
    return float(t), int(np.count_nonzero(a >= t))


def finish(
    theta: np.ndarray,
    m: np.ndarray,
    mm: float,
    k: int,
    radius: float,
    use_grad: bool,
    lr: float,
    fixed: float,
    st: SignKernelState,
    scratch: np.ndarray,
) -> tuple[float, float] | None:
    """Phase 2: the SFW step of ``theta`` from the new momentum ``m``; returns ``(η, fw_gap)``.

    ``mm = ||m||²`` (from :func:`momentum_`). ``η = clamp(lr·||m||/||θ - v||, 0, 1)`` when
    ``use_grad``, else ``fixed``. Returns None, with ``theta`` untouched, when ``mm`` is not
    finite: the caller then takes a path that orders NaN as :func:`torch.topk` does.
    """
    if not math.isfinite(mm):
        st.t_prev = 0.0
        return None
    n = m.size
    pred = st.predict(n, k, mm)
    t, count = _threshold(m, st, k, pred, scratch)
    dt = m.dtype.type
    cut = n
    if count > k:  # ties at t: keep the lowest indices among them
        above = count - int(np.count_nonzero(np.abs(m, out=scratch) == t))
        cut = int(_tie_cut(m, dt(t), k - above))
    eta, gap = _apply(theta, m, dt(t), cut, dt(radius), mm, use_grad, float(lr), float(fixed))
    st.remember(t, pred, mm)
    return eta, gap


def small_finish(
    theta: np.ndarray, m: np.ndarray, k: int, radius: float, use_grad: bool, lr: float,
    fixed: float, scratch: np.ndarray,
) -> tuple[float, float] | None:  # fmt: skip
    """:func:`finish` for tensors of at most :data:`SMALL` entries, in one compiled call.

    ``η = clamp(lr·||m||/||θ - v||, 0, 1)`` when ``use_grad``, else ``fixed``.
    """
    eta, gap, ok = _small_finish(
        theta, m, k, m.dtype.type(radius), use_grad, float(lr), float(fixed), scratch
    )
    return (eta, gap) if ok else None
