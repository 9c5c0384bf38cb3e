"""One-shot pruning at any sparsity: masks, sweeps, BatchNorm recalibration, reports, export,
sparse CPU inference (REFERENCE §4); layer-wise reconstruction and Wanda scores from a calibration
set (§8)."""

from .bn import batchnorm_modules, recalibrate_bn
from .export import load_pruned, save_pruned
from .masks import CRITERIA, INCLUDES, SCOPES, check_sparsity, prunable_parameters, prune_
from .reconstruct import reconstruct_
from .report import format_report, sparsity_report
from .sparse import SparseLinear, to_sparse_inference
from .sweep import Ranking, sparsity_sweep

__all__ = [
    "CRITERIA",
    "INCLUDES",
    "SCOPES",
    "Ranking",
    "SparseLinear",
    "batchnorm_modules",
    "check_sparsity",
    "format_report",
    "load_pruned",
    "prunable_parameters",
    "prune_",
    "recalibrate_bn",
    "reconstruct_",
    "save_pruned",
    "sparsity_report",
    "sparsity_sweep",
    "to_sparse_inference",
]
