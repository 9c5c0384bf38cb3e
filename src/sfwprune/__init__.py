"""sfwprune: train with Stochastic Frank-Wolfe, prune to any sparsity in one shot, no retraining."""

from .constraints import (
    ConstraintSet,
    KSparsePolytope,
    KSupportNormBall,
    LpBall,
    Unconstrained,
    constraint_groups,
    make_constraint,
)
from .init import SFWInitResult, sfw_init
from .optim import SFW
from .prune import (
    SparseLinear,
    format_report,
    load_pruned,
    prune_,
    recalibrate_bn,
    save_pruned,
    semi_structured_state,
    shrink,
    sparsity_report,
    sparsity_sweep,
    to_sparse_inference,
)

__version__ = "0.1.0"

__all__ = [
    "SFW",
    "SFWInitResult",
    "SparseLinear",
    "ConstraintSet",
    "KSparsePolytope",
    "KSupportNormBall",
    "LpBall",
    "Unconstrained",
    "__version__",
    "constraint_groups",
    "format_report",
    "load_pruned",
    "make_constraint",
    "prune_",
    "recalibrate_bn",
    "save_pruned",
    "semi_structured_state",
    "sfw_init",
    "shrink",
    "sparsity_report",
    "sparsity_sweep",
    "to_sparse_inference",
]
