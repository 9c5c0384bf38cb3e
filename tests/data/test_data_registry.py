"""Registry, Dataset checks, channel statistics, digits and synthetic data."""

from __future__ import annotations

import sys

import pytest
import torch

from sfwprune.data import DATASETS, Dataset, channel_stats, load_dataset, make_dataset


def test_registry_names_and_unknown():
    assert DATASETS == ("fashion-mnist", "cifar10", "tiny-imagenet", "digits", "synthetic")
    with pytest.raises(ValueError, match="Invalid dataset: 'mnist'.*fashion-mnist.*synthetic"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="Invalid limit: -3"):
        load_dataset("synthetic", limit=-3)
    with pytest.raises(TypeError):
        load_dataset("synthetic", no_such_option=1)


def test_channel_stats_matches_direct_computation():
    x = torch.randint(0, 256, (37, 3, 5, 4), dtype=torch.uint8)
    mean, std = channel_stats(x, chunk=8)
    ref = x.double().div(255).transpose(0, 1).reshape(3, -1)
    assert mean == pytest.approx(ref.mean(1).tolist(), rel=1e-10)
    assert std == pytest.approx(ref.std(1, unbiased=False).tolist(), rel=1e-10)
    const = torch.full((4, 1, 2, 2), 3.0)
    assert channel_stats(const) == ((3.0,), (1.0,))  # a constant channel divides by 1


def test_dataset_validates_shapes_and_labels():
    x = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 1])
    ds = make_dataset("t", (x, y), (x, y), num_classes=3, source="here")
    assert ds.describe()["num_train"] == 4 and ds.describe()["dtype"] == "uint8"
    fields = dict(ds.__dict__)
    with pytest.raises(ValueError, match=r"Invalid train_y range: \[0, 2\]"):
        Dataset(**{**fields, "num_classes": 2})
    with pytest.raises(ValueError, match="Invalid test_x shape"):
        Dataset(**{**fields, "test_x": torch.zeros(4, 1, 3, 2, dtype=torch.uint8)})
    with pytest.raises(ValueError, match="Invalid train_y"):
        Dataset(**{**fields, "train_y": y.to(torch.int32)})
    with pytest.raises(ValueError, match="Invalid mean/std"):
        Dataset(**{**fields, "mean": (0.1, 0.2)})


def test_digits_split_and_pixels():
    pytest.importorskip("sklearn")
    ds = load_dataset("digits")
    assert ds.input_shape == (1, 8, 8) and ds.train_x.dtype == torch.uint8
    assert ds.train_x.shape[0] + ds.test_x.shape[0] == 1797 and ds.test_x.shape[0] == 359
    assert int(ds.train_x.max()) == 255 and set(ds.train_y.unique().tolist()) == set(range(10))
    again = load_dataset("digits")
    assert torch.equal(ds.test_x, again.test_x) and torch.equal(ds.test_y, again.test_y)
    other = load_dataset("digits", seed=1)
    assert not torch.equal(ds.test_y, other.test_y)
    with pytest.raises(ValueError, match="Invalid test_fraction: 1.5"):
        load_dataset("digits", test_fraction=1.5)


def test_digits_without_sklearn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        load_dataset("digits")


def test_synthetic_is_seeded_and_configurable():
    a = load_dataset("synthetic", image_size=6, channels=3, num_classes=4, num_train=40, seed=3)
    b = load_dataset("synthetic", image_size=6, channels=3, num_classes=4, num_train=40, seed=3)
    c = load_dataset("synthetic", image_size=6, channels=3, num_classes=4, num_train=40, seed=4)
    assert a.train_x.shape == (40, 3, 6, 6) and a.train_x.dtype == torch.float32
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)
    assert torch.equal(torch.bincount(a.train_y), torch.full((4,), 10))  # balanced
    limited = load_dataset("synthetic", limit=30, num_classes=4, num_train=40, seed=3,
                           image_size=6, channels=3)  # fmt: skip
    assert torch.equal(limited.train_x, a.train_x[:30]) and limited.test_x.shape[0] == 6
    with pytest.raises(ValueError, match="Invalid num_classes: 0"):
        load_dataset("synthetic", num_classes=0)


def test_synthetic_is_learnable():
    ds = load_dataset("synthetic", num_train=400, num_test=200, noise=1.0)
    # nearest class mean of the training set classifies the test set well
    centroids = torch.stack([ds.train_x[ds.train_y == k].mean(0) for k in range(10)])
    dist = torch.cdist(ds.test_x.flatten(1), centroids.flatten(1))
    accuracy = (dist.argmin(1) == ds.test_y).float().mean().item()
    assert accuracy > 0.9
    noisy = load_dataset("synthetic", num_train=400, num_test=200, noise=30.0)
    centroids = torch.stack([noisy.train_x[noisy.train_y == k].mean(0) for k in range(10)])
    dist = torch.cdist(noisy.test_x.flatten(1), centroids.flatten(1))
    assert (dist.argmin(1) == noisy.test_y).float().mean().item() < 0.5  # noise controls it
