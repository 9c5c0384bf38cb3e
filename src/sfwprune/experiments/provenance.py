"""Where a result came from: code revision, package versions, device, threads, time."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

_PACKAGES = ("sfwprune", "torch", "torchvision", "numpy", "matplotlib")


def git_revision(path: str | os.PathLike | None = None) -> str:
    """``git describe``-style revision of the source tree (``-dirty`` when modified), or
    ``"unknown"`` outside a git checkout."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5,
            check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{rev}-dirty" if dirty else rev


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
        "versions": package_versions(),
        "device": device_description(device),
        "torch_threads": torch.get_num_threads(),
        "hostname": platform.node(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if wall_seconds is not None:
        out["wall_seconds"] = round(float(wall_seconds), 3)
    return out
