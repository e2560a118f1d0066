"""Lowering: plans to JAX programs (one per phase), the unplanned baseline, provider implementations."""

from curvplan.lowering._lower import (
    BASE_INFO,
    LoweredPlan,
    PlanState,
    StepInfo,
    lower_plan,
    state_dtype,
)
from curvplan.lowering._objective import Objective, ce_loss, mse_loss, register_provider_impl

__all__ = [
    "lower_plan", "LoweredPlan", "PlanState", "StepInfo", "BASE_INFO", "state_dtype", "Objective",
    "ce_loss", "mse_loss", "register_provider_impl",
]
