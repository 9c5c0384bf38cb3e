"""2:4 weights for GPU sparse tensor cores (``torch.sparse.to_sparse_semi_structured``).

A weight follows N:M along its rows when every group of M consecutive entries of every row
(conv: along ``C·kh·kw``) has at most N non-zeros; ``prune_(model, structure="2:4")`` gives that.
PyTorch's semi-structured tensors (CUTLASS and cuSPARSELt backends) take only 2:4, on CUDA, for
2-D contiguous tensors whose shape is a multiple of (and at least) a per-dtype minimum:

======================  ==========================  ================================
dtype                   CUTLASS (rows, cols)        cuSPARSELt (rows, cols)
======================  ==========================  ================================
float16, bfloat16       (32, 64)                    (16, 16)
float32                 (32, 32)                    not supported
======================  ==========================  ================================

:data:`SEMI_STRUCTURED_SHAPES` holds the minimum every backend accepts (the CUTLASS column).
int8 and float8 need quantized weights and are left out here.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

Tensor = torch.Tensor

# dtype -> (rows, cols): both dimensions must be multiples of these (and at least these)
SEMI_STRUCTURED_SHAPES: dict[torch.dtype, tuple[int, int]] = {
    torch.float16: (32, 64),
    torch.bfloat16: (32, 64),
    torch.float32: (32, 32),
}


def follows_n_m(weight: Tensor, n: int = 2, m: int = 4) -> bool:
    """Whether every group of ``m`` consecutive entries of every row has at most ``n`` non-zeros.

    ``weight`` is read as ``(rows, -1)``; a row length that is not a multiple of ``m`` gives
    ``False``.
    """
    rows = weight.detach().reshape(weight.shape[0], -1)
    if rows.shape[1] % m:
        return False
    return bool(((rows != 0).reshape(-1, m).sum(dim=1) <= n).all())


def semi_structured_shape_ok(shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    """Whether a 2-D ``shape`` meets :data:`SEMI_STRUCTURED_SHAPES` for ``dtype``."""
    if dtype not in SEMI_STRUCTURED_SHAPES or len(shape) != 2:
        return False
    (r, c), (mr, mc) = shape, SEMI_STRUCTURED_SHAPES[dtype]
    return r >= mr and c >= mc and r % mr == 0 and c % mc == 0


@torch.no_grad()
def semi_structured_state(
    model: nn.Module, *, dtype: torch.dtype = torch.float16
) -> dict[str, Tensor]:
    """``{weight name: (out, fan_in) contiguous tensor in dtype}`` for every Linear/conv layer
    that ``torch.sparse.to_sparse_semi_structured`` can take, verified to follow 2:4 along rows.

    Conv weights come as their ``(out, C·kh·kw)`` matrix (the im2col matmul's). Layers whose
    row length is not a multiple of 4 (left dense by ``indivisible="skip"``) or whose matrix
    shape the kernels refuse (see the module docstring; e.g. a 10-class output layer) are left
    out: they stay dense. The tensors are on the model's device; move them to CUDA and call
    ``to_sparse_semi_structured`` there.

    Raises:
        ValueError: ``dtype`` unsupported, or a layer of acceptable shape whose weights break
        2:4 (the model was not pruned with ``structure="2:4"``); the message names it.

    Example:
        >>> prune_(model, structure="2:4")
        >>> state = semi_structured_state(model)
        >>> w = torch.sparse.to_sparse_semi_structured(state["fc1.weight"].cuda())
    """
    if dtype not in SEMI_STRUCTURED_SHAPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SEMI_STRUCTURED_SHAPES)
        raise ValueError(f"Invalid dtype: {dtype} (expected one of {names})")
    out: dict[str, Tensor] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, _ConvNd)):
            continue
        if isinstance(mod, _ConvNd) and mod.groups != 1:
            continue
        full = f"{name}.weight" if name else "weight"
        w = mod.weight.detach()
        matrix = w.reshape(w.shape[0], -1)
        if matrix.shape[1] % 4 or not semi_structured_shape_ok(tuple(matrix.shape), dtype):
            continue
        matrix = matrix.to(dtype).contiguous()
        # checked after the cast: a tiny weight that underflows to 0 only helps the pattern
        if not follows_n_m(matrix, 2, 4):
            raise ValueError(
                f"Invalid weights: {full!r} does not follow 2:4 along its rows "
                "(prune with structure='2:4' first)"
            )
        out[full] = matrix
    return out
