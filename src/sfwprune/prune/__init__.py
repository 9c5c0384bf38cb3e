"""One-shot pruning at any sparsity: masks, sweeps, BatchNorm recalibration, reports, export,
sparse CPU inference (docs/algorithm.md §4); layer-wise reconstruction and Wanda scores from a calibration
set (§8); channel and N:M pruning, physically smaller models, 2:4 export (§9)."""

from .bn import batchnorm_modules, recalibrate_bn
from .export import load_pruned, save_pruned
from .masks import (
    CRITERIA,
    INCLUDES,
    SCOPES,
    check_sparsity,
    needs_calibration,
    prunable_parameters,
    prune_,
)
from .reconstruct import reconstruct_
from .report import format_report, sparsity_report
from .semi_structured import SEMI_STRUCTURED_SHAPES, follows_n_m, semi_structured_state
from .shrink import resize_, shrink, shrink_spec
from .sparse import SparseLinear, to_sparse_inference
from .structured import channel_spaces, structured_masks
from .sweep import Ranking, gradual_prune_, sparsity_sweep

__all__ = [
    "CRITERIA",
    "INCLUDES",
    "SCOPES",
    "SEMI_STRUCTURED_SHAPES",
    "Ranking",
    "SparseLinear",
    "batchnorm_modules",
    "channel_spaces",
    "check_sparsity",
    "follows_n_m",
    "format_report",
    "gradual_prune_",
    "load_pruned",
    "needs_calibration",
    "prunable_parameters",
    "prune_",
    "recalibrate_bn",
    "reconstruct_",
    "resize_",
    "save_pruned",
    "semi_structured_state",
    "shrink",
    "shrink_spec",
    "sparsity_report",
    "sparsity_sweep",
    "structured_masks",
    "to_sparse_inference",
]
