"""The planner: `compile_plan` and `Plan`. Pure Python (no JAX)."""

from curvplan.planner._compile import MAX_PERIOD, compile_plan
from curvplan.planner._placement import Placement
from curvplan.planner._plan import Plan

__all__ = ["compile_plan", "Plan", "Placement", "MAX_PERIOD"]
