"""Exact top-K selection by magnitude, faster than ``torch.topk`` on large CPU tensors.

The K-sparse and K-support LMOs need ``S = `` the K coordinates of largest ``|m|``. On CPU,
``torch.topk`` with ``K = 5%`` of a few hundred thousand entries costs milliseconds (a partial
sort of (value, index) pairs). Here instead:

    lo   <- a value with  #{i : a_i >= lo} >= K   (guessed from a strided sample)
    C    <- {i : a_i >= lo}                       (one compare, one compaction)
    t    <- the K-th largest of a[C]              (a partition of |C| ~ 1.1·K values)
    S    <- {i in C : a_i >= t}                   (ascending indices: cache-friendly gathers)

``S`` is exactly a top-K set: every coordinate outside ``C`` is below ``lo`` <= the K-th largest
of ``a[C]``. A guess that leaves fewer than K candidates only costs a retry, never correctness.
Ties at the K-th value keep the lowest indices, which may differ from ``torch.topk``'s choice;
any choice among tied coordinates is a minimizer of the LMO.
"""

from __future__ import annotations

import math

import numpy as np
import torch

Tensor = torch.Tensor

# Below this size a plain partition of the whole array is cheaper than guessing a threshold.
SMALL = 16384
# The guessed candidate set holds about _SLACK·K entries; the strided sample has ~_SAMPLE.
# With 8k samples the count's relative s.d. at K = 5% of n is ~5%, so a miss (fewer than K
# candidates, hence a retry) is rare.
_SLACK = 1.12
_SAMPLE = 8192


