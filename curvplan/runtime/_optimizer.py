"""`Optimizer`: what users hold. Host dispatch to one compiled program per phase, and a scanned driver."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax

from curvplan.ir._errors import LoweringError
from curvplan.ir._module import ModuleSpec
from curvplan.lowering import LoweredPlan, Objective, PlanState, StepInfo, lower_plan
from curvplan.modules._blocks import constrain
from curvplan.planner import Plan
from curvplan.runtime._checks import as_plan, check_batch, check_params, check_state_matches, check_state_type
from curvplan.runtime._sharding import in_auto_mode, init_placed, on_mesh, param_shardings, shard_batch


def _objective(loss_fn, model_fn, loss) -> Objective:
    return Objective(loss_fn=loss_fn, model_fn=model_fn, loss_kind=loss)


class Optimizer:
    """Runs a plan on a model.

    Args:
        plan: a `Plan`, or a module list (compiled with default options).
        loss_fn: ``loss_fn(params, batch) -> scalar`` (gradient and Hessian methods).
        model_fn, loss: ``model_fn(params, inputs) -> outputs`` with ``loss='mse'|'ce'`` and
            ``batch = (inputs, targets)`` (needed by Gauss-Newton methods).
        mesh: a ``jax.sharding.Mesh`` to run on several devices (docs/scale-out.md). The plan is placed on it
            (`compile_plan(..., mesh=mesh)`): batches split over ``batch_axes`` (``opt.shard_batch``) give
            exact means over the global batch, the state follows the parameters' shardings, and refresh work
            is spread over the devices.
        batch_axes: the mesh axes the batch is split over (default ``"data"``, else the mesh's first axis).

    ``step`` picks the phase on the host and calls the jitted program that runs it (`Plan.programs`: phases
    with the same provider pass share one), so each program compiles exactly once (``trace_counts`` records
    it). The step counter is read back from the device only when
    ``step`` is given a state it did not return itself, so consecutive steps dispatch without a host sync.
    ``run`` scans many steps in one program with ``lax.switch``.

    Examples:
        >>> import jax, jax.numpy as jnp, curvplan as cp
        >>> opt = cp.Optimizer(cp.presets.newton_cg(lam=0.0, radius=None),
        ...                    loss_fn=lambda w, b: jnp.sum((w - b) ** 2))
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
        mesh: Any = None,
        batch_axes: str | Sequence[str] | None = None,
    ):
        self.plan = as_plan(plan, mesh, batch_axes)
        self.mesh = mesh
        self.lowered: LoweredPlan = lower_plan(self.plan, _objective(loss_fn, model_fn, loss), mesh)
        self._state_shardings: Any = None  # set by init on a mesh; each step keeps the state on them
        self._param_shardings: Any = None  # and the parameters on theirs
        self.trace_counts = [0] * len(self.plan.programs)
        self._jitted = [jax.jit(self._counted(i, f)) for i, f in enumerate(self.lowered.program_fns)]
        self._phase_jitted: dict[int, Callable] = {}  # specialised per-phase programs, for `compiled`
        self._scan = jax.jit(self._run_impl)
        self._last_step: tuple[Any, int] | None = None  # (step array we returned, its value): no host sync

    def _counted(self, i: int | None, f: Callable) -> Callable:
        def step(params, state, batch, rng):
            if i is not None:
                self.trace_counts[i] += 1
            self._check(params, state, batch, "Optimizer.step(params, state, batch)")

            def body(params, state, batch, rng):
                updates, state, info = f(params, state, batch, rng, {})
                return self._pinned(optax.apply_updates(params, updates)), self._placed(state), info

            return in_auto_mode(body, self.mesh, params, self._state_shardings)(params, state, batch, rng)

        step.__name__ = f"curvplan_{f.__name__}"
        return step

    def _check(self, params, state, batch, where: str) -> None:
        check_params(self.lowered, params, where)
        check_state_matches(self.lowered, params, state, where, batch)
        check_batch(self.lowered, params, batch, where)

    def _placed(self, state):
        return state if self._state_shardings is None else constrain(state, self._state_shardings)

    def _pinned(self, params):
        return params if self._param_shardings is None else constrain(params, self._param_shardings)

    def init(self, params: Any, rng: jax.Array | None = None, batch: Any = None) -> PlanState:
        """The optimizer state for ``params``. An example ``batch`` lets modules with per-layer state (K-FAC) read
        the layers' layout off the model instead of assuming one (only shapes matter). On a mesh every entry
        is placed by the plan's state rule (`state_shardings`): parameter-shaped entries as their parameter."""
        check_params(self.lowered, params, "Optimizer.init(params)")
        if self.mesh is None:
            return self.lowered.init(params, rng, batch)
        self._state_shardings, state = init_placed(self.lowered, params, rng, batch, self.mesh)
        self._param_shardings = param_shardings(params, self.mesh)
        return state

    def shard_batch(self, batch: Any, stacked: bool = False) -> Any:
        """``batch`` (the same global batch on every process) split over the plan's batch axes; ``stacked=True``
        for the per-step stack that `run` takes."""
        if self.mesh is None:
            raise LoweringError("this optimizer has no mesh", where="Optimizer.shard_batch(batch)",
                                fix="build it with `cp.Optimizer(modules, ..., mesh=mesh)`")
        return shard_batch(batch, self.mesh, self.plan.placement, stacked)

    def step(self, params, state: PlanState, batch, rng: jax.Array | None = None) -> tuple[Any, PlanState, StepInfo]:
        """One step: returns ``(new_params, new_state, info)``."""
        check_state_type(state, PlanState, "Optimizer.step(params, state, batch)",
                         "pass the state from `opt.init(params)` (an `as_optax` state belongs to `tx.update`)")
        known = self._last_step
        t = known[1] if known is not None and state.step is known[0] else int(state.step)
        with on_mesh(self.mesh):
            params, state, info = self._jitted[self.plan.program_of(self.plan.phase_of(t))](params, state, batch, rng)
        self._last_step = (state.step, t + 1)
        return params, state, info

    def compiled(self, phase: int, params, state: PlanState, batch, rng: jax.Array | None = None) -> Any:
        """The specialised program of ``phase`` alone for these arguments (a ``jax.stages.Compiled``): its
        ``cost_analysis()``, ``memory_analysis()`` and ``as_text()`` (on a mesh, the per-device program). A
        merged program (`Plan.programs`) is `program(i, ...)`."""
        with on_mesh(self.mesh):
            return self._phase_jit(phase).lower(params, state, batch, rng).compile()

    def _phase_jit(self, phase: int) -> Callable:
        """The jitted specialised program of one phase (not what `step` runs when phases are merged)."""
        if phase not in self._phase_jitted:
            self._phase_jitted[phase] = jax.jit(self._counted(None, self.lowered.phase_fns[phase]))
        return self._phase_jitted[phase]

    def program(self, index: int, params, state: PlanState, batch, rng: jax.Array | None = None) -> Any:
        """The compiled program ``index`` of `Plan.programs` (what `step` runs), as `compiled` gives it."""
        with on_mesh(self.mesh):
            return self._jitted[index].lower(params, state, batch, rng).compile()

    def _run_impl(self, params, state, batches, rng):
        first = jax.tree.map(lambda b: jax.ShapeDtypeStruct(b.shape[1:], b.dtype), batches)
        self._check(params, state, first, "Optimizer.run(params, state, batches)")

        def body(carry, batch):
            params, state = carry
            updates, state, info = self.lowered.switch(params, state, batch, rng)
            return (self._pinned(optax.apply_updates(params, updates)), self._placed(state)), info

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

