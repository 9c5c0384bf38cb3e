"""IDX files (the MNIST / Fashion-MNIST format), parsed with numpy, gzip or plain.

Layout: two zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
0x0E float64), a byte with the number of dimensions d, then d big-endian uint32 sizes, then the
values, big-endian, row-major. Images carry magic number 2051 (``00 00 08 03``), labels 2049.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise ValueError(
            f"Invalid IDX file: {str(path)!r} (gzip data is truncated or corrupt: {exc})"
        ) from None


def read_idx(path: str | os.PathLike, *, magic: int | None = None) -> np.ndarray:
    """Array stored in an IDX file (``.gz`` is detected from the content, not the name).

    Args:
        path: the file.
        magic: if given, the required magic number (e.g. ``IMAGES_MAGIC``).

    Raises ``ValueError`` naming the file for a bad header, a wrong magic number, or a size that
    does not match the header (truncated or trailing bytes).

    Example:
        >>> read_idx("train-labels-idx1-ubyte.gz", magic=LABELS_MAGIC).shape   # doctest: +SKIP
        (60000,)
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"Invalid IDX file: {str(path)!r} ({len(data)} bytes, no header)")
    zero, type_code, ndim = struct.unpack(">HBB", data[:4])
    found = struct.unpack(">I", data[:4])[0]
    if zero != 0 or type_code not in IDX_TYPES or ndim == 0:
        raise ValueError(f"Invalid IDX file: {str(path)!r} (bad magic number 0x{found:08x})")
    if magic is not None and found != magic:
        raise ValueError(
            f"Invalid IDX file: {str(path)!r} (magic number {found}, expected {magic})"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"Invalid IDX file: {str(path)!r} (header truncated)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = IDX_TYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"Invalid IDX file: {str(path)!r} ({len(data) - header} data bytes, header "
            f"{tuple(shape)!r} needs {expected}: truncated or corrupt)"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)
