"""Linear solvers: produce a direction s ≈ (C + λI)⁻¹ g."""

from curvplan.modules.solvers._cg import CG, conjugate_gradient

__all__ = ["CG", "conjugate_gradient"]
