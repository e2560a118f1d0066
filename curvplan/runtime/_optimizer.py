"""`Optimizer`: what users hold. Host dispatch to one compiled program per phase, and a scanned driver."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax

from curvplan.ir._module import ModuleSpec
from curvplan.lowering import LoweredPlan, Objective, PlanState, StepInfo, lower_plan
from curvplan.planner import Plan
from curvplan.runtime._checks import as_plan, check_batch, check_params, check_state_matches, check_state_type


def _objective(loss_fn, model_fn, loss) -> Objective:
    return Objective(loss_fn=loss_fn, model_fn=model_fn, loss_kind=loss)


class Optimizer:
    """Runs a plan on a model.

    Args:
        plan: a `Plan`, or a module list (compiled with default options).
        loss_fn: ``loss_fn(params, batch) -> scalar`` (gradient and Hessian methods).
        model_fn, loss: ``model_fn(params, inputs) -> outputs`` with ``loss='mse'|'ce'`` and
            ``batch = (inputs, targets)`` (needed by Gauss-Newton methods).

    ``step`` picks the phase on the host and calls that phase's jitted program, so each phase compiles
    exactly once (``trace_counts`` records it). The step counter is read back from the device only when
    ``step`` is given a state it did not return itself, so consecutive steps dispatch without a host sync.
    ``run`` scans many steps in one program with ``lax.switch``.

    Examples:
        >>> import jax, jax.numpy as jnp, curvplan as cp
        >>> opt = cp.Optimizer(cp.presets.newton_cg(lam=0.0), loss_fn=lambda w, b: jnp.sum((w - b) ** 2))
        >>> w = jnp.zeros(3); state = opt.init(w)
        >>> w, state, info = opt.step(w, state, jnp.ones(3))
        >>> [float(x) for x in w], int(info.cg_iters)
        ([1.0, 1.0, 1.0], 1)
    """

    def __init__(
        self,
        plan: Plan | Sequence[ModuleSpec],
        loss_fn: Callable | None = None,
        *,
        model_fn: Callable | None = None,
        loss: str | None = None,
    ):
        self.plan = as_plan(plan)
        self.lowered: LoweredPlan = lower_plan(self.plan, _objective(loss_fn, model_fn, loss))
        self.trace_counts = [0] * len(self.plan.phases)
        self._jitted = [jax.jit(self._counted(i, f)) for i, f in enumerate(self.lowered.phase_fns)]
        self._scan = jax.jit(self._run_impl)
        self._last_step: tuple[Any, int] | None = None  # (step array we returned, its value): no host sync

    def _counted(self, i: int, f: Callable) -> Callable:
        def step(params, state, batch, rng):
            self.trace_counts[i] += 1
            self._check(params, state, batch, "Optimizer.step(params, state, batch)")
            updates, state, info = f(params, state, batch, rng, {})
            return optax.apply_updates(params, updates), state, info

        step.__name__ = f"curvplan_phase_{i}"
        return step

    def _check(self, params, state, batch, where: str) -> None:
        check_params(self.lowered, params, where)
        check_state_matches(self.lowered, params, state, where, batch)
        check_batch(self.lowered, params, batch, where)

    def init(self, params: Any, rng: jax.Array | None = None, batch: Any = None) -> PlanState:
        """The optimizer state for ``params``. An example ``batch`` lets modules with per-layer state (K-FAC) read
        the layers' layout off the model instead of assuming one (only shapes matter)."""
        check_params(self.lowered, params, "Optimizer.init(params)")
        return self.lowered.init(params, rng, batch)

    def step(self, params, state: PlanState, batch, rng: jax.Array | None = None) -> tuple[Any, PlanState, StepInfo]:
        """One step: returns ``(new_params, new_state, info)``."""
        check_state_type(state, PlanState, "Optimizer.step(params, state, batch)",
                         "pass the state from `opt.init(params)` (an `as_optax` state belongs to `tx.update`)")
        known = self._last_step
        t = known[1] if known is not None and state.step is known[0] else int(state.step)
        params, state, info = self._jitted[self.plan.phase_of(t)](params, state, batch, rng)
        self._last_step = (state.step, t + 1)
        return params, state, info

    def _run_impl(self, params, state, batches, rng):
        first = jax.tree.map(lambda b: jax.ShapeDtypeStruct(b.shape[1:], b.dtype), batches)
        self._check(params, state, first, "Optimizer.run(params, state, batches)")

        def body(carry, batch):
            params, state = carry
            updates, state, info = self.lowered.switch(params, state, batch, rng)
            return (optax.apply_updates(params, updates), state), info

        (params, state), infos = jax.lax.scan(body, (params, state), batches)
        return params, state, infos

    def run(self, params, state: PlanState, batches, rng: jax.Array | None = None):
        """Many steps in one compiled program: ``batches`` is stacked on a leading axis (one row per step).

        Returns ``(params, state, infos)`` with ``infos`` stacked over steps (``infos.loss[t]`` is step t's
        loss; ``infos.scalars()`` gives lists for a logger).
        """
        check_state_type(state, PlanState, "Optimizer.run(params, state, batches)",
                         "pass the state from `opt.init(params)`")
        return self._scan(params, state, batches, rng)

    def __repr__(self) -> str:
        return f"Optimizer({self.plan!r})"


def make_step_fn(opt: Optimizer) -> Callable:
    """A single jittable step using ``lax.switch`` (for users who jit their own training step)."""

    def step(params, state, batch, rng=None):
        updates, state, info = opt.lowered.switch(params, state, batch, rng)
        return optax.apply_updates(params, updates), state, info

    return step

