"""Datasets (Fashion-MNIST, CIFAR-10, Tiny-ImageNet, digits, synthetic) and a device-side loader.

Example:
    >>> from sfwprune.data import DeviceLoader, load_dataset
    >>> ds = load_dataset("synthetic", limit=64)
    >>> loader = DeviceLoader.from_dataset(ds, "train", batch_size=16, shuffle=True, generator=0)
    >>> [tuple(x.shape) for x, _ in loader][0]
    (16, 1, 8, 8)
"""

from .augment import crop_flip, crop_flip_reference, draw_crop_flip
from .cifar import RestrictedUnpickler, load_cifar10, safe_unpickle
from .dataset import Dataset, channel_stats, make_dataset
from .digits import load_digits
from .fashion_mnist import load_fashion_mnist
from .idx import read_idx
from .loader import DeviceLoader
from .paths import DATA_ENV, cache_dir
from .registry import DATASETS, load_dataset, resolve_source
from .source import DataSource, check_source
from .synthetic import load_synthetic
from .tiny_imagenet import load_tiny_imagenet

__all__ = [
    "DATASETS",
    "DATA_ENV",
    "DataSource",
    "Dataset",
    "DeviceLoader",
    "RestrictedUnpickler",
    "cache_dir",
    "channel_stats",
    "check_source",
    "crop_flip",
    "crop_flip_reference",
    "draw_crop_flip",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_synthetic",
    "load_tiny_imagenet",
    "make_dataset",
    "read_idx",
    "resolve_source",
    "safe_unpickle",
]
