"""Estimators: stochastic diagonals, traces and extreme eigenvalues of a curvature operator."""

from curvplan.modules.estimators._gnb import GNBDiag
from curvplan.modules.estimators._hutchinson import HutchinsonDiag, rademacher_like
from curvplan.modules.estimators._lanczos import Lanczos, lanczos_ritz_values
from curvplan.modules.estimators._probes import HutchinsonProbes, HutchinsonTrace, ProbeDiag

__all__ = ["HutchinsonDiag", "HutchinsonProbes", "ProbeDiag", "HutchinsonTrace", "GNBDiag", "Lanczos",
           "lanczos_ritz_values", "rademacher_like"]
