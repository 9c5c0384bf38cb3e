"""Finiteness of many tensors at once, for the guards before an optimizer step."""

from __future__ import annotations

from collections.abc import Sequence

import torch

Tensor = torch.Tensor


def finite_flags(tensors: Sequence[Tensor]) -> Tensor:
    """Bool tensor, one flag per tensor: all of its entries are finite.

    Fast path: one fused L2 norm per tensor and one host sync. A norm that is not finite means
    NaN/inf *or* an overflowing sum of squares of huge finite values, so only then the exact
    check (max |x|, which cannot overflow) runs on the tensors concerned.
    """
    if not tensors:
        return torch.ones(0, dtype=torch.bool)
    flags = torch.stack([torch.isfinite(n) for n in torch._foreach_norm(list(tensors))])
    if bool(flags.all()):
        return flags
    exact = [bool(torch.isfinite(t.abs().amax())) if t.numel() else True for t in tensors]
    return torch.tensor(exact, dtype=torch.bool)
