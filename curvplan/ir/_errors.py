"""The error hierarchy. Every user-facing error says what, where and how to fix it."""

from __future__ import annotations


class Error(Exception):
    """Base class of every error curvplan raises on purpose.

    The message has three parts: what went wrong, where (module, quantity) and how to fix it.
    """

    def __init__(self, what: str, *, where: str = "", fix: str = ""):
        self.what, self.where, self.fix = what, where, fix
        parts = [what]
        if where:
            parts.append(f"  where: {where}")
        if fix:
            parts.append(f"  fix: {fix}")
        super().__init__("\n".join(parts))


class ConfigError(Error, ValueError):
    """A module was given an invalid configuration (the pydantic message is kept)."""


class PlanError(Error):
    """A composition cannot be planned."""


class MissingProducerError(PlanError):
    """A module consumes a quantity that nothing produces."""


class AmbiguousProducerError(PlanError):
    """Two modules produce the same quantity and no tag says which one to use."""


class CycleError(PlanError):
    """Fresh data dependencies form a cycle."""


class CadenceError(PlanError):
    """A fresh consumer runs on steps where its explicitly scheduled producer does not."""


class DuplicateNameError(PlanError):
    """Two different modules were given the same name."""


class PeriodError(PlanError):
    """The phase table would be too long (the cadences' period is absurd)."""


class PlanVerifyError(PlanError):
    """An internal invariant of a plan graph does not hold (a bug: please report it)."""


class LoweringError(Error):
    """A plan cannot be turned into JAX programs for the given model."""


class InputError(Error, ValueError):
    """What a step was given does not fit the model or the plan: the batch, the labels, the loss's output,
    the parameters' dtypes, or an optimizer state built for something else."""


class CheckpointError(Error):
    """A checkpoint cannot be restored into this optimizer."""
