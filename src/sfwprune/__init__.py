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
from .optim import SFW

__version__ = "0.1.0"

__all__ = [
    "SFW",
    "ConstraintSet",
    "KSparsePolytope",
    "KSupportNormBall",
    "LpBall",
    "Unconstrained",
    "__version__",
    "constraint_groups",
    "make_constraint",
]
