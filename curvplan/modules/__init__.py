"""The module library, grouped by role. Every module is a frozen pydantic model with ``init`` / ``apply``."""

from curvplan.modules._base import Context, LinearOperator, Module
from curvplan.modules.curvature import GGN, Hessian, curv_op
from curvplan.modules.damping import ConstantDamping, GainRatio, TrustRegionDamping
from curvplan.modules.estimators import HutchinsonDiag
from curvplan.modules.preconditioners import DiagEMA, DiagonalDirection, precond_diag
from curvplan.modules.solvers import CG, conjugate_gradient
from curvplan.modules.transforms import UpdateTail

__all__ = [
    "Context", "LinearOperator", "Module", "GGN", "Hessian", "curv_op", "ConstantDamping", "GainRatio", "TrustRegionDamping", "HutchinsonDiag",
    "DiagEMA", "DiagonalDirection", "precond_diag", "CG", "conjugate_gradient", "UpdateTail",
]