def _threshold_guess(a: np.ndarray, k: int, slack: float, offset: int) -> float:
    """A value with about ``slack·k`` entries of ``a`` at or above it, from a strided sample.

    The stride is odd (no alignment with power-of-two row lengths) and the sample's start
    moves with ``offset``, so no fixed subset of coordinates decides every guess.
    """
    n = a.size
    stride = max(1, n // _SAMPLE) | 1
    sample = a[offset % stride :: stride]
    s = sample.size
    above = min(s, max(1, int(np.ceil(slack * k * s / n)) + 2))
    return float(np.partition(sample, s - above)[s - above])


def _keep_mask(values: np.ndarray, kth: float, k: int) -> np.ndarray:
    """Mask of the ``k`` entries of ``values`` that are >= ``kth`` (the k-th largest).

    Ties at ``kth`` beyond ``k`` keep the lowest positions.
    """
    keep = values >= kth
    if np.count_nonzero(keep) != k:
        keep = values > kth
        ties = np.flatnonzero(values == kth)[: k - np.count_nonzero(keep)]
        keep[ties] = True
    return keep


def _at_or_above(positions: np.ndarray, values: np.ndarray, kth: float, k: int) -> np.ndarray:
    """The ``k`` positions whose value is >= ``kth`` (the k-th largest), in ascending order."""
    return positions[_keep_mask(values, kth, k)]


def select_top_k(
    a: np.ndarray, k: int, guess: float | None = None, offset: int = 0
) -> tuple[np.ndarray, float, int]:
    """Ascending indices of the ``k`` largest entries of the 1-d array ``a``, and the k-th value.

    Exact: any ``k`` entries with no larger entry left out (ties at the k-th value keep the
    lowest indices). ``guess``: a threshold believed to be a little below the k-th value (e.g.
    predicted from the previous step); a wrong guess costs a retry, never correctness.
    ``offset`` varies the sample a large array's threshold is otherwise guessed from. NaN
    entries are ordered (as largest) only by the full partition, so check finiteness first
    (:class:`TopKTracker` does) if ``a`` may hold NaN.

    Returns ``(indices, kth_value, candidates)``, ``candidates`` being how many entries the
    final partition looked at (``a.size`` without a guess).

    Example:
        >>> idx, kth, _ = select_top_k(np.array([0.1, 3.0, 2.0, 0.5]), 2)
        >>> idx.tolist(), kth
        ([1, 2], 2.0)
    """
    n = a.size
    if not 1 <= k <= n:
        raise ValueError(f"Invalid k: {k!r} (expected an integer in [1, n={n}])")
    if k == n:
        return np.arange(n), float(a.min()), n
    if n > SMALL and 4 * k <= n:
        for slack in (None, _SLACK, 2.0):
            lo = guess if slack is None else _threshold_guess(a, k, slack, offset)
            if lo is None:
                continue
            if not lo > 0:  # 0 or NaN would keep (almost) everything: partition it all
                break
            cand = np.flatnonzero(a >= lo)
            c = cand.size
            if c >= k:
                vals = a.take(cand)
                kth = float(np.partition(vals, c - k)[c - k])
                return _at_or_above(cand, vals, kth, k), kth, c
    kth = float(np.partition(a, n - k)[n - k])
    idx = _at_or_above(np.arange(n), a, kth, k)
    if idx.size != k:  # NaN at the k-th place: order NaN as largest, as torch.topk does
        idx = np.sort(np.argpartition(a, n - k)[n - k :])
    return idx, kth, n


def _nan_last(a: np.ndarray, k: int) -> np.ndarray:
    """Top-k indices with NaN ordered as the largest value (as ``torch.topk``), ascending."""
    n = a.size
    return np.arange(n) if k >= n else np.sort(np.argpartition(a, n - k)[n - k :])


class TopKTracker:
    """Exact top-K of ``|m|`` for one tensor, step after step, guessing the threshold well.

    The K-th largest ``|m|`` moves with ``||m||`` (within ~1% per step in training), so
    ``lo = kth_prev · ||m||/||m_prev|| · (1 - margin)`` leaves barely more than K candidates
    ``{i : m_i >= lo or m_i <= -lo}`` (two compares on ``m`` itself, no ``|m|`` array); the
    margin adapts to how far the last prediction was off. A miss (fewer than K candidates)
    falls back to :func:`select_top_k`, so the result is always exact.

    Example:
        >>> tracker = TopKTracker()
        >>> idx, m_s = tracker.select(np.arange(-10.0, 10.0), 3)
        >>> idx.tolist(), m_s.tolist()
        ([0, 1, 19], [-10.0, -9.0, 9.0])
    """

    def __init__(self) -> None:
        self.kth: float | None = None
        self.scale = 0.0
        self.margin = 0.05
        self._masks: tuple[np.ndarray, np.ndarray] | None = None

    def select(
        self, m: np.ndarray, k: int, scale: float = 0.0, scratch: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(S, m[S])``: ascending indices of the ``k`` largest ``|m_i|`` and their values.

        ``scale`` is ``||m||²`` (for the prediction); ``scratch`` an optional work array
        like ``m``.
        """
        n = m.size
        if not math.isfinite(scale):  # NaN/inf in m: the full partition orders them
            self.kth = None
            idx = _nan_last(np.abs(m, out=scratch), k)
            return idx, m.take(idx)
        pred = None
        if self.kth is not None and self.kth > 0 and n > SMALL and 4 * k <= n:
            pred = self.kth * (math.sqrt(scale / self.scale) if scale > 0 and self.scale > 0 else 1)
            lo = pred * (1.0 - self.margin)
            if self._masks is None or self._masks[0].size != n:
                self._masks = (np.empty(n, dtype=bool), np.empty(n, dtype=bool))
            above, below = self._masks
            np.greater_equal(m, lo, out=above)
            np.less_equal(m, -lo, out=below)
            cand = np.flatnonzero(np.logical_or(above, below, out=above))
            c = cand.size
            if c >= k:
                signed = m.take(cand)
                vals = np.abs(signed)
                kth = float(np.partition(vals, c - k)[c - k])
                keep = _keep_mask(vals, kth, k)
                self._remember(kth, pred, scale)
                return cand[keep], signed[keep]
        idx, kth, _ = select_top_k(np.abs(m, out=scratch), k)
        self._remember(kth, pred, scale)
        return idx, m.take(idx)

    def _remember(self, kth: float, pred: float | None, scale: float) -> None:
        if pred is not None and pred > 0:
            self.margin = min(0.25, max(0.003, 0.002 + 2.5 * abs(kth / pred - 1.0)))
        self.kth, self.scale = kth, scale


def topk_abs_indices(x: Tensor, k: int) -> Tensor:
    """Indices (into ``x.reshape(-1)``) of the ``k`` entries of largest ``|x|``, unordered.

    CPU float32/float64 tensors go through :func:`select_top_k`; others use ``torch.topk``.

    Example:
        >>> topk_abs_indices(torch.tensor([0.1, -3.0, 2.0, 0.0]), 2).sort().values
        tensor([1, 2])
    """
    flat = x.detach().reshape(-1)
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(select_top_k(np.abs(flat.numpy()), k)[0])
    return torch.topk(flat.abs(), k, sorted=False).indices
