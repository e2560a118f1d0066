"""Preconditioners: diagonal EMAs, spatial averaging, and the Kronecker / eigenbasis family (K-FAC, and
Shampoo, SOAP, SCAO sharing one gradient Gram and one eigendecomposition)."""

from curvplan.modules.preconditioners._diag import DiagEMA, DiagonalDirection, precond_diag
from curvplan.modules.preconditioners._grad_gram import GradGram, GramEigbasis, eigbasis_of, grad_gram, layout_report
from curvplan.modules.preconditioners._kfac import (
    KFACDirection,
    KFACFactors,
    KFACInverse,
    kfac_eigbasis,
    kfac_inverses,
    kfac_factors,
)
from curvplan.modules.preconditioners._scao import (
    ScaoAdam,
    ScaoBlend,
    ScaoPrecondition,
    ScaoSpectrum,
    select_rank,
    spectral_rank,
)
from curvplan.modules.preconditioners._shampoo import Shampoo, inverse_root
from curvplan.modules.preconditioners._soap import Soap
from curvplan.modules.preconditioners._spatial import SpatialAverage, spatial_average

__all__ = ["DiagEMA", "DiagonalDirection", "SpatialAverage", "KFACFactors", "KFACInverse", "KFACDirection",
           "GradGram", "GramEigbasis", "Shampoo", "Soap", "ScaoSpectrum", "ScaoPrecondition", "ScaoBlend",
           "ScaoAdam", "precond_diag", "spatial_average", "kfac_factors", "kfac_eigbasis", "kfac_inverses", "grad_gram", "eigbasis_of",
           "layout_report", "inverse_root", "select_rank", "spectral_rank"]
