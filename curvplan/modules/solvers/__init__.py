"""Linear solvers: produce a direction s ≈ (C + λI)⁻¹ g (CG / PCG, dense direct, row space, diagonal)."""

from curvplan.modules.solvers._cg import CG as CG
from curvplan.modules.solvers._cg import CG_RESULTS as CG_RESULTS
from curvplan.modules.solvers._cg import Solution as Solution
from curvplan.modules.solvers._cg import conjugate_gradient as conjugate_gradient
from curvplan.modules.solvers._direct import DenseDirect as DenseDirect
from curvplan.modules.solvers._direct import DiagonalSolve as DiagonalSolve
from curvplan.modules.solvers._direct import IdentitySolve as IdentitySolve
from curvplan.modules.solvers._row import RowSpace as RowSpace
