"""Data-test fixtures: an isolated environment per test, and writers of small dataset files in the
real on-disk formats (IDX, CIFAR-10 python pickles, a Tiny-ImageNet tree), given to tests as the
``files`` fixture."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """IDX file content: big-endian magic, one big-endian uint32 per dimension, raw uint8 data."""
    assert array.dtype == np.uint8 and (magic & 0xFF) == array.ndim
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_fashion(
    folder: Path, n_train: int = 12, n_test: int = 5, *, gz: bool = True, seed: int = 0
) -> dict[str, np.ndarray]:
    """The four Fashion-MNIST IDX files with random 28×28 images; returns the arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        data = idx_bytes(array, IMAGES_MAGIC if array.ndim == 3 else LABELS_MAGIC)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return arrays


def write_cifar(
    root: Path, per_batch: int = 3, n_test: int = 4, *, protocol: int = 2, seed: int = 0
) -> dict[str, dict]:
    """``root/cifar-10-batches-py`` with dicts shaped exactly like the real batches."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        batch = {
            b"batch_label": f"{name} of 5".encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=protocol)
        batches[name] = batch
    meta = {
        b"num_cases_per_batch": per_batch,
        b"label_names": [
            s.encode()
            for s in "airplane automobile bird cat deer dog frog horse ship truck".split()
        ],
        b"num_vis": 3072,
    }
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump(meta, fh, protocol=protocol)
    return batches


TINY_COLORS = [(220, 30, 30), (30, 200, 40), (40, 50, 210)]


def write_tiny_imagenet(root: Path, n_train: int = 4, n_val: int = 2) -> list[str]:
    """A 3-class ``tiny-imagenet-200`` tree of 64×64 JPEGs, each filled with its class colour.

    One training image of class 1 is greyscale (as some real ones are). Val images are listed
    in ``val_annotations.txt`` out of class order. Returns the wnids.
    """
    from PIL import Image

    wnids = ["n01443537", "n01629819", "n01641577"]
    top = root / "tiny-imagenet-200"
    (top / "val" / "images").mkdir(parents=True)
    (top / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for label, wnid in enumerate(wnids):
        images = top / "train" / wnid / "images"
        images.mkdir(parents=True)
        (top / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for j in range(n_train):
            img = Image.new("RGB", (64, 64), TINY_COLORS[label])
            if label == 1 and j == 0:
                img = img.convert("L")
            img.save(images / f"{wnid}_{j}.JPEG", quality=95)
    lines = []
    count = 0
    for _ in range(n_val):
        for label in reversed(range(len(wnids))):
            name = f"val_{count}.JPEG"
            Image.new("RGB", (64, 64), TINY_COLORS[label]).save(top / "val" / "images" / name)
            lines.append(f"{name}\t{wnids[label]}\t0\t0\t63\t63")
            count += 1
    (top / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return wnids


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory, monkeypatch):
    """No $SFWPRUNE_DATA from the caller; an empty cache folder; no real system folder."""
    monkeypatch.delenv("SFWPRUNE_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    import sfwprune.data.fashion_mnist as fm

    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path_factory.mktemp("nosystem") / "absent")


@pytest.fixture
def files() -> SimpleNamespace:
    """The writers above: ``files.write_fashion(folder)``, ``files.write_cifar(root)``, ..."""
    return SimpleNamespace(
        IMAGES_MAGIC=IMAGES_MAGIC,
        LABELS_MAGIC=LABELS_MAGIC,
        TINY_COLORS=TINY_COLORS,
        idx_bytes=idx_bytes,
        write_fashion=write_fashion,
        write_cifar=write_cifar,
        write_tiny_imagenet=write_tiny_imagenet,
    )
