"""Estimators: stochastic diagonals / traces of a curvature operator."""

from curvplan.modules.estimators._hutchinson import HutchinsonDiag, rademacher_like

__all__ = ["HutchinsonDiag", "rademacher_like"]
