"""What users hold: `Optimizer`, `as_optax`, checkpoints."""

from curvplan.runtime._checkpoint import restore, save
from curvplan.runtime._optax import OptaxPlanState, as_optax
from curvplan.runtime._optimizer import Optimizer, make_step_fn

__all__ = ["Optimizer", "as_optax", "OptaxPlanState", "save", "restore", "make_step_fn"]
