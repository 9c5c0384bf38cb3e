"""SFW-Init: a learned per-tensor scale for the initialization of SFW training."""

from .batches import half_overlapping_pairs
from .sfw_init import SFWInitResult, sfw_init
from .virtual_step import first_step_objective, step_size, virtual_sfw_step

__all__ = [
    "SFWInitResult",
    "first_step_objective",
    "half_overlapping_pairs",
    "sfw_init",
    "step_size",
    "virtual_sfw_step",
]
