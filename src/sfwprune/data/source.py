"""Which data a run used: the resolved folder plus a content hash, as a plain record.

    sha256 = SHA-256 over, for each file read (sorted by name): name, size, bytes
           = SHA-256 over the train/test tensors (dtype, shape, bytes) for generated data

Fashion-MNIST and CIFAR-10 hash the files as stored (the ``.gz`` files themselves, not their
inflated content: a few hundred MB/s, well under a second). Tiny-ImageNet hashes ``wnids.txt``,
``val_annotations.txt`` and every image's name and size (hashing 110k JPEG bodies would take
longer than a short run). ``limit`` does not change the hash: it is the whole source's.

A runner writes ``source.as_dict()`` to its config and compares it later with
:func:`check_source`, so an evaluation on other data than the training run's is refused.

Example:
    >>> src = resolve_source("synthetic")
    >>> sorted(src.as_dict())
    ['path', 'sha256']
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_CHUNK = 1 << 20


@dataclass(frozen=True)
class DataSource:
    """Where a dataset came from and a hash of its content.

    Attributes:
        path: the folder the files were read from, or a description for generated/bundled data
            (``"generated (seed=0)"``, ``"sklearn.datasets.load_digits"``).
        sha256: hex digest, see the module docstring.
        files: names of the files hashed, relative to ``path`` (empty for generated data).
        note: extra provenance, e.g. that a decode cache was read (not part of the record).
    """

    path: str
    sha256: str
    files: tuple[str, ...] = ()
    note: str = ""

    def as_dict(self) -> dict[str, str]:
        """The record for results files: ``{"path": ..., "sha256": ...}``."""
        return {"path": self.path, "sha256": self.sha256}

    def __str__(self) -> str:
        return f"{self.path} (sha256 {self.sha256[:12]})" + (f", {self.note}" if self.note else "")


def hash_files(folder: Path, files: Iterable[Path]) -> DataSource:
    """A :class:`DataSource` for ``files`` under ``folder``: each file's name, size and bytes."""
    folder = Path(folder)
    digest = hashlib.sha256(b"sfwprune.data.files\n")
    names = []
    for path in sorted(Path(f) for f in files):
        name = path.relative_to(folder).as_posix() if path.is_relative_to(folder) else str(path)
        names.append(name)
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            digest.update(f"{name}\0{size}\0".encode())
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    return DataSource(str(folder), digest.hexdigest(), tuple(names))


def hash_tensors(path: str, tensors: Iterable[torch.Tensor]) -> DataSource:
    """A :class:`DataSource` for generated or bundled data: dtype, shape and bytes of each tensor."""
    digest = hashlib.sha256(b"sfwprune.data.tensors\n")
    for t in tensors:
        t = t.detach().cpu().contiguous()
        digest.update(f"{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return DataSource(path, digest.hexdigest())


def hash_listing(folder: Path, texts: Iterable[Path], listed: Iterable[Path]) -> DataSource:
    """Bytes of the small ``texts`` files plus name and size of each ``listed`` file."""
    folder = Path(folder)
    digest = hashlib.sha256(b"sfwprune.data.listing\n")
    texts = sorted(Path(t) for t in texts)
    for path in texts:
        data = path.read_bytes()
        digest.update(f"{path.relative_to(folder).as_posix()}\0{len(data)}\0".encode() + data)
    for path in sorted(Path(p) for p in listed):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{path.stat().st_size}\n".encode())
    return DataSource(str(folder), digest.hexdigest(), tuple(t.name for t in texts))


def check_source(
    recorded: Mapping[str, Any] | None, current: DataSource, what: str = "run"
) -> None:
    """Refuse ``current`` data when it differs from the ``recorded`` record of a ``what``.

    ``recorded`` is a saved ``as_dict()``; ``None`` (a record from before sources were kept)
    passes. Only the hash is compared: the same files moved to another folder are the same data.

    Raises:
        ValueError: ``Invalid data source: ... (the {what} used sha256 ..., ... has ...)``.
    """
    if recorded is None:
        return
    if not isinstance(recorded, Mapping) or not isinstance(recorded.get("sha256"), str):
        raise ValueError(f"Invalid data source record: {recorded!r} (expected path and sha256)")
    if recorded["sha256"] != current.sha256:
        raise ValueError(
            f"Invalid data source: {current.path!r} has sha256 {current.sha256[:12]}..., but the "
            f"{what} used {recorded.get('path')!r} with sha256 {recorded['sha256'][:12]}... "
            "(pass the data_dir the run was trained on)"
        )
