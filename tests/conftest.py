"""Suite-wide settings: one torch thread (tiny models; the CI machine has 2 shared cores).

Per test as well, so a test that changes the thread count (e.g. a CLI run with ``--threads``)
does not leak it: many small kernels with two threads per process oversubscribe the cores
(the second-order SFW-Init steps ran about 20x slower that way)."""

from collections.abc import Iterator

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
