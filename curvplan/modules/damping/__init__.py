"""Damping policies: produce `%lambda` (constant, or trust-region / Levenberg-Marquardt on the gain ratio)."""

from curvplan.modules.damping._constant import ConstantDamping as ConstantDamping
from curvplan.modules.damping._trust_region import GainRatio as GainRatio
from curvplan.modules.damping._trust_region import TrustRegionDamping as TrustRegionDamping
