"""One intra-op thread for these tiny models: the second-order steps are many small kernels, and
on a shared machine two threads per process oversubscribe the cores (about 20x slower here)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
