"""AC/DC schedule: phases, masks at phase starts, resume-safe re-derivation, bad arguments."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sfwprune.acdc import ACDCSchedule


def test_default_phases_for_20_epochs():
    s = ACDCSchedule(epochs=20, sparsity=0.98)
    sparse = [e for e in range(20) if s.is_sparse(e)]
    assert sparse == [2, 3, 6, 7, 10, 11, 14, 15]
    assert [e for e in range(20) if s.starts_sparse_phase(e)] == [2, 6, 10, 14]


def test_explicit_lengths():
    s = ACDCSchedule(epochs=10, sparsity=0.5, warmup=1, phase=3, final_dense=1)
    assert [s.is_sparse(e) for e in range(10)] == [
        False, True, True, True, False, False, False, True, True, False,
    ]  # fmt: skip


def test_masks_fixed_within_a_phase_and_rederived_on_resume():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 3))
    s = ACDCSchedule(epochs=20, sparsity=0.8)
    assert s.masks_for(model, 0, None) is None
    masks = s.masks_for(model, 2, None)
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == round(0.2 * (200 + 30))
    assert s.masks_for(model, 3, masks) is masks  # inside the phase: the same mask
    # a resumed run inside the phase re-derives the same mask from the pruned weights
    again = s.masks_for(model, 3, None)
    for name in masks:
        assert torch.equal(again[name], masks[name])
    assert s.masks_for(model, 4, masks) is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"epochs": 0}, "Invalid epochs"),
        ({"epochs": 5, "sparsity": 1.5}, "Invalid sparsity"),
        ({"epochs": 5, "phase": 0}, "Invalid phase"),
        ({"epochs": 5, "warmup": -1}, "Invalid warmup"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ACDCSchedule(**kwargs)
