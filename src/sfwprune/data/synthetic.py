"""Deterministic, learnable synthetic images for fast tests: class templates plus noise.

    x_i = T[y_i] + noise · ε_i,   T ~ N(0, 1)^{K×C×H×W},  ε_i ~ N(0, 1)

with templates, labels and noise drawn from one seeded ``torch.Generator``. Labels are balanced
(``i mod K``, shuffled). Train and test share the templates and draw independent noise.
"""

from __future__ import annotations

import os

import torch

from .dataset import Dataset, make_dataset


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r} (expected a positive int)")
    return value


def load_synthetic(
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    image_size: int | None = None,
    limit: int | None = None,
    num_train: int = 1024,
    num_test: int = 256,
    channels: int = 1,
    num_classes: int = 10,
    noise: float = 1.0,
    seed: int = 0,
) -> Dataset:
    """Synthetic ``float32`` ``N×C×S×S`` images, ``S = image_size`` (default 8).

    ``data_dir``/``download`` are unused. ``limit`` keeps the first ``limit`` train samples as
    for every dataset (generation is seeded, so the kept prefix does not depend on ``limit``).

    Example:
        >>> ds = load_synthetic(image_size=16, channels=3, num_classes=4)
        >>> ds.train_x.shape, ds.num_classes
        (torch.Size([1024, 3, 16, 16]), 4)
    """
    size = _positive_int("image_size", 8 if image_size is None else image_size)
    num_train = _positive_int("num_train", num_train)
    num_test = _positive_int("num_test", num_test)
    channels = _positive_int("channels", channels)
    num_classes = _positive_int("num_classes", num_classes)
    if not noise >= 0.0:
        raise ValueError(f"Invalid noise: {noise!r} (expected >= 0)")
    gen = torch.Generator().manual_seed(int(seed))
    shape = (channels, size, size)
    templates = torch.randn((num_classes, *shape), generator=gen)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
        x = templates[y] + noise * torch.randn((n, *shape), generator=gen)
        return x.to(torch.float32), y.to(torch.int64)

    train = split(num_train)
    test = split(num_test)
    return make_dataset(
        "synthetic",
        train,
        test,
        num_classes=num_classes,
        source=f"generated (seed={seed})",
        limit=limit,
    )
