"""Half-overlapping batch pairs for SFW-Init (as in GradInit, Zhu et al. 2021).

Iteration ``t`` takes the gradient on ``A_t = batch_t`` and evaluates the stepped model on

    B_t = cat(second half of batch_t, first half of batch_{t+1})

so ``B_t`` shares half its samples with ``A_t`` and brings half new ones: the objective rewards
a first step that generalises beyond the batch it was computed on, without being pure noise.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

Tensor = torch.Tensor
Batch = tuple[Tensor, Tensor]


def _unpack(batch: object) -> Batch:
    try:
        x, y = batch  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ValueError(
            f"Invalid batch: {type(batch).__name__} (expected a pair (inputs, targets))"
        ) from None
    if not isinstance(x, Tensor) or not isinstance(y, Tensor) or len(x) < 1 or len(x) != len(y):
        raise ValueError(
            f"Invalid batch: inputs {getattr(x, 'shape', x)!r}, targets {getattr(y, 'shape', y)!r} "
            "(expected two tensors with the same number >= 1 of samples)"
        )
    return x, y


def half_overlapping_pairs(batches: Iterable[object], iters: int) -> Iterator[tuple[Batch, Batch]]:
    """Yield ``iters`` pairs ``(A_t, B_t)``, re-iterating ``batches`` when it runs out.

    A re-iterable (list, DataLoader) is cycled as often as needed. A one-shot iterator must yield
    at least ``iters`` batches; the last ``B`` then borrows from the first batch.

    Example:
        >>> pairs = list(half_overlapping_pairs([(x0, y0), (x1, y1)], iters=2))
        >>> # pairs[0] = ((x0, y0), (cat(x0[h:], x1[:h]), ...)); pairs[1] pairs x1 with x0
    """
    stream = iter(batches)
    try:
        first = _unpack(next(stream))
    except StopIteration:
        raise ValueError("Invalid batches: empty (expected at least one (x, y) batch)") from None
    current = first
    for t in range(iters):
        try:
            following = next(stream)
        except StopIteration:
            stream = iter(batches)
            try:
                following = next(stream)
            except StopIteration:
                if t < iters - 1:
                    raise ValueError(
                        f"Invalid batches: a one-shot iterator ran out after {t + 1} batches "
                        f"(expected {iters}; pass a list or DataLoader, or fewer iters)"
                    ) from None
                following = first
        nxt = _unpack(following) if following is not first else first
        (xa, ya), (xn, yn) = current, nxt
        half_a, half_n = len(xa) // 2, len(xn) // 2
        eval_batch = (torch.cat([xa[half_a:], xn[:half_n]]), torch.cat([ya[half_a:], yn[:half_n]]))
        yield current, eval_batch
        current = nxt
