"""finite_flags: NaN/inf found per tensor; huge finite values are not mistaken for inf."""

import torch

from sfwprune.optim.finite import finite_flags


def test_flags_per_tensor() -> None:
    a, b = torch.ones(5), torch.ones(3)
    b[1] = float("nan")
    c = torch.ones(4, dtype=torch.float64)
    c[0] = float("-inf")
    assert finite_flags([a, b, c]).tolist() == [True, False, False]


def test_huge_finite_values_are_finite() -> None:
    # their squares overflow the L2 norm of the fast path; the exact check must clear them
    huge32 = torch.full((100,), 3e37)
    huge64 = torch.full((100,), 1e300, dtype=torch.float64)
    assert finite_flags([huge32, huge64, torch.zeros(0)]).tolist() == [True, True, True]
    assert finite_flags([]).numel() == 0
