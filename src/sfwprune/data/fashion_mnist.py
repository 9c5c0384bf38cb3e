"""Fashion-MNIST (Xiao et al. 2017): 60k/10k 28×28 grey images of 10 clothing classes.

Looked for only in the ``data_dir`` argument when given (missing files are an error there), else in
order: ``$SFWPRUNE_DATA``, Debian's package folder ``/usr/share/datasets/fashion-mnist``
(``apt-get install dataset-fashion-mnist``), the download cache; with ``download=True`` (and no
``data_dir``) torchvision's mirrors fill the cache. In each folder the four IDX
files may lie directly, under ``fashion-mnist/`` or under torchvision's ``FashionMNIST/raw/``,
gzipped or not.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .dataset import Dataset, make_dataset
from .idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx
from .paths import (
    DATA_DIR_LABEL,
    DATA_ENV,
    cache_dir,
    describe_search,
    explicit_dir_error,
    search_roots,
)
from .source import DataSource, hash_files

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_LAYOUTS = (".", "fashion-mnist", "FashionMNIST/raw")


def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def find_files(folder: Path) -> tuple[dict[str, Path] | None, str]:
    """The four IDX files under ``folder`` (any accepted layout), or ``None`` and why not."""
    if not folder.is_dir():
        return None, "no such folder"
    reasons = []
    everything = ", ".join(f"{stem}[.gz]" for stem in FILES.values())
    for layout in _LAYOUTS:
        sub = folder / layout
        found = {key: _find_file(sub, stem) for key, stem in FILES.items()}
        if all(found.values()):
            return found, "ok"  # type: ignore[return-value]
        present = [FILES[k] for k, p in found.items() if p is not None]
        if present:
            missing = [f"{FILES[k]}[.gz]" for k, p in found.items() if p is None]
            reasons.append(f"{sub} is incomplete, missing {', '.join(missing)}")
    return None, "; ".join(reasons) or f"no Fashion-MNIST IDX files, missing {everything}"


def _download(dest: Path) -> None:
    """Fetch the four ``.gz`` files (md5-checked) from torchvision's mirrors into ``dest``."""
    try:
        from torchvision.datasets import FashionMNIST
        from torchvision.datasets.utils import download_url
    except ImportError as exc:
        raise FileNotFoundError(
            "Fashion-MNIST download needs torchvision (pip install torchvision)"
        ) from exc
    dest.mkdir(parents=True, exist_ok=True)
    for filename, md5 in FashionMNIST.resources:
        errors = []
        for mirror in FashionMNIST.mirrors:
            try:
                download_url(f"{mirror}{filename}", str(dest), filename=filename, md5=md5)
                break
            except Exception as exc:  # network errors come in many types; try the next mirror
                errors.append(f"{mirror}: {exc}")
        else:
            raise FileNotFoundError(f"Could not download {filename}: {'; '.join(errors)}")


def _not_found(tried: list[tuple[str, Path, str]]) -> FileNotFoundError:
    return FileNotFoundError(
        "Fashion-MNIST not found. Looked in:\n" + describe_search(tried) + "\nRemedies (any one):\n"
        f"  1. pass --data-dir FOLDER (data_dir=...) or set {DATA_ENV}=FOLDER, a folder with "
        "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        "t10k-labels-idx1-ubyte.gz\n"
        "  2. install Debian's package: apt-get install dataset-fashion-mnist "
        f"(files land in {SYSTEM_DIR})\n"
        f"  3. allow a download (--download, download=True) into {cache_dir() / 'fashion-mnist'}"
    )


def locate(data_dir: str | os.PathLike | None = None, *, download: bool = False) -> dict[str, Path]:
    """Paths of the four IDX files, from the first place in the search order that has them all."""
    tried: list[tuple[str, Path, str]] = []
    for label, root in search_roots(data_dir, system=[SYSTEM_DIR]):
        if label == "download cache":
            root = root / "fashion-mnist"
        files, why = find_files(root)
        if files is not None:
            return files
        if label == DATA_DIR_LABEL:
            raise explicit_dir_error("Fashion-MNIST", root, why)
        tried.append((label, root, why))
    if download:
        dest = cache_dir() / "fashion-mnist"
        _download(dest)
        files, why = find_files(dest)
        if files is not None:
            return files
        tried.append(("download", dest, why))
    raise _not_found(tried)


def resolve_source(
    data_dir: str | os.PathLike | None = None, *, download: bool = False
) -> DataSource:
    """The :class:`DataSource` (folder + SHA-256 of the four files as stored) load would read."""
    files = locate(data_dir, download=download)
    return hash_files(files["train_images"].parent, files.values())


def _load_pair(images: Path, labels: Path) -> tuple[torch.Tensor, torch.Tensor]:
    x = read_idx(images, magic=IMAGES_MAGIC)
    y = read_idx(labels, magic=LABELS_MAGIC)
    if x.dtype != "uint8" or x.ndim != 3:
        raise ValueError(f"Invalid IDX file: {str(images)!r} (expected uint8 N×H×W images)")
    if y.dtype != "uint8" or y.shape != (x.shape[0],):
        raise ValueError(
            f"Invalid IDX file: {str(labels)!r} ({y.shape[0] if y.ndim else 0} labels for "
            f"{x.shape[0]} images in {images.name})"
        )
    if y.size and int(y.max()) >= len(CLASSES):
        raise ValueError(f"Invalid IDX file: {str(labels)!r} (label {int(y.max())} >= 10)")
    return torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y.astype("int64"))


def load_fashion_mnist(
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    image_size: int | None = None,
    limit: int | None = None,
) -> Dataset:
    """Fashion-MNIST as ``uint8`` ``N×1×28×28``; see the module docstring for the search order.

    Example:
        >>> ds = load_fashion_mnist(limit=1000)   # doctest: +SKIP
        >>> ds.train_x.shape, ds.test_x.shape
        (torch.Size([1000, 1, 28, 28]), torch.Size([200, 1, 28, 28]))
    """
    if image_size not in (None, 28):
        raise ValueError(f"Invalid image_size: {image_size!r} (Fashion-MNIST is 28×28 only)")
    files = locate(data_dir, download=download)
    train = _load_pair(files["train_images"], files["train_labels"])
    test = _load_pair(files["test_images"], files["test_labels"])
    if train[0].shape[2:] != test[0].shape[2:]:
        raise ValueError(
            f"Invalid IDX files: train images {tuple(train[0].shape[2:])} and test images "
            f"{tuple(test[0].shape[2:])} differ in size ({files['test_images']})"
        )
    return make_dataset(
        "fashion-mnist",
        train,
        test,
        num_classes=len(CLASSES),
        source=hash_files(files["train_images"].parent, files.values()),
        limit=limit,
        classes=CLASSES,
    )
