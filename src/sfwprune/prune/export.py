"""Compact export of a pruned model: a packed bitmask plus the nonzero values, compressed.

Size of ``N`` floating parameters with ``nnz`` nonzeros at ``b`` bytes each, before compression:
``N/8 + b·nnz`` bytes instead of ``b·N`` (at 95% sparsity about 0.18 of float32 dense; the
compressor then shrinks the mask, which is mostly zero bytes). Buffers (BatchNorm statistics) and
non-floating parameters are stored densely. The file is a plain dict of tensors, strings and ints,
so it loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import lzma
import sys
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._io import PathLike, atomic_torch_save, safe_torch_load

Tensor = torch.Tensor

FORMAT = "sfwprune.pruned"
VERSION = 1
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
COMPRESSIONS = ("zlib", "lzma")
_KEYS = ("dtype", "compression", "byteorder", "names", "shapes", "mask", "values", "dense")


def _compress(data: bytes, method: str) -> Tensor:
    raw = zlib.compress(data, 9) if method == "zlib" else lzma.compress(data, preset=6)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def _decompress(blob: Tensor, method: str, size: int, what: str, path: PathLike) -> bytes:
    """Inflate ``blob`` to exactly ``size`` bytes, never more: the output is capped at ``size``
    while inflating, so a small file claiming little but inflating to gigabytes (a "zip bomb")
    costs at most ``size`` bytes of memory before it is refused."""
    if not isinstance(blob, Tensor) or blob.dtype != torch.uint8 or blob.dim() != 1:
        raise ValueError(f"Invalid file: {str(path)!r} (corrupt {what}: not a byte tensor)")
    data = blob.numpy().tobytes()
    try:
        if method == "zlib":
            inflater = zlib.decompressobj()
            out = inflater.decompress(data, size + 1)
            more, done = bool(inflater.unconsumed_tail), inflater.eof
        else:
            unxz = lzma.LZMADecompressor()
            out = unxz.decompress(data, size + 1)
            more, done = not unxz.needs_input and not unxz.eof, unxz.eof
    except (zlib.error, lzma.LZMAError) as exc:
        raise ValueError(f"Invalid file: {str(path)!r} (corrupt data in {what}: {exc})") from None
    if len(out) > size or more:
        raise ValueError(
            f"Invalid file: {str(path)!r} ({what} inflates to more than the {size} bytes its "
            "header implies; refused)"
        )
    if len(out) < size or not done:
        raise ValueError(
            f"Invalid file: {str(path)!r} (corrupt data: {what} has {len(out)} bytes, expected {size})"
        )
    return out


def _shuffle(values: Tensor) -> bytes:
    # byte planes (all first bytes, then all second bytes, ...): sign/exponent bytes of similar
    # weights repeat, which the compressor then finds
    size = values.element_size()
    return values.contiguous().view(torch.uint8).view(-1, size).t().contiguous().numpy().tobytes()


def _unshuffle(data: bytes, dtype: torch.dtype) -> Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    planes = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0)
    return planes.to(torch.uint8).view(size, -1).t().contiguous().view(dtype).reshape(-1)


def _split(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(floating parameters, dense tensors)``. Dense: persistent buffers and non-floating
    parameters, by ``state_dict`` name. A shared parameter is stored once, under its first name."""
    params = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    dense = {}
    for n, t in model.state_dict(keep_vars=True).items():
        if not isinstance(t, Tensor) or n in params or (n in names and t.is_floating_point()):
            continue
        dense[n] = t
    return params, dense


