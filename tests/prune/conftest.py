"""Small models shared by the pruning tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn


def make_lenet300(seed: int = 0) -> nn.Sequential:
    """LeNet-300-100 for 1x28x28 inputs, seeded initialization."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )


def make_convbn(seed: int = 0) -> nn.Sequential:
    """A tiny conv net with BatchNorm for 3x8x8 inputs."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


@pytest.fixture
def lenet300() -> nn.Sequential:
    return make_lenet300()


@pytest.fixture
def convbn() -> nn.Sequential:
    return make_convbn()


@pytest.fixture(name="make_lenet300")
def _make_lenet300_fixture():
    return make_lenet300


@pytest.fixture(name="make_convbn")
def _make_convbn_fixture():
    return make_convbn
