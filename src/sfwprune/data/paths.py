"""Where datasets are looked for: an explicit folder, ``$SFWPRUNE_DATA``, system folders, a cache.

Search order for every dataset: ``data_dir`` argument, then the ``SFWPRUNE_DATA`` environment
variable, then dataset-specific system folders, then the download cache
(``$XDG_CACHE_HOME/sfwprune``, default ``~/.cache/sfwprune``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

DATA_ENV = "SFWPRUNE_DATA"


def cache_dir() -> Path:
    """Download and decode cache: ``$XDG_CACHE_HOME/sfwprune`` or ``~/.cache/sfwprune``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sfwprune"


def search_roots(
    data_dir: str | os.PathLike | None, system: Iterable[Path] = ()
) -> list[tuple[str, Path]]:
    """Ordered ``(label, folder)`` pairs to look in; missing entries (no arg, no env) are left out.

    Example:
        >>> search_roots("/data", system=[Path("/usr/share/datasets/x")])[0]
        ('data_dir argument', PosixPath('/data'))
    """
    roots: list[tuple[str, Path]] = []
    if data_dir is not None:
        roots.append(("data_dir argument", Path(data_dir).expanduser()))
    env = os.environ.get(DATA_ENV)
    if env:
        roots.append((f"${DATA_ENV}", Path(env).expanduser()))
    roots.extend(("system folder", Path(p)) for p in system)
    roots.append(("download cache", cache_dir()))
    return roots


def describe_search(tried: list[tuple[str, Path, str]]) -> str:
    """One line per place looked in: ``label: folder (why it did not do)``."""
    return "\n".join(f"  - {label}: {folder} ({why})" for label, folder, why in tried)
