"""Masked least squares from accumulated statistics: exact per-unit solves and SparseGPT's OBS.

For one layer (or conv group) with inputs ``X`` (rows × d, a ones column last for the bias) and
targets ``Y`` (rows × out), given ``H = XᵀX``, ``B = XᵀY`` and a keep mask ``S_r`` per output unit
``r``, both solvers minimize ``||Y_r − X w||² + λ||w||²`` over ``w`` with ``w_j = 0`` for ``j ∉ S_r``:

- ``solve_exact``: ``w_S = (H_SS + λI)⁻¹ B_S,r`` per unit (batched Cholesky solves); cost
  ``Σ_r |S_r|³ / 3``.
- ``solve_obs``: SparseGPT (Frantar & Alistarh 2023) with the mask fixed: start from the dense
  optimum ``W* = (H + λI)⁻¹ B``, then visit the columns in order; a pruned entry is zeroed and its
  error ``(w_j − 0) / U_jj`` is spread over the later columns with the row ``U_j,j:`` of the upper
  Cholesky factor ``U`` of ``(H + λI)⁻¹``. Cost ``O(d³ + out·d²)``. Exact when nothing is pruned
  (or only the last columns are); otherwise earlier kept entries are not revisited, an
  approximation of the same objective.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

Tensor = torch.Tensor

SOLVERS = ("auto", "exact", "obs")
# below this many flops the exact solves always win (a second or so on one CPU thread)
EXACT_LIMIT = 5e8
# batched small Cholesky solves plus the gathers run ~3x slower per flop than the one large
# factorization of OBS (measured on ResNet-18 layers, one CPU thread: 6.0 s exact vs 4.1 s OBS
# at an estimated 1.4x fewer exact flops)
EXACT_COST_FACTOR = 3.0
# float64 elements of one batch of gathered H_SS blocks in solve_exact (64 MiB)
BATCH_ELEMENTS = 2**23
# a batch of units (sorted by |S|) is padded to its largest |S|: it takes units up to
# BATCH_GROWTH·|S_first| + BATCH_SLACK, so padding wastes at most ~2x the flops. Global magnitude
# leaves very uneven |S| (LeNet-300-100 at 90%: 1 to 341 kept inputs per unit, median 1); one
# padded batch did 23x the needed flops and took 5x longer on the first layer.
BATCH_GROWTH, BATCH_SLACK = 1.25, 8
# float64 elements of the exact solver's factors a memo keeps (256 MiB); larger sets of factors
# are recomputed per solve, one batch at a time
MEMO_ELEMENTS = 2**25


def ridge_of(H: Tensor, ridge: float) -> float:
    """``λ = ridge × mean(diag H)`` (``ridge`` itself when the diagonal is all zero)."""
    mean = float(H.diagonal().mean())
    return ridge * mean if mean > 0 else ridge


def choose(keep: Tensor, solver: str) -> str:
    """``"exact"`` or ``"obs"`` for a ``(out, d)`` keep mask: the cheaper in flops, exact if small."""
    if solver != "auto":
        return solver
    out, d = keep.shape
    k = keep.sum(1).to(torch.float64)
    exact = EXACT_COST_FACTOR * float((k**3 / 3 + k**2).sum())
    obs = 4 / 3 * float(d) ** 3 + 4 * out * float(d) ** 2
    return "exact" if exact <= max(obs, EXACT_LIMIT) else "obs"


def exact_factors(H: Tensor, keep: Tensor, lam: float) -> Iterator[tuple[Tensor, ...]]:
    """The mask-dependent part of :func:`solve_exact`, one batch of units at a time:
    ``(units, idx, valid, L)`` with ``L`` the Cholesky factors of the padded ``H_SS + λI``.

    Units are sorted by ``|S_r|`` and batched by similar ``|S|`` (at most
    ``BATCH_GROWTH·|S| + BATCH_SLACK``), each padded to its largest ``|S|`` with identity rows
    (whose solution is 0), so one batch takes at most ``BATCH_ELEMENTS``.
    """
    out = keep.shape[0]
    counts = keep.sum(1)
    order = torch.argsort(counts, stable=True)
    sizes = counts[order].tolist()
    start = 0
    while start < out:
        if sizes[start] == 0:
            start += 1
            continue
        end, cap = start + 1, BATCH_GROWTH * sizes[start] + BATCH_SLACK
        while (
            end < out
            and sizes[end] <= cap
            and (end - start + 1) * sizes[end] ** 2 <= BATCH_ELEMENTS
        ):
            end += 1
        units = order[start:end]
        km = sizes[end - 1]
        # kept indices first (in index order), then padding
        idx = torch.argsort((~keep[units]).to(torch.int8), dim=1, stable=True)[:, :km]
        valid = torch.arange(km, device=H.device) < counts[units].unsqueeze(1)
        both = valid.unsqueeze(2) & valid.unsqueeze(1)
        A = torch.where(both, H[idx.unsqueeze(2), idx.unsqueeze(1)], 0.0)
        A.diagonal(dim1=1, dim2=2).add_(torch.where(valid, lam, 1.0))
        yield units, idx, valid, torch.linalg.cholesky(A)
        start = end


def solve_exact(
    H: Tensor,
    B: Tensor,
    keep: Tensor,
    lam: float,
    factors: Iterable[tuple[Tensor, ...]] | None = None,
) -> Tensor:
    """``(out, d)`` weights: per unit ``r``, ``w_S = (H_SS + λI)⁻¹ B_S,r``, zero elsewhere
    (``factors``: :func:`exact_factors` of the same ``H``, mask and ``λ`` if already known)."""
    W = H.new_zeros(keep.shape)
    for units, idx, valid, L in exact_factors(H, keep, lam) if factors is None else factors:
        rhs = torch.where(valid, B[idx, units.unsqueeze(1)], 0.0).unsqueeze(2)
        x = torch.cholesky_solve(rhs, L).squeeze(2)
        rows = units.unsqueeze(1).expand_as(idx)
        W.index_put_((rows[valid], idx[valid]), x[valid])
    return W


def obs_factors(H: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """The part of :func:`solve_obs` that depends on ``H`` alone: the lower Cholesky factor
    ``L`` of ``H + λI`` and the upper Cholesky factor ``U`` of ``(H + λI)⁻¹``."""
    Hl = H.clone()
    Hl.diagonal().add_(lam)
    L = torch.linalg.cholesky(Hl)
    return L, torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def solve_obs(
    H: Tensor,
    B: Tensor,
    keep: Tensor,
    lam: float,
    block: int = 128,
    factors: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """``(out, d)`` weights by SparseGPT's column-by-column OBS update with the mask ``keep``
    (``factors``: :func:`obs_factors` of the same ``H`` and ``λ`` if already known)."""
    d = H.shape[0]
    L, U = obs_factors(H, lam) if factors is None else factors
    W = torch.cholesky_solve(B, L).T.contiguous()  # the dense optimum W*
    for i1 in range(0, d, block):
        i2 = min(i1 + block, d)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        err = torch.zeros_like(W1)
        for i in range(i2 - i1):
            w = W1[:, i]
            e = torch.where(keep[:, i1 + i], 0.0, w) / U1[i, i]
            W1[:, i:] -= e.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            err[:, i] = e
        W[:, i1:i2] = W1
        W[:, i2:] -= err @ U[i1:i2, i2:]
    return W.masked_fill_(~keep, 0.0)


def _factor_bound(keep: Tensor) -> float:
    """At least as many elements as :func:`exact_factors` of ``keep`` hold (batches padded)."""
    counts = keep.sum(1).to(torch.float64)
    return float(((BATCH_GROWTH * counts + BATCH_SLACK) ** 2).sum())


def solve(
    H: Tensor, B: Tensor, keep: Tensor, ridge: float, solver: str, memo: dict | None = None
) -> tuple[Tensor, str]:
    """Weights ``(out, d)`` for one layer/group and the solver used (see the module docstring).
    ``memo``: a dict kept with this very ``H`` over calls (``B`` may change); keeps the
    factorizations (OBS's per ``λ``; the exact solver's for its last mask and ``λ``)."""
    name = choose(keep, solver)
    lam = ridge_of(H, ridge)
    if name == "exact":
        held = None if memo is None else memo.pop("exact", None)
        if held is None or held[0] != lam or not torch.equal(held[1], keep):
            if memo is None or _factor_bound(keep) > MEMO_ELEMENTS:
                return solve_exact(H, B, keep, lam), name  # one batch at a time, none kept
            held = (lam, keep.clone(), list(exact_factors(H, keep, lam)))
        memo["exact"] = held
        return solve_exact(H, B, keep, lam, held[2]), name
    factors = None if memo is None else memo.get(lam)
    if factors is None:
        factors = obs_factors(H, lam)
        if memo is not None:
            memo[lam] = factors
    return solve_obs(H, B, keep, lam, factors=factors), name


def quadratic_error(H: Tensor, B: Tensor, yy: Tensor, W: Tensor) -> float:
    """``Σ_r ||Y_r − X w_r||² = Σ_r (yᵀy − 2 w_rᵀB_r + w_rᵀ H w_r)`` from the statistics."""
    return float(yy.sum() - 2 * (W * B.T).sum() + ((W @ H) * W).sum())
