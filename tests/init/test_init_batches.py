"""Half-overlapping batch pairs for SFW-Init."""

from __future__ import annotations

import pytest
import torch

from sfwprune.init import half_overlapping_pairs


def _batches(n: int, size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    # Sample ids as inputs, so the pairing can be read off exactly.
    return [
        (torch.arange(i * size, (i + 1) * size), torch.arange(i * size, (i + 1) * size) + 100)
        for i in range(n)
    ]


def test_eval_batch_is_second_half_of_current_and_first_half_of_next() -> None:
    pairs = list(half_overlapping_pairs(_batches(3), iters=3))
    assert len(pairs) == 3
    (a0, _), (b0, yb0) = pairs[0]
    assert a0.tolist() == [0, 1, 2, 3]
    assert b0.tolist() == [2, 3, 4, 5]
    assert yb0.tolist() == [102, 103, 104, 105]
    (a1, _), (b1, _) = pairs[1]
    assert a1.tolist() == [4, 5, 6, 7] and b1.tolist() == [6, 7, 8, 9]
    # The last batch pairs with the first one again (the list is cycled).
    (a2, _), (b2, _) = pairs[2]
    assert a2.tolist() == [8, 9, 10, 11] and b2.tolist() == [10, 11, 0, 1]


def test_half_the_eval_samples_are_shared_with_the_gradient_batch() -> None:
    for (xa, _), (xb, _) in half_overlapping_pairs(_batches(5, size=6), iters=7):
        shared = set(xa.tolist()) & set(xb.tolist())
        assert len(shared) == 3 and len(xb) == 6


def test_a_list_is_cycled_as_often_as_needed() -> None:
    pairs = list(half_overlapping_pairs(_batches(2), iters=5))
    firsts = [a[0][0].item() for a, _ in pairs]
    assert firsts == [0, 4, 0, 4, 0]


def test_a_one_shot_iterator_of_exactly_iters_batches_is_enough() -> None:
    pairs = list(half_overlapping_pairs(iter(_batches(3)), iters=3))
    assert pairs[-1][1][0].tolist() == [10, 11, 0, 1]


def test_a_one_shot_iterator_that_runs_out_raises() -> None:
    with pytest.raises(ValueError, match="one-shot iterator ran out"):
        list(half_overlapping_pairs(iter(_batches(2)), iters=4))


def test_uneven_last_batch() -> None:
    batches = _batches(2) + [(torch.tensor([50, 51, 52]), torch.tensor([0, 0, 0]))]
    (a, _), (b, _) = list(half_overlapping_pairs(batches, iters=3))[2]
    assert a.tolist() == [50, 51, 52] and b.tolist() == [51, 52, 0, 1]


@pytest.mark.parametrize(
    "batches",
    [[], [torch.zeros(3)], [(torch.zeros(3), torch.zeros(2))], [(torch.zeros(0), torch.zeros(0))]],
)
def test_bad_batches_raise(batches: list) -> None:
    with pytest.raises(ValueError, match="Invalid batch"):
        list(half_overlapping_pairs(batches, iters=1))
