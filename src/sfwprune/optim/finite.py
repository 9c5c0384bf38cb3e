"""Finiteness of many tensors at once, for the guards before an optimizer step."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _cpu_kernel

Tensor = torch.Tensor
_KERNEL_DTYPES = (torch.float32, torch.float64)


class NonFiniteGradientError(ValueError):
    """A gradient holds NaN or inf; the optimizer step was refused with nothing changed."""

    def __init__(self, group: str) -> None:
        super().__init__(
            f"Invalid gradient: non-finite values in param group {group!r} (the SFW step was "
            "refused; weights and momentum are unchanged)"
        )
        self.group = group


def finite_flags(tensors: Sequence[Tensor]) -> Tensor:
    """Bool tensor, one flag per tensor: all of its entries are finite.

    Contiguous CPU float tensors: the compiled exact check (when numba imports). Others: one
    fused L2 norm per tensor and one host sync. A norm that is not finite means NaN/inf *or* an
    overflowing sum of squares of huge finite values, so only then the exact check (max |x|,
    which cannot overflow) runs on the tensors concerned.
    """
    if not tensors:
        return torch.ones(0, dtype=torch.bool)
    flags: list[bool] = [True] * len(tensors)
    rest: list[int] = []
    for j, t in enumerate(tensors):
        if (
            _cpu_kernel.AVAILABLE
            and t.device.type == "cpu"
            and t.dtype in _KERNEL_DTYPES
            and t.is_contiguous()
        ):
            flags[j] = bool(_cpu_kernel.all_finite(t.detach().view(-1).numpy()))
        else:
            rest.append(j)
    if rest:
        norms = torch.stack(torch._foreach_norm([tensors[j] for j in rest]))
        if not bool(torch.isfinite(norms).all()):
            for j in rest:
                t = tensors[j]
                flags[j] = bool(torch.isfinite(t.abs().amax())) if t.numel() else True
    return torch.tensor(flags, dtype=torch.bool)
