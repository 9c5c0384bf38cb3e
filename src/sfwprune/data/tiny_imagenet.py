"""Tiny-ImageNet-200 from its standard folder layout, resized (32×32 by default, as the paper).

    tiny-imagenet-200/wnids.txt                      one class id per line (label = line index)
    tiny-imagenet-200/train/<wnid>/images/*.JPEG     500 images per class
    tiny-imagenet-200/val/images/*.JPEG              10,000 images, flat
    tiny-imagenet-200/val/val_annotations.txt        "<file>\\t<wnid>\\t<box>" per val image

The labelled val split is the test split. Both splits are ordered round-robin over classes
(class 0's first image, class 1's first, ...), so ``limit`` keeps a class-balanced prefix and
only that prefix is decoded. Full decodes are cached as a tensor file in the download cache,
keyed by a fingerprint of the file list (names, sizes, mtimes) and ``image_size``.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_torch_save, safe_torch_load
from .dataset import Dataset, check_limit, make_dataset, num_test_kept
from .paths import (
    DATA_DIR_LABEL,
    DATA_ENV,
    cache_dir,
    describe_search,
    explicit_dir_error,
    search_roots,
)
from .source import DataSource, hash_listing

FOLDER = "tiny-imagenet-200"
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def _find_folder(root: Path) -> tuple[Path | None, str]:
    if not root.is_dir():
        return None, "no such folder"
    for folder in (root / FOLDER, root):
        if (folder / "wnids.txt").is_file():
            return folder, "ok"
    return None, f"no {FOLDER}/wnids.txt"


def locate(data_dir: str | os.PathLike | None = None) -> Path:
    """The ``tiny-imagenet-200`` folder, first match in the search order."""
    tried = []
    for label, root in search_roots(data_dir):
        folder, why = _find_folder(root)
        if folder is not None:
            return folder
        if label == DATA_DIR_LABEL:
            raise explicit_dir_error("Tiny-ImageNet", root, why)
        tried.append((label, root, why))
    raise FileNotFoundError(
        "Tiny-ImageNet not found. Looked in:\n"
        + describe_search(tried)
        + f"\nRemedy: download and unzip {URL} (no automatic download), then pass --data-dir "
        f"FOLDER (data_dir=...) or set {DATA_ENV}=FOLDER, the folder containing {FOLDER}/"
    )


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ValueError(f"Invalid Tiny-ImageNet folder: {str(folder)!r} (missing)")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)


def _round_robin(per_class: list[list[Path]]) -> list[tuple[Path, int]]:
    longest = max((len(files) for files in per_class), default=0)
    return [
        (files[j], label)
        for j in range(longest)
        for label, files in enumerate(per_class)
        if j < len(files)
    ]


def list_samples(folder: Path) -> tuple[list[str], list[tuple[Path, int]], list[tuple[Path, int]]]:
    """``(wnids, train, val)``: class ids and ``(file, label)`` lists in round-robin order."""
    wnids = [w.strip() for w in (folder / "wnids.txt").read_text().splitlines() if w.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise ValueError(f"Invalid wnids.txt: {str(folder / 'wnids.txt')!r} (empty or repeated)")
    train = _round_robin([_images_in(folder / "train" / w / "images") for w in wnids])
    label_of = {w: i for i, w in enumerate(wnids)}
    annotations = folder / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise ValueError(f"Invalid Tiny-ImageNet folder: {str(annotations)!r} (missing)")
    per_class: list[list[Path]] = [[] for _ in wnids]
    for lineno, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in label_of:
            raise ValueError(
                f"Invalid val_annotations.txt: {str(annotations)!r} line {lineno}: {line!r} "
                "(expected '<file>\\t<wnid from wnids.txt>...')"
            )
        image = folder / "val" / "images" / fields[0]
        if not image.is_file():
            raise ValueError(f"Invalid Tiny-ImageNet folder: {str(image)!r} (annotated, missing)")
        per_class[label_of[fields[1]]].append(image)
    val = _round_robin([sorted(files) for files in per_class])
    if not train or not val:
        raise ValueError(f"Invalid Tiny-ImageNet folder: {str(folder)!r} (no train or val images)")
    return wnids, train, val


def _decode(samples: list[tuple[Path, int]], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image, UnidentifiedImageError

    x = np.empty((len(samples), size, size, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(samples):
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                if img.size != (size, size):
                    img = img.resize((size, size), Image.Resampling.BILINEAR)
                x[i] = np.asarray(img)
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"Invalid image: {str(path)!r} ({exc})") from None
    y = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), y


def _fingerprint(folder: Path, samples: list[tuple[Path, int]], size: int) -> str:
    digest = hashlib.sha256(f"{folder.resolve()}|{size}".encode())
    for path, label in samples:
        st = path.stat()
        digest.update(
            f"{path.relative_to(folder)}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode()
        )
    return digest.hexdigest()[:20]


def _source(folder: Path, train: list[tuple[Path, int]], val: list[tuple[Path, int]]) -> DataSource:
    texts = [folder / "wnids.txt", folder / "val" / "val_annotations.txt"]
    return hash_listing(folder, texts, [p for p, _ in train + val])


def resolve_source(data_dir: str | os.PathLike | None = None, **_: object) -> DataSource:
    """The :class:`DataSource` a load would read: the folder, and a hash of ``wnids.txt``,
    ``val_annotations.txt`` and every image's name and size."""
    folder = locate(data_dir)
    _, train, val = list_samples(folder)
    return _source(folder, train, val)


