"""Preconditioners: diagonal EMAs, spatial averaging, and the Kronecker / eigenbasis family (K-FAC, and
Shampoo, SOAP, SCAO sharing one gradient Gram and one eigendecomposition)."""

from curvplan.modules.preconditioners._diag import DiagEMA as DiagEMA
from curvplan.modules.preconditioners._diag import DiagonalDirection as DiagonalDirection
from curvplan.modules.preconditioners._diag import precond_diag as precond_diag
from curvplan.modules.preconditioners._grad_gram import GradGram as GradGram
from curvplan.modules.preconditioners._grad_gram import GramEigbasis as GramEigbasis
from curvplan.modules.preconditioners._grad_gram import eigbasis_of as eigbasis_of
from curvplan.modules.preconditioners._grad_gram import grad_gram as grad_gram
from curvplan.modules.preconditioners._grad_gram import layout_report as layout_report
from curvplan.modules.preconditioners._kfac import KFACDirection as KFACDirection
from curvplan.modules.preconditioners._kfac import KFACFactors as KFACFactors
from curvplan.modules.preconditioners._kfac import KFACInverse as KFACInverse
from curvplan.modules.preconditioners._kfac import kfac_eigbasis as kfac_eigbasis
from curvplan.modules.preconditioners._kfac import kfac_factors as kfac_factors
from curvplan.modules.preconditioners._kfac import kfac_inverses as kfac_inverses
from curvplan.modules.preconditioners._scao import ScaoAdam as ScaoAdam
from curvplan.modules.preconditioners._scao import ScaoBlend as ScaoBlend
from curvplan.modules.preconditioners._scao import ScaoPrecondition as ScaoPrecondition
from curvplan.modules.preconditioners._scao import ScaoSpectrum as ScaoSpectrum
from curvplan.modules.preconditioners._scao import select_rank as select_rank
from curvplan.modules.preconditioners._scao import spectral_rank as spectral_rank
from curvplan.modules.preconditioners._shampoo import Shampoo as Shampoo
from curvplan.modules.preconditioners._shampoo import inverse_root as inverse_root
from curvplan.modules.preconditioners._soap import Soap as Soap
from curvplan.modules.preconditioners._spatial import SpatialAverage as SpatialAverage
from curvplan.modules.preconditioners._spatial import spatial_average as spatial_average
