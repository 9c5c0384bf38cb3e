"""Dataset registry: ``load_dataset(name, ...)`` for every dataset the experiments use."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from . import cifar, fashion_mnist, tiny_imagenet
from .cifar import load_cifar10
from .dataset import Dataset, check_limit
from .digits import load_digits
from .fashion_mnist import load_fashion_mnist
from .source import DataSource
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
# datasets read from files: their source is found and hashed without decoding the data
_RESOLVERS: dict[str, Callable[..., DataSource]] = {
    "fashion-mnist": fashion_mnist.resolve_source,
    "cifar10": cifar.resolve_source,
    "tiny-imagenet": tiny_imagenet.resolve_source,
}


def _check_name(name: str) -> None:
    if name not in _LOADERS:
        raise ValueError(f"Invalid dataset: {name!r} (expected one of {', '.join(DATASETS)})")


def resolve_source(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = False,
    **options: Any,
) -> DataSource:
    """Where ``load_dataset(name, data_dir=...)`` would read from, and a hash of that content.

    Same lookup and errors as :func:`load_dataset` (an explicit ``data_dir`` lacking the files
    raises ``FileNotFoundError`` naming it; a bad ``~user`` path raises ``ValueError``). File
    datasets are hashed as stored, without decoding; generated/bundled ones (``synthetic``,
    ``digits``, which depend on ``options`` such as ``seed``) are built and their tensors hashed.
    Equals ``load_dataset(name, ...).source`` for any ``limit``.

    Example:
        >>> resolve_source("synthetic", seed=1).path
        'generated (seed=1)'
    """
    _check_name(name)
    if name in _RESOLVERS:
        return _RESOLVERS[name](data_dir, download=download)
    return _LOADERS[name](data_dir=data_dir, download=download, **options).source


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
        data_dir: the folder to read; when given, the only place looked in (missing files raise
            ``FileNotFoundError`` naming it). Without it: ``$SFWPRUNE_DATA``, system folders,
            the cache. The folder and a content hash end up in ``Dataset.source``.
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
    _check_name(name)
    check_limit(limit)
    return _LOADERS[name](
        data_dir=data_dir, download=download, image_size=image_size, limit=limit, **options
    )
