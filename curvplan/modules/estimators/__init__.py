"""Estimators: stochastic diagonals, traces and extreme eigenvalues of a curvature operator."""

from curvplan.modules.estimators._gnb import GNBDiag as GNBDiag
from curvplan.modules.estimators._hutchinson import HutchinsonDiag as HutchinsonDiag
from curvplan.modules.estimators._hutchinson import rademacher_like as rademacher_like
from curvplan.modules.estimators._lanczos import Lanczos as Lanczos
from curvplan.modules.estimators._lanczos import lanczos_ritz_values as lanczos_ritz_values
from curvplan.modules.estimators._probes import HutchinsonProbes as HutchinsonProbes
from curvplan.modules.estimators._probes import HutchinsonTrace as HutchinsonTrace
from curvplan.modules.estimators._probes import ProbeDiag as ProbeDiag
