"""The IR: quantities, cadences, module declarations, provider rules, schedules. Pure Python (no JAX)."""

from curvplan.ir import quantities
from curvplan.ir._cadence import EVERY_STEP, Cadence, describe_steps, horizon
from curvplan.ir._diff import PlanDiff, diff_plans
from curvplan.ir._errors import (
    AmbiguousProducerError,
    CadenceError,
    CheckpointError,
    ConfigError,
    CycleError,
    DuplicateNameError,
    Error,
    InputError,
    LoweringError,
    MissingProducerError,
    PeriodError,
    PlanError,
    PlanVerifyError,
)
from curvplan.ir._graph import phase_graph, verify_phase
from curvplan.ir._module import (
    MODULE_KINDS,
    Hyperparameter,
    ModuleSpec,
    Use,
    carried,
    fresh,
    module_from_dict,
    state_type,
)
from curvplan.ir._providers import PROVIDERS, ProviderRule, register_provider
from curvplan.ir._quantity import Quantity
from curvplan.ir._schedule import Op, Phase, Read

__all__ = [
    "quantities", "Cadence", "EVERY_STEP", "describe_steps", "horizon", "PlanDiff", "diff_plans", "Error",
    "ConfigError", "PlanError", "MissingProducerError", "AmbiguousProducerError", "CycleError",
    "CadenceError", "DuplicateNameError", "PeriodError", "PlanVerifyError", "LoweringError", "InputError",
    "CheckpointError", "phase_graph", "verify_phase", "MODULE_KINDS", "Hyperparameter", "ModuleSpec", "Use",
    "carried", "fresh", "module_from_dict", "state_type", "PROVIDERS", "ProviderRule", "register_provider", "Quantity",
    "Op", "Phase", "Read",
]