def load_tiny_imagenet(
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    image_size: int | None = None,
    limit: int | None = None,
    cache: bool = True,
) -> Dataset:
    """Tiny-ImageNet as ``uint8`` ``N×3×S×S``, ``S = image_size`` (default 32; 64 is native).

    Args:
        download: accepted for a uniform signature; there is no automatic download (the
            not-found error says where to get the archive).
        cache: reuse / write the decoded full dataset in the download cache (not used with
            ``limit``, which decodes only the kept prefix).

    Example:
        >>> ds = load_tiny_imagenet(data_dir="/data", image_size=64)   # doctest: +SKIP
        >>> ds.num_classes, ds.input_shape
        (200, (3, 64, 64))
    """
    size = 32 if image_size is None else image_size
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 512:
        raise ValueError(f"Invalid image_size: {image_size!r} (expected an int in 1..512)")
    limit = check_limit(limit)
    folder = locate(data_dir)
    wnids, train, val = list_samples(folder)
    source = _source(folder, train, val)
    if limit is not None:
        train, val = train[:limit], val[: num_test_kept(limit)]
        cache = False
    cached = None
    if cache:
        key = _fingerprint(folder, train + val, size)
        cached = cache_dir() / f"tiny-imagenet-{size}px-{key}.pt"
    if cached is not None and cached.is_file():
        blob = safe_torch_load(cached)
        train_xy, val_xy = (blob["train_x"], blob["train_y"]), (blob["test_x"], blob["test_y"])
        source = DataSource(source.path, source.sha256, source.files, f"decoded cache {cached}")
    else:
        train_xy, val_xy = _decode(train, size), _decode(val, size)
        if cached is not None:
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                blob = {"train_x": train_xy[0], "train_y": train_xy[1]}
                blob.update(test_x=val_xy[0], test_y=val_xy[1])
                atomic_torch_save(blob, cached)
            except OSError as exc:  # a read-only home must not stop training
                warnings.warn(f"Tiny-ImageNet decode cache not written ({exc})", stacklevel=2)
    return make_dataset(
        "tiny-imagenet",
        train_xy,
        val_xy,
        num_classes=len(wnids),
        source=source,
        limit=limit,
        classes=tuple(wnids),
    )
