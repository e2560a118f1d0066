"""Damping policies: produce `%lambda`."""

from curvplan.modules.damping._constant import ConstantDamping

__all__ = ["ConstantDamping"]
