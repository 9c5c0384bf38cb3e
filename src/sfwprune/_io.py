"""Atomic file writes and safe loads: a file we write is either the old one or the new one.

Every writer goes to a temporary file in the same folder, flushes and fsyncs it, then renames it
over the target (``os.replace`` is atomic on POSIX and Windows) and fsyncs the folder, so a
process killed at any moment (or a power cut after the call returns) leaves the old file or the
new one, never a mix. The new file gets the mode of the file it replaces, or ``0o666 & ~umask``
for a new one (as ``open(path, "w")`` would), so shared checkpoints stay readable by others.

Every load of a tensor file goes through :func:`safe_torch_load` (``weights_only=True``): a file
that would import or call anything when unpickled is refused before any of it runs.

Example:
    >>> atomic_torch_save({"w": torch.zeros(3)}, "run/checkpoint.pt")
    >>> safe_torch_load("run/checkpoint.pt")["w"]
    tensor([0., 0., 0.])
"""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import re
import stat
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

PathLike = str | os.PathLike

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting (briefly process-wide) and restoring
    os.umask(mask)
    return mask


def _new_file_mode(path: Path) -> int:
    try:
        return stat.S_IMODE(path.stat().st_mode)  # keep the mode of the file we replace
    except OSError:
        return 0o666 & ~_umask()


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable; best effort (not every OS can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(fh)`` on a temporary file next to ``path``, then rename it over ``path``.

    On any error (or interrupt) in between, the temporary file is removed and ``path`` is left
    as it was.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Invalid output path: {str(path)!r} (folder {str(folder)!r} does not exist)"
        )
    if path.is_dir():
        raise ValueError(f"Invalid output path: {str(path)!r} (it is a folder, expected a file)")
    mode = _new_file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
            if hasattr(os, "fchmod"):
                os.fchmod(fh.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_folder(folder)
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (old file or new file, never a mix)."""
    return _atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj, path)``, atomically (serialized in memory first, then written)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def append_line(path: PathLike, line: str) -> None:
    """Append one line and fsync it (for JSONL logs: a crash loses at most the last line)."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line.rstrip("\n") + "\n")
        fh.flush()
        os.fsync(fh.fileno())


# Lines of torch's weights-only error that are advice (how to turn the safety off), not reason.
_ADVICE = (
    "weights only load failed",
    "in pytorch 2.6",
    "please file an issue",
    "check the documentation",
    "(1)",
    "(2)",
)


def _refusal_reason(message: str) -> str:
    """The one informative line of torch's weights-only error, without the advice to bypass it."""
    text = _ANSI.sub("", message)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    for line in text.splitlines():
        line = line.strip()
        if line and not line.lower().startswith(_ADVICE):
            return line.split(" Please use ", 1)[0].split(" Please file ", 1)[0].rstrip(". ")
    return "unsupported pickle content"


def _asks_for_code(reason: str) -> bool:
    lowered = reason.lower()
    words = ("global", "class", "blocked", "persistent id", "build", "it names ")
    return any(word in lowered for word in words)


def _pickle_globals(path: Path, limit: int = 1 << 26) -> list[str]:
    """Globals a plain (non-zip) pickle file would import, found by parsing it, not running it."""
    names: list[str] = []
    strings: list[str] = []
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit)
        for op, arg, _ in pickletools.genops(data):
            if isinstance(arg, str):
                strings.append(arg)
            if op.name in ("GLOBAL", "INST") and isinstance(arg, str):
                names.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # a truncated or non-pickle file: report what was seen before it broke
        pass
    return names


def _check_zip_bounds(path: Path) -> None:
    """Refuse a zip-format tensor file whose entries would inflate beyond the file's own size.

    ``torch.save`` stores every entry uncompressed, so the bytes torch reads are bounded by the
    file size; a compressed (possibly bomb-like) entry is refused before torch inflates it.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return  # not a zip (legacy format) or broken: torch.load reports it
    size = path.stat().st_size
    inflated = 0
    for info in infos:
        inflated += info.file_size
        if info.compress_type != zipfile.ZIP_STORED or info.file_size > info.compress_size:
            raise ValueError(
                f"Invalid file: {str(path)!r} (entry {info.filename!r} is compressed to inflate "
                f"to {info.file_size} bytes; torch.save files store entries uncompressed)"
            )
    if inflated > size:
        raise ValueError(
            f"Invalid file: {str(path)!r} (its entries claim {inflated} bytes, more than the "
            f"{size}-byte file)"
        )


def safe_torch_load(path: PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with one clear error for missing, empty, truncated
    or code-carrying files.

    A file whose pickle would import a class or call a function (``os.system``, a custom
    ``__reduce__`` ...) is refused before anything in it runs, and so is a zip entry that would
    inflate (``torch.save`` never compresses), so reading never takes more than the file's size.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: empty, truncated, corrupt or refused; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Invalid file: {str(path)!r} (no such file)")
    if path.stat().st_size == 0:
        raise ValueError(f"Invalid file: {str(path)!r} (it is empty)")
    _check_zip_bounds(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _refusal_reason(str(exc))
        if not _asks_for_code(reason):
            # torch stops at the first opcode it does not know (e.g. a protocol-4 FRAME), before
            # seeing any global: parse the file (without running it) to tell code from corruption
            found = sorted(set(_pickle_globals(path)))
            if found:
                reason = f"it names {', '.join(found[:3])}"
        if _asks_for_code(reason):
            raise ValueError(
                f"Invalid file: {str(path)!r} (refused: it is not plain tensor data, loading it "
                f"would import or call code ({reason}); nothing from it was run)"
            ) from None
        raise ValueError(
            f"Invalid file: {str(path)!r} (not a readable tensor file, truncated or corrupt: "
            f"{reason})"
        ) from None
    except Exception as exc:  # torch reports corrupt files as RuntimeError, EOFError, IndexError...
        first = _ANSI.sub("", str(exc)).strip().splitlines()
        raise ValueError(
            f"Invalid file: {str(path)!r} (not a readable tensor file, truncated or corrupt: "
            f"{first[0] if first else type(exc).__name__})"
        ) from None
