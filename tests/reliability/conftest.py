"""Shared fixtures of the reliability tests: one tiny trained run, copied per test, and helpers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# A run that trains in well under a second on one CPU thread (synthetic 8x8 images).
TINY = {"dataset": "synthetic", "model": "lenet300", "limit": 128, "batch_size": 64, "epochs": 1}


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root``: relative path -> (size, mtime_ns) of a file,
    ``(-1, 0)`` for a folder (its mtime moves when a probe file comes and goes)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.stat()
            out[str(path.relative_to(root))] = (
                (-1, 0) if path.is_dir() else (st.st_size, st.st_mtime_ns)
            )
    return out


def _subprocess_env() -> dict[str, str]:
    """Environment for ``python -m sfwprune`` children: the package importable, one thread."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.pop("SFWPRUNE_DATA", None)
    return env


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A finished 1-epoch run folder (config.json, metrics.jsonl, checkpoint.pt, summary.json).

    Read-only: tests that change it work on :func:`run_copy`.
    """
    from sfwprune.experiments.config import TrainConfig
    from sfwprune.experiments.runner import train_run

    out = tmp_path_factory.mktemp("reliability") / "run"
    train_run(TrainConfig(**TINY), out, quiet=True)
    return out


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    """A private copy of :func:`trained_run` under this test's ``tmp_path``."""
    dest = tmp_path / "run"
    shutil.copytree(trained_run, dest)
    return dest


@pytest.fixture
def listing():
    """``listing(root)``: every file and folder under ``root`` -> (size, mtime_ns) of a file."""
    return _listing


@pytest.fixture
def child_env() -> dict[str, str]:
    """Environment for ``python -m sfwprune`` children: the package importable, one thread,
    no ``$SFWPRUNE_DATA``."""
    return _subprocess_env()