def save_pruned(
    model: nn.Module,
    path: PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    compression: str = "zlib",
) -> Path:
    """Write ``model``'s weights compactly (bitmask + nonzeros at ``dtype``), atomically.

    Args:
        model: the pruned network (not modified).
        path: output file; its folder must exist.
        dtype: storage dtype of parameter values: float32 (default), float16, bfloat16 or
            float64. Loading gives back ``param.to(dtype)`` exactly.
        compression: ``"zlib"`` (default) or ``"lzma"`` (smaller, slower).

    Returns:
        The path written.

    Example:
        >>> prune_(net, 0.95)
        >>> save_pruned(net, "net.pruned.pt", dtype=torch.float16)
        >>> load_pruned("net.pruned.pt", fresh_net)
    """
    names = {v: k for k, v in DTYPES.items()}
    if not isinstance(dtype, torch.dtype) or dtype not in names:
        raise ValueError(f"Invalid dtype: {dtype!r} (expected one of {', '.join(DTYPES)})")
    if compression not in COMPRESSIONS:
        raise ValueError(
            f"Invalid compression: {compression!r} (expected one of {', '.join(COMPRESSIONS)})"
        )
    params, dense = _split(model)
    masks, values = [], []
    with torch.no_grad():
        for p in params.values():
            v = p.detach().to(device="cpu", dtype=dtype).reshape(-1)
            m = v != 0
            masks.append(m)
            values.append(v[m])
    mask = torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool)
    value = torch.cat(values) if values else torch.zeros(0, dtype=dtype)
    obj = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": names[dtype],
        "compression": compression,
        "byteorder": sys.byteorder,
        "names": list(params),
        "shapes": [list(p.shape) for p in params.values()],
        "mask": _compress(np.packbits(mask.numpy()).tobytes(), compression),
        "values": _compress(_shuffle(value), compression),
        "dense": {n: t.detach().cpu().clone() for n, t in dense.items()},
    }
    return atomic_torch_save(obj, path)


def _check_names_shapes(
    what: str, stored: dict[str, list[int]], model: dict[str, list[int]], path: PathLike
) -> None:
    if stored == model:
        return
    missing = [n for n in model if n not in stored]
    unexpected = [n for n in stored if n not in model]
    shapes = [
        f"{n}: file {stored[n]} vs model {model[n]}"
        for n in stored
        if n in model and stored[n] != model[n]
    ]
    problems = []
    if missing:
        problems.append(f"missing in file: {missing}")
    if unexpected:
        problems.append(f"not in model: {unexpected}")
    if shapes:
        problems.append(f"shape mismatch: {shapes}")
    if not problems:
        problems.append(f"order differs: file {list(stored)} vs model {list(model)}")
    raise ValueError(
        f"Invalid file: {str(path)!r} ({what} do not match the model; {'; '.join(problems)})"
    )


def load_pruned(path: PathLike, model: nn.Module) -> nn.Module:
    """Load a :func:`save_pruned` file into ``model`` in place (all or nothing) and return it.

    Parameter and buffer names and shapes must match the model exactly, else ``ValueError``
    listing the differences; each value is cast to the model tensor's dtype and device.
    """
    obj = safe_torch_load(path)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"Invalid file: {str(path)!r} (not a save_pruned file)")
    if obj.get("version") != VERSION:
        raise ValueError(
            f"Invalid file: {str(path)!r} (format version {obj.get('version')!r}, "
            f"this sfwprune reads version {VERSION})"
        )
    missing = [k for k in _KEYS if k not in obj]
    if missing:
        raise ValueError(f"Invalid file: {str(path)!r} (corrupt: no {', '.join(missing)})")
    if obj["byteorder"] != sys.byteorder:
        raise ValueError(f"Invalid file: {str(path)!r} (written {obj['byteorder']}-endian)")
    if obj["dtype"] not in DTYPES or obj["compression"] not in COMPRESSIONS:
        raise ValueError(f"Invalid file: {str(path)!r} (unknown dtype or compression)")
    params, dense = _split(model)
    stored = dict(zip(obj["names"], obj["shapes"], strict=True))
    _check_names_shapes("parameters", stored, {n: list(p.shape) for n, p in params.items()}, path)
    _check_names_shapes(
        "buffers",
        {n: list(t.shape) for n, t in obj["dense"].items()},
        {n: list(t.shape) for n, t in dense.items()},
        path,
    )
    dtype = DTYPES[obj["dtype"]]
    total = sum(p.numel() for p in params.values())
    # every inflation is bounded by what the names/shapes (checked against the model) imply:
    # the mask by ceil(total/8) bytes, the values by (bits set in the mask) · itemsize
    packed = np.frombuffer(
        _decompress(obj["mask"], obj["compression"], (total + 7) // 8, "mask", path),
        dtype=np.uint8,
    )
    mask = torch.from_numpy(np.unpackbits(packed, count=total).astype(bool))
    nnz = int(mask.sum())
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = _decompress(obj["values"], obj["compression"], nnz * itemsize, "values", path)
    values = _unshuffle(raw, dtype)
    flat = torch.zeros(total, dtype=dtype)
    flat[mask] = values
    with torch.no_grad():
        for p, part in zip(
            params.values(), torch.split(flat, [p.numel() for p in params.values()]), strict=True
        ):
            p.copy_(part.view(p.shape))
        for n, t in dense.items():
            t.copy_(obj["dense"][n])
    return model
