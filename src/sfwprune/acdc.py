"""AC/DC: alternating compressed / decompressed training (Peste et al., NeurIPS 2021).

A schedule over epochs: a dense warm-up, then sparse and dense phases of equal length that
alternate, then a final dense phase. At the start of each sparse phase the weights are pruned to
``sparsity`` by global magnitude and the mask stays fixed for the phase (gradients and weights are
masked, as in fine-tuning); dense phases train every weight again, starting from the sparse ones.
The last sparse phase and the final dense phase give the co-trained sparse/dense pair.

Example (20 epochs, 2 warm-up, phases of 2, target 98%)::

    epochs 0-1 dense | 2-3 sparse | 4-5 dense | ... | 14-15 sparse | 16-19 dense
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .prune.masks import check_sparsity, prune_


@dataclass(frozen=True)
class ACDCSchedule:
    """Which epochs are sparse; ``masks_for(model, epoch)`` prunes when a sparse phase starts.

    Args:
        epochs: total training epochs.
        sparsity: target sparsity of the sparse phases (default 0.9).
        warmup: dense epochs first (default: 10% of ``epochs``, at least 1).
        phase: length of each sparse and dense phase in epochs (default: 10% of ``epochs``,
            at least 1).
        final_dense: dense epochs at the end (default: ``2 * phase``).
    """

    epochs: int
    sparsity: float = 0.9
    warmup: int | None = None
    phase: int | None = None
    final_dense: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"Invalid epochs: {self.epochs!r} (expected an integer >= 1)")
        check_sparsity(self.sparsity)
        for name in ("warmup", "phase", "final_dense"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise ValueError(f"Invalid {name}: {value!r} (expected an integer >= 0 or None)")
        if self.phase == 0:
            raise ValueError("Invalid phase: 0 (expected an integer >= 1 or None)")

    @property
    def _tenth(self) -> int:
        return max(1, round(self.epochs / 10))

    def is_sparse(self, epoch: int) -> bool:
        """True when ``epoch`` (0-based) trains with a fixed sparse mask."""
        warmup = self._tenth if self.warmup is None else self.warmup
        phase = self._tenth if self.phase is None else self.phase
        final = 2 * phase if self.final_dense is None else self.final_dense
        if epoch < warmup or epoch >= self.epochs - final:
            return False
        return (epoch - warmup) // phase % 2 == 0

    def starts_sparse_phase(self, epoch: int) -> bool:
        return self.is_sparse(epoch) and (epoch == 0 or not self.is_sparse(epoch - 1))

    def masks_for(
        self, model: nn.Module, epoch: int, current: dict[str, torch.Tensor] | None
    ) -> dict[str, torch.Tensor] | None:
        """The keep masks to train ``epoch`` with: new ones (pruning ``model`` in place) when a
        sparse phase starts, ``current`` inside a sparse phase, ``None`` in dense epochs."""
        if not self.is_sparse(epoch):
            return None
        if current is None or self.starts_sparse_phase(epoch):
            return prune_(model, self.sparsity)
        return current
