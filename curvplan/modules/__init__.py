"""The module library, grouped by role. Every module is a frozen pydantic model with ``init`` / ``apply``."""

from curvplan.modules._base import Context, LinearOperator, Module
from curvplan.modules.curvature import GGN, EmpiricalFisher, Hessian, SampledFisher, curv_op, model_lin
from curvplan.modules.damping import ConstantDamping, GainRatio, TrustRegionDamping
from curvplan.modules.estimators import (
    GNBDiag,
    HutchinsonDiag,
    HutchinsonProbes,
    HutchinsonTrace,
    Lanczos,
    ProbeDiag,
    lanczos_ritz_values,
)
from curvplan.modules.geometry import LMODirection, MuonDirection, SchattenCriterion, SchattenDirection, schatten_inv_p
from curvplan.modules.preconditioners import (
    DiagEMA,
    DiagonalDirection,
    GradGram,
    GramEigbasis,
    KFACDirection,
    KFACFactors,
    KFACInverse,
    ScaoAdam,
    ScaoBlend,
    ScaoPrecondition,
    ScaoSpectrum,
    Shampoo,
    Soap,
    SpatialAverage,
    kfac_eigbasis,
    kfac_inverses,
    kfac_factors,
    precond_diag,
    spatial_average,
)
from curvplan.modules.solvers import CG, DenseDirect, DiagonalSolve, IdentitySolve, RowSpace, conjugate_gradient
from curvplan.modules.transforms import Combine, UpdateTail

__all__ = [
    "Context", "LinearOperator", "Module",
    "Hessian", "GGN", "EmpiricalFisher", "SampledFisher", "curv_op", "model_lin",
    "ConstantDamping", "GainRatio", "TrustRegionDamping",
    "HutchinsonDiag", "HutchinsonProbes", "ProbeDiag", "HutchinsonTrace", "GNBDiag", "Lanczos", "lanczos_ritz_values",
    "DiagEMA", "DiagonalDirection", "SpatialAverage", "KFACFactors", "KFACInverse", "KFACDirection",
    "GradGram", "GramEigbasis", "Shampoo", "Soap", "ScaoSpectrum", "ScaoPrecondition", "ScaoBlend", "ScaoAdam",
    "precond_diag", "spatial_average", "kfac_factors", "kfac_eigbasis", "kfac_inverses",
    "CG", "DenseDirect", "RowSpace", "DiagonalSolve", "IdentitySolve", "conjugate_gradient",
    "LMODirection", "MuonDirection", "SchattenCriterion", "SchattenDirection", "schatten_inv_p",
    "Combine", "UpdateTail",
]
