"""What users hold: `Optimizer`, `as_optax`, checkpoints."""

from curvplan.lowering._layers import Layer, LayerReport, capture, discover_layers
from curvplan.runtime._cache import enable_compilation_cache
from curvplan.runtime._checkpoint import restore, save
from curvplan.runtime._dropin import scao
from curvplan.runtime._optax import OptaxPlanState, as_optax
from curvplan.runtime._optimizer import Optimizer, make_step_fn

__all__ = ["Optimizer", "as_optax", "OptaxPlanState", "save", "restore", "make_step_fn",
           "discover_layers", "capture", "Layer", "LayerReport", "scao", "enable_compilation_cache"]
