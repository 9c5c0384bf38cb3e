"""Atomic file writes and safe loads: a file we write is either the old one or the new one.

Every writer goes to a temporary file in the same folder, flushes and fsyncs it, then renames it
over the target (``os.replace`` is atomic on POSIX and Windows).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

PathLike = str | os.PathLike


def _atomic_write(path: PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"Invalid output path: {str(path)!r} (folder {str(folder)!r} does not exist)")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return _atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj, path)``, atomically."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def append_line(path: PathLike, line: str) -> None:
    """Append one line and fsync it (for JSONL logs: a crash loses at most the last line)."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line.rstrip("\n") + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def safe_torch_load(path: PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with one clear error for missing, empty, truncated
    or code-carrying files. Raises ``FileNotFoundError`` or ``ValueError``; never runs code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Invalid file: {str(path)!r} (no such file)")
    if path.stat().st_size == 0:
        raise ValueError(f"Invalid file: {str(path)!r} (it is empty)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"Invalid file: {str(path)!r} (refused: it is not a plain tensor file and may carry "
            f"code; only weights_only loading is allowed: {str(exc).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError, KeyError, AttributeError) as exc:
        raise ValueError(
            f"Invalid file: {str(path)!r} (not a readable checkpoint, truncated or corrupt: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from None
