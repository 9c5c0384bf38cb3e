"""Where datasets are looked for: an explicit folder, or ``$SFWPRUNE_DATA``, system folders, a cache.

The rule: the data used is the data asked for. An explicit ``data_dir`` is the only place looked
in; if it does not exist or lacks a required file, loading fails with an error naming the folder
and the missing files (never a silent fallback). Only without ``data_dir`` is there a search
order: the ``SFWPRUNE_DATA`` environment variable, then dataset-specific system folders, then the
download cache (``$XDG_CACHE_HOME/sfwprune``, default ``~/.cache/sfwprune``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

DATA_ENV = "SFWPRUNE_DATA"
DATA_DIR_LABEL = "data_dir argument"


def expand_folder(value: str | os.PathLike, what: str) -> Path:
    """``value`` as a ``Path`` with ``~`` expanded; ``ValueError`` naming ``what`` if it cannot be.

    Example:
        >>> expand_folder("~nouser_xyz/data", "SFWPRUNE_DATA")
        Traceback (most recent call last):
        ValueError: Invalid SFWPRUNE_DATA: '~nouser_xyz/data' (cannot expand '~nouser_xyz': ...
    """
    try:
        text = os.fspath(value)
    except TypeError:
        raise ValueError(f"Invalid {what}: {value!r} (expected a folder path)") from None
    if not isinstance(text, str) or not text or "\x00" in text:
        raise ValueError(f"Invalid {what}: {value!r} (expected a non-empty folder path)")
    try:
        return Path(text).expanduser()
    except RuntimeError:  # "Could not determine home directory." for ~unknown_user
        head = text.split(os.sep, 1)[0]
        raise ValueError(
            f"Invalid {what}: {text!r} (cannot expand {head!r}: no such user or no home folder)"
        ) from None


def cache_dir() -> Path:
    """Download and decode cache: ``$XDG_CACHE_HOME/sfwprune`` or ``~/.cache/sfwprune``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(expand_folder("~", "home folder") / ".cache")
    return expand_folder(base, "XDG_CACHE_HOME") / "sfwprune"


def search_roots(
    data_dir: str | os.PathLike | None, system: Iterable[Path] = ()
) -> list[tuple[str, Path]]:
    """Ordered ``(label, folder)`` pairs to look in: only ``data_dir`` when given, else
    ``$SFWPRUNE_DATA`` (when set), the ``system`` folders and the download cache.

    Example:
        >>> search_roots("/data", system=[Path("/usr/share/datasets/x")])
        [('data_dir argument', PosixPath('/data'))]
    """
    if data_dir is not None:
        return [(DATA_DIR_LABEL, expand_folder(data_dir, "data_dir"))]
    roots: list[tuple[str, Path]] = []
    env = os.environ.get(DATA_ENV)
    if env:
        roots.append((f"${DATA_ENV}", expand_folder(env, DATA_ENV)))
    roots.extend(("system folder", Path(p)) for p in system)
    roots.append(("download cache", cache_dir()))
    return roots


def explicit_dir_error(dataset: str, folder: Path, why: str) -> FileNotFoundError:
    """The error for an explicit ``data_dir`` that does not hold ``dataset``: path and reason."""
    return FileNotFoundError(
        f"Invalid data_dir: {str(folder)!r} ({dataset}: {why}; an explicit data_dir is the only "
        "place looked in)"
    )


def describe_search(tried: list[tuple[str, Path, str]]) -> str:
    """One line per place looked in: ``label: folder (why it did not do)``."""
    return "\n".join(f"  - {label}: {folder} ({why})" for label, folder, why in tried)
