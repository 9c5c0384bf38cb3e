"""scikit-learn's bundled 8×8 handwritten digits (1,797 images, 10 classes), for fast runs.

Pixels (0..16 in the source) are stored as ``uint8`` ``round(v·255/16)``; the train/test split is
a fixed seeded permutation (last ``test_fraction`` of it is the test set).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .dataset import Dataset, make_dataset


def load_digits(
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    image_size: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
) -> Dataset:
    """Digits as ``uint8`` ``N×1×8×8``; ``data_dir``/``download`` are unused (bundled data).

    Args:
        seed: seed of the train/test permutation.
        test_fraction: share of samples in the test split, in (0, 1).

    Example:
        >>> ds = load_digits()   # doctest: +SKIP
        >>> ds.train_x.shape, ds.test_x.shape
        (torch.Size([1438, 1, 8, 8]), torch.Size([359, 1, 8, 8]))
    """
    if image_size not in (None, 8):
        raise ValueError(f"Invalid image_size: {image_size!r} (digits are 8×8 only)")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"Invalid test_fraction: {test_fraction!r} (expected 0 < value < 1)")
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise ImportError(
            "The 'digits' dataset needs scikit-learn: pip install scikit-learn "
            "(or pip install 'sfwprune[dev]')"
        ) from exc
    bunch = sk_load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    x = torch.from_numpy(images).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    n_test = int(round(test_fraction * len(y)))
    train_idx, test_idx = order[: len(y) - n_test], order[len(y) - n_test :]
    return make_dataset(
        "digits",
        (x[train_idx], y[train_idx]),
        (x[test_idx], y[test_idx]),
        num_classes=10,
        source="sklearn.datasets.load_digits",
        limit=limit,
        classes=tuple(str(i) for i in range(10)),
    )
