"""Preconditioners: diagonal EMAs and the directions they define."""

from curvplan.modules.preconditioners._diag import DiagEMA, DiagonalDirection, precond_diag

__all__ = ["DiagEMA", "DiagonalDirection", "precond_diag"]
