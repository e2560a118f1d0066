"""Damping policies: produce `%lambda` (constant, or trust-region / Levenberg-Marquardt on the gain ratio)."""

from curvplan.modules.damping._constant import ConstantDamping
from curvplan.modules.damping._trust_region import GainRatio, TrustRegionDamping

__all__ = ["ConstantDamping", "GainRatio", "TrustRegionDamping"]
