"""The in-memory dataset every loader returns: tensors, shapes and per-channel statistics.

Images are ``uint8`` ``N×C×H×W`` (pixel ``x`` means ``x/255``) or, for synthetic data, ``float32``.
``mean``/``std`` are per channel over the training images in those units, so a model sees

    x_norm = (x/255 - mean_c) / std_c      (uint8)        x_norm = (x - mean_c) / std_c   (float)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .source import DataSource, hash_tensors

Tensor = torch.Tensor


@dataclass(frozen=True, eq=False)  # tensors have no single truth value for ==
class Dataset:
    """Train and test split held in memory, with what a loader and a model need to know.

    Attributes:
        name: registry name, e.g. ``"fashion-mnist"``.
        train_x, test_x: ``N×C×H×W`` images, ``uint8`` (0..255) or floating.
        train_y, test_y: ``int64`` labels in ``[0, num_classes)``.
        num_classes: number of classes.
        input_shape: ``(C, H, W)``.
        mean, std: per-channel statistics of ``train_x`` (in ``x/255`` units for ``uint8``).
        source: where the data came from and a content hash (:class:`DataSource`; its
            ``path`` is a folder, a package, or ``"generated (seed=...)"``).
        classes: class names when the files carry them, else ``()``.

    Example:
        >>> ds = load_dataset("synthetic", limit=50)   # doctest: +SKIP
        >>> ds.train_x.shape, ds.input_shape
        (torch.Size([50, 1, 8, 8]), (1, 8, 8))
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: DataSource
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.dim() != 4 or tuple(x.shape[1:]) != tuple(self.input_shape):
                raise ValueError(
                    f"Invalid {split}_x shape: {tuple(x.shape)!r} "
                    f"(expected N×{'×'.join(map(str, self.input_shape))})"
                )
            if x.dtype != torch.uint8 and not x.dtype.is_floating_point:
                raise ValueError(f"Invalid {split}_x dtype: {x.dtype!r} (expected uint8 or float)")
            if y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise ValueError(
                    f"Invalid {split}_y: dtype {y.dtype}, shape {tuple(y.shape)!r} "
                    f"(expected int64 of shape ({x.shape[0]},))"
                )
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(
                    f"Invalid {split}_y range: [{int(y.min())}, {int(y.max())}] "
                    f"(expected labels in [0, {self.num_classes}))"
                )
        if not isinstance(self.source, DataSource):
            raise ValueError(f"Invalid source: {self.source!r} (expected a DataSource)")
        channels = self.input_shape[0]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(
                f"Invalid mean/std: {self.mean!r}/{self.std!r} (expected {channels} values each)"
            )

    def describe(self) -> dict[str, Any]:
        """Plain-value summary for results files (no tensors)."""
        return {
            "name": self.name,
            "source": self.source.path,
            "source_sha256": self.source.sha256,
            "num_train": int(self.train_x.shape[0]),
            "num_test": int(self.test_x.shape[0]),
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "dtype": str(self.train_x.dtype).removeprefix("torch."),
            "mean": list(self.mean),
            "std": list(self.std),
        }


def check_limit(limit: int | None) -> int | None:
    """``None`` or a positive int; anything else raises ``ValueError``."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"Invalid limit: {limit!r} (expected a positive int or None)")
    return limit


def num_test_kept(limit: int) -> int:
    """Test samples kept for ``limit`` train samples: ``max(1, limit // 5)``."""
    return max(1, limit // 5)


def channel_stats(
    x: Tensor, chunk: int | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of ``N×C×H×W`` images, in ``x/255`` units for uint8.

    Accumulated in float64 over chunks of ``chunk`` images (default: about 4M values, 32 MB),
    so memory stays small even for Tiny-ImageNet at 64×64.
    """
    if x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"Invalid images: shape {tuple(x.shape)!r} (expected non-empty N×C×H×W)")
    scale = 255.0 if x.dtype == torch.uint8 else 1.0
    if chunk is None:
        chunk = max(1, (1 << 22) // max(1, x[0].numel()))
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for start in range(0, x.shape[0], chunk):
        part = x[start : start + chunk].to(torch.float64) / scale
        total += part.sum(dim=(0, 2, 3))
        total_sq += part.square().sum(dim=(0, 2, 3))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    var = (total_sq / count - mean.square()).clamp_min(0.0)
    # A constant channel would divide by zero when normalizing; use std 1 there.
    std = torch.where(var > 1e-12, var.sqrt(), torch.ones_like(var))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def make_dataset(
    name: str,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    *,
    num_classes: int,
    source: DataSource | str,
    limit: int | None = None,
    classes: tuple[str, ...] = (),
) -> Dataset:
    """Build a :class:`Dataset`: keep the first ``limit`` train and ``max(1, limit // 5)`` test
    samples, then compute ``mean``/``std`` on the kept training images.

    ``source`` is the :class:`DataSource` of the files read, or for generated / bundled data a
    description, then hashed from the full (not yet limited) tensors."""
    limit = check_limit(limit)
    (train_x, train_y), (test_x, test_y) = train, test
    if not isinstance(source, DataSource):
        source = hash_tensors(str(source), (train_x, train_y, test_x, test_y))
    if limit is not None:
        train_x, train_y = train_x[:limit], train_y[:limit]
        n_test = num_test_kept(limit)
        test_x, test_y = test_x[:n_test], test_y[:n_test]
    mean, std = channel_stats(train_x)
    return Dataset(
        name=name,
        train_x=train_x.contiguous(),
        train_y=train_y.to(torch.int64).contiguous(),
        test_x=test_x.contiguous(),
        test_y=test_y.to(torch.int64).contiguous(),
        num_classes=int(num_classes),
        input_shape=tuple(int(s) for s in train_x.shape[1:]),  # type: ignore[arg-type]
        mean=mean,
        std=std,
        source=source,
        classes=tuple(classes),
    )
