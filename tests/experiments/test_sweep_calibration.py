"""The calibration inputs of a sweep / prune run: which options read them, and what they are."""

from __future__ import annotations

import pytest
import torch

from sfwprune.data import DeviceLoader
from sfwprune.experiments.config import TrainConfig
from sfwprune.experiments.runner import load_data
from sfwprune.experiments.sweep import calibration_batches, calibration_images
from sfwprune.prune import CRITERIA, needs_calibration

CPU = torch.device("cpu")


def test_needs_calibration_for_wanda_or_reconstruction_only() -> None:
    for criterion in CRITERIA:
        assert needs_calibration(criterion, reconstruct=True)
        assert needs_calibration(criterion, reconstruct=False) == (criterion == "wanda")


def _config(limit: int, batch_size: int, seed: int = 3) -> TrainConfig:
    # augment=True: calibration must switch the run's augmentation off
    return TrainConfig(dataset="synthetic", limit=limit, batch_size=batch_size, seed=seed,
                       augment=True)  # fmt: skip


@pytest.mark.parametrize(
    "limit, batch_size, count", [(256, 64, 100), (256, 64, 128), (200, 64, 1000)]
)
def test_calibration_images_are_count_unaugmented_training_images(limit, batch_size, count):
    cfg = _config(limit, batch_size)
    data = load_data(cfg)
    images = calibration_images(cfg, data, CPU, count)
    x = torch.cat(images)
    assert len(x) == min(count, limit) and all(len(c) <= batch_size for c in images)
    # each one is a training image as stored (normalized, not cropped or flipped) ...
    train = DeviceLoader.from_dataset(data, "train", batch_size=limit, shuffle=False)
    train = train.normalize(data.train_x)
    same = (x.reshape(len(x), 1, -1) == train.reshape(1, limit, -1)).all(dim=2)  # (count, limit)
    assert (same.sum(dim=1) == 1).all()
    assert len(set(same.int().argmax(dim=1).tolist())) == len(x)  # ... drawn without repeats
    # ... and the draw is the same for every run's seed
    other = calibration_images(_config(limit, batch_size, seed=4), data, CPU, count)
    assert torch.equal(torch.cat(other), x)


def test_calibration_batches_follow_the_run_seed_without_augmentation() -> None:
    data = load_data(_config(256, 64))
    batches = calibration_batches(_config(256, 64), data, CPU, 3)
    assert [len(x) for x, _ in batches] == [64, 64, 64]
    again = calibration_batches(_config(256, 64), data, CPU, 3)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(batches, again, strict=True))
    other = calibration_batches(_config(256, 64, seed=4), data, CPU, 3)
    assert not torch.equal(batches[0][0], other[0][0])
