"""curvplan: plan, share and schedule the work of curvature- and geometry-aware optimizers in JAX.

>>> import curvplan as cp
>>> plan = cp.compile_plan(cp.presets.newton_cg(), name="newton")
>>> plan.phases[0].providers
('linearize_grad',)
"""

import importlib
from typing import TYPE_CHECKING

from curvplan.ir import (
    Cadence,
    Error,
    ModuleSpec,
    PlanDiff,
    Quantity,
    carried,
    diff_plans,
    fresh,
    quantities,
)
from curvplan.ir._errors import (
    AmbiguousProducerError,
    CadenceError,
    CheckpointError,
    ConfigError,
    CycleError,
    DuplicateNameError,
    InputError,
    LoweringError,
    MissingProducerError,
    PeriodError,
    PlanError,
    PlanVerifyError,
)
from curvplan.planner import Plan, compile_plan

__version__ = "0.1.0"

# The JAX half loads on first use, so that planning, printing and diffing never import JAX.
_LAZY = {
    "modules": ("curvplan.modules", None),
    "presets": ("curvplan.modules.presets", None),
    "lowering": ("curvplan.lowering", None),
    "runtime": ("curvplan.runtime", None),
    "Module": ("curvplan.modules", "Module"),
    "Objective": ("curvplan.lowering", "Objective"),
    "PlanState": ("curvplan.lowering", "PlanState"),
    "StepInfo": ("curvplan.lowering", "StepInfo"),
    "lower_plan": ("curvplan.lowering", "lower_plan"),
    "Optimizer": ("curvplan.runtime", "Optimizer"),
    "as_optax": ("curvplan.runtime", "as_optax"),
    "save": ("curvplan.runtime", "save"),
    "restore": ("curvplan.runtime", "restore"),
    "discover_layers": ("curvplan.runtime", "discover_layers"),
    "LayerReport": ("curvplan.runtime", "LayerReport"),
    "scao": ("curvplan.runtime", "scao"),
    "enable_compilation_cache": ("curvplan.runtime", "enable_compilation_cache"),
}

if TYPE_CHECKING:  # the lazy names, visible to type checkers and IDEs
    from curvplan import lowering, modules, runtime
    from curvplan.lowering import Objective, PlanState, StepInfo, lower_plan
    from curvplan.modules import Module, presets
    from curvplan.runtime import (
        LayerReport,
        Optimizer,
        as_optax,
        discover_layers,
        enable_compilation_cache,
        restore,
        save,
        scao,
    )

__all__ = [
    "Cadence", "Error", "ModuleSpec", "PlanDiff", "Quantity", "carried", "diff_plans", "fresh", "quantities",
    "Plan", "compile_plan", "AmbiguousProducerError", "CadenceError", "CheckpointError", "ConfigError",
    "CycleError", "DuplicateNameError", "InputError", "LoweringError", "MissingProducerError", "PeriodError",
    "PlanError", "PlanVerifyError",
    # lazy (JAX) names, the keys of _LAZY
    "modules", "presets", "lowering", "runtime", "Module", "Objective", "PlanState", "StepInfo", "lower_plan",
    "Optimizer", "as_optax", "save", "restore", "discover_layers", "LayerReport", "scao", "enable_compilation_cache",
]
assert set(_LAZY) <= set(__all__)


def __getattr__(name):
    if name in _LAZY:
        mod, attr = _LAZY[name]
        value = importlib.import_module(mod)
        value = getattr(value, attr) if attr else value
        globals()[name] = value
        return value
    raise AttributeError(f"module 'curvplan' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
