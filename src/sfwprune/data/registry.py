"""Dataset registry: ``load_dataset(name, ...)`` for every dataset the experiments use."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from .cifar import load_cifar10
from .dataset import Dataset, check_limit
from .digits import load_digits
from .fashion_mnist import load_fashion_mnist
from .synthetic import load_synthetic
from .tiny_imagenet import load_tiny_imagenet

_LOADERS: dict[str, Callable[..., Dataset]] = {
    "fashion-mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "tiny-imagenet": load_tiny_imagenet,
    "digits": load_digits,
    "synthetic": load_synthetic,
}
DATASETS: tuple[str, ...] = tuple(_LOADERS)


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    image_size: int | None = None,
    limit: int | None = None,
    **options: Any,
) -> Dataset:
    """Load dataset ``name`` (one of :data:`DATASETS`) into memory.

    Args:
        name: ``fashion-mnist``, ``cifar10``, ``tiny-imagenet``, ``digits`` or ``synthetic``.
        data_dir: folder to look in first (then ``$SFWPRUNE_DATA``, system folders, the cache).
        download: allow a download into the cache when no local copy is found.
        image_size: side length for datasets that resize (tiny-imagenet: 32 default, or 64;
            synthetic); others accept only their native size.
        limit: keep the first ``limit`` train and ``max(1, limit // 5)`` test samples.
        options: dataset-specific keywords (e.g. synthetic's ``num_classes``, ``channels``,
            ``seed``; digits' ``seed``; tiny-imagenet's ``cache``).

    Example:
        >>> ds = load_dataset("synthetic", limit=100, num_classes=3)
        >>> ds.train_x.shape[0], ds.test_x.shape[0], ds.num_classes
        (100, 20, 3)
    """
    if name not in _LOADERS:
        raise ValueError(f"Invalid dataset: {name!r} (expected one of {', '.join(DATASETS)})")
    check_limit(limit)
    return _LOADERS[name](
        data_dir=data_dir, download=download, image_size=image_size, limit=limit, **options
    )
