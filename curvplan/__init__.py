"""curvplan: plan, share and schedule the work of curvature- and geometry-aware optimizers in JAX."""

from curvplan.ir import (
    Cadence,
    Error,
    Module,
    PlanDiff,
    Quantity,
    carried,
    diff_plans,
    fresh,
    quantities,
)
from curvplan.ir._errors import *  # noqa: F401,F403  (every error class at the top level)
from curvplan.planner import Plan, compile_plan

__version__ = "0.1.0"

# The JAX half (lowering, runtime, modules). `curvplan.ir` / `curvplan.planner` never import it.
from curvplan import modules  # noqa: E402
from curvplan.lowering import Objective, PlanState, StepInfo, lower_plan  # noqa: E402
from curvplan.modules import presets  # noqa: E402
from curvplan.runtime import Optimizer, as_optax, restore, save  # noqa: E402
