"""Convex sets for Frank-Wolfe training, one per parameter tensor."""

from .base import ConstraintSet
from .group_k_sparse import GroupKSparsePolytope, group_k_sparse_lmo
from .groups import (
    KINDS,
    STRUCTURED_KINDS,
    constraint_from_group,
    constraint_groups,
    expected_init_norms,
    k_from_fraction,
    make_constraint,
)
from .k_sparse import KSparsePolytope, k_sparse_lmo
from .k_support import KSupportNormBall, k_support_lmo, k_support_norm
from .lp_ball import LpBall, lp_ball_lmo
from .n_m import NMSparsePolytope, n_m_lmo
from .unconstrained import Unconstrained

__all__ = [
    "KINDS",
    "STRUCTURED_KINDS",
    "ConstraintSet",
    "GroupKSparsePolytope",
    "KSparsePolytope",
    "KSupportNormBall",
    "LpBall",
    "NMSparsePolytope",
    "Unconstrained",
    "constraint_from_group",
    "constraint_groups",
    "expected_init_norms",
    "group_k_sparse_lmo",
    "k_from_fraction",
    "k_sparse_lmo",
    "k_support_lmo",
    "k_support_norm",
    "lp_ball_lmo",
    "make_constraint",
    "n_m_lmo",
]
