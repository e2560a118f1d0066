"""Linear solvers: produce a direction s ≈ (C + λI)⁻¹ g (CG / PCG, dense direct, row space, diagonal)."""

from curvplan.modules.solvers._cg import CG, CG_RESULTS, Solution, conjugate_gradient
from curvplan.modules.solvers._direct import DenseDirect, DiagonalSolve, IdentitySolve
from curvplan.modules.solvers._row import RowSpace

__all__ = ["CG", "CG_RESULTS", "Solution", "DenseDirect", "RowSpace", "DiagonalSolve", "IdentitySolve", "conjugate_gradient"]
