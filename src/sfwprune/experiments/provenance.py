"""Where a result came from: code revision (recorded when the process starts), package
versions, device, threads, time."""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

_PACKAGES = ("sfwprune", "torch", "torchvision", "numpy", "matplotlib")


# What defines a result's code: a diff elsewhere (results, docs) leaves the stamp alone, so a
# grid that writes tracked result files does not change its own revision while it runs.
CODE_PATHS = ("src", "pyproject.toml")


def _git(args: list[str], where: Path) -> str:
    return subprocess.run(
        ["git", *args], cwd=where, capture_output=True, text=True, timeout=10, check=True
    ).stdout


@functools.cache
def code_revision(path: str | None = None) -> dict[str, Any]:
    """The code this process runs, recorded once, the first time it is asked (call
    :func:`record_start` when a process starts): ``commit``, ``dirty``, ``diff_sha256`` (the
    first 12 hex digits of the SHA-256 of ``git diff HEAD`` over :data:`CODE_PATHS`, when
    dirty), ``untracked`` (untracked files under ``src/``) and ``recorded`` (UTC time).
    ``commit`` is ``"unknown"`` outside a git checkout."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    try:
        top = Path(_git(["rev-parse", "--show-toplevel"], where).strip())
        commit = _git(["rev-parse", "HEAD"], top).strip()
        diff = _git(["diff", "HEAD", "--", *CODE_PATHS], top)
        untracked = _git(["ls-files", "--others", "--exclude-standard", "--", "src"], top)
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": False, "diff_sha256": None, "untracked": [],
                "recorded": now}  # fmt: skip
    files = sorted(line for line in untracked.splitlines() if line.strip())
    dirty = bool(diff) or bool(files)
    digest = hashlib.sha256(diff.encode() + "\0".join(files).encode()).hexdigest()[:12]
    return {"commit": commit, "dirty": dirty, "diff_sha256": digest if dirty else None,
            "untracked": files, "recorded": now}  # fmt: skip


def record_start() -> dict[str, Any]:
    """Record the code revision now, at process start (later edits to the tree do not change
    what this process reports)."""
    return code_revision()


def git_revision(path: str | os.PathLike | None = None) -> str:
    """The revision as one string: the commit, or ``<commit>-dirty-<diff hash>``."""
    rev = code_revision(None if path is None else str(path))
    return f"{rev['commit']}-dirty-{rev['diff_sha256']}" if rev["dirty"] else rev["commit"]


def revision_of(record: Any) -> str | None:
    """The ``git_revision`` of a results file's JSON (``None`` when it carries none)."""
    if isinstance(record, dict) and isinstance(record.get("provenance"), dict):
        rev = record["provenance"].get("git_revision")
        return rev if isinstance(rev, str) else None
    return None


def package_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def device_description(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()}"


def provenance(
    device: torch.device | str = "cpu", wall_seconds: float | None = None
) -> dict[str, Any]:
    """The record every results file carries."""
    out: dict[str, Any] = {
        "git_revision": git_revision(),
        "code": code_revision(),
        "versions": package_versions(),
        "device": device_description(device),
        "torch_threads": torch.get_num_threads(),
        "hostname": platform.node(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if wall_seconds is not None:
        out["wall_seconds"] = round(float(wall_seconds), 3)
    return out
