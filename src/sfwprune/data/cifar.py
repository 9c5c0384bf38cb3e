"""CIFAR-10 (Krizhevsky 2009) from its python pickle batches, read without running any code.

On disk: ``cifar-10-batches-py/data_batch_1..5``, ``test_batch`` (each a pickled dict with
``b'data'``: ``uint8`` ``10000×3072`` rows of R, G, B planes of 32×32, and ``b'labels'``: a list
of ints) and ``batches.meta`` (``b'label_names'``). Pickle can run arbitrary code, so batches are
read with :class:`RestrictedUnpickler`, which resolves only numpy's array/dtype reconstruction
functions and refuses every other global. Looked for only in ``data_dir`` when given (missing
batches are an error there), else in ``$SFWPRUNE_DATA`` and the download cache;
``download=True`` fetches torchvision's md5-checked archive into the cache.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .dataset import Dataset, make_dataset
from .paths import (
    DATA_DIR_LABEL,
    DATA_ENV,
    cache_dir,
    describe_search,
    explicit_dir_error,
    search_roots,
)
from .source import DataSource, hash_files

FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Protocol-2 pickles written by Python 3 store bytes as _codecs.encode(str, "latin1").
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _numpy_globals() -> dict[tuple[str, str], Any]:
    # Take the functions from numpy's own reducers so the names work on numpy 1.x and 2.x.
    reconstruct = np.zeros(1).__reduce__()[0]
    scalar = np.float64(0).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for plain data: builtin containers, bytes, numbers and numpy arrays only.

    Any other global (a class, a function such as ``os.system``) raises
    ``pickle.UnpicklingError`` before it is looked up, so no code from the file runs.
    """

    _ALLOWED = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}") from None


def safe_unpickle(path: str | os.PathLike) -> Any:
    """Load a data pickle with :class:`RestrictedUnpickler` (``encoding="bytes"`` as CIFAR needs).

    Raises ``ValueError`` naming the file when it is refused, truncated or not a pickle.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        return RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise ValueError(f"Invalid pickle file: {str(path)!r} ({exc})") from None
    except (EOFError, ValueError, TypeError, IndexError, AttributeError, KeyError) as exc:
        raise ValueError(
            f"Invalid pickle file: {str(path)!r} (truncated or corrupt: {type(exc).__name__})"
        ) from None


def _read_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    batch = safe_unpickle(path)
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"Invalid CIFAR batch: {str(path)!r} (no b'data' / b'labels' entries)")
    data, labels = batch[b"data"], batch[b"labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise ValueError(f"Invalid CIFAR batch: {str(path)!r} (b'data' is not a uint8 matrix)")
    if data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"Invalid CIFAR batch: {str(path)!r} (rows of {data.shape[1]} bytes, expected 3072)"
        )
    y = np.asarray(labels)
    if y.shape != (data.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(
            f"Invalid CIFAR batch: {str(path)!r} ({y.size} labels for {data.shape[0]} images)"
        )
    if y.size and (y.min() < 0 or y.max() >= 10):
        raise ValueError(f"Invalid CIFAR batch: {str(path)!r} (labels outside 0..9)")
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return x, torch.from_numpy(y.astype(np.int64))


def _find_folder(root: Path) -> tuple[Path | None, str]:
    if not root.is_dir():
        return None, "no such folder"
    for folder in (root / FOLDER, root):
        names = (*TRAIN_BATCHES, TEST_BATCH)
        present = [n for n in names if (folder / n).is_file()]
        if len(present) == len(names):
            return folder, "ok"
        if present:
            missing = sorted(set(names) - set(present))
            return None, f"{folder} is incomplete, missing {', '.join(missing)}"
    return None, f"no {FOLDER}/ folder, missing {', '.join((*TRAIN_BATCHES, TEST_BATCH))}"


def _download(dest: Path) -> None:
    try:
        from torchvision.datasets import CIFAR10
        from torchvision.datasets.utils import download_and_extract_archive
    except ImportError as exc:
        raise FileNotFoundError("CIFAR-10 download needs torchvision") from exc
    dest.mkdir(parents=True, exist_ok=True)
    download_and_extract_archive(
        CIFAR10.url, str(dest), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5
    )


def locate(data_dir: str | os.PathLike | None = None, *, download: bool = False) -> Path:
    """Folder holding the CIFAR-10 batches, first match in the search order."""
    tried: list[tuple[str, Path, str]] = []
    for label, root in search_roots(data_dir):
        folder, why = _find_folder(root)
        if folder is not None:
            return folder
        if label == DATA_DIR_LABEL:
            raise explicit_dir_error("CIFAR-10", root, why)
        tried.append((label, root, why))
    if download:
        _download(cache_dir())
        folder, why = _find_folder(cache_dir())
        if folder is not None:
            return folder
        tried.append(("download", cache_dir(), why))
    raise FileNotFoundError(
        "CIFAR-10 not found. Looked in:\n"
        + describe_search(tried)
        + f"\nRemedies (any one):\n  1. pass --data-dir FOLDER (data_dir=...) or set {DATA_ENV}="
        f"FOLDER, a folder containing {FOLDER}/ (the python version of CIFAR-10)\n"
        f"  2. allow a download (--download, download=True) into {cache_dir()}"
    )


def _files_read(folder: Path) -> list[Path]:
    names = (*TRAIN_BATCHES, TEST_BATCH) + ((META,) if (folder / META).is_file() else ())
    return [folder / n for n in names]


def resolve_source(
    data_dir: str | os.PathLike | None = None, *, download: bool = False
) -> DataSource:
    """The :class:`DataSource` (folder + SHA-256 of the batch files) a load would read."""
    folder = locate(data_dir, download=download)
    return hash_files(folder, _files_read(folder))


def load_cifar10(
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    image_size: int | None = None,
    limit: int | None = None,
) -> Dataset:
    """CIFAR-10 as ``uint8`` ``N×3×32×32`` (50k train, 10k test).

    Example:
        >>> ds = load_cifar10(data_dir="/data", limit=5000)   # doctest: +SKIP
        >>> ds.input_shape, ds.classes[:2]
        ((3, 32, 32), ('airplane', 'automobile'))
    """
    if image_size not in (None, 32):
        raise ValueError(f"Invalid image_size: {image_size!r} (CIFAR-10 is 32×32 only)")
    folder = locate(data_dir, download=download)
    source = hash_files(folder, _files_read(folder))
    parts = [_read_batch(folder / name) for name in TRAIN_BATCHES]
    train = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    test = _read_batch(folder / TEST_BATCH)
    classes: tuple[str, ...] = ()
    if (folder / META).is_file():
        meta = safe_unpickle(folder / META)
        names = meta.get(b"label_names") if isinstance(meta, dict) else None
        if isinstance(names, list) and len(names) == 10:
            classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return make_dataset(
        "cifar10", train, test, num_classes=10, source=source, limit=limit, classes=classes
    )
