"""`as_optax`: a plan as an ``optax.GradientTransformationExtraArgs``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import optax

from curvplan.ir import quantities as q
from curvplan.ir._errors import LoweringError
from curvplan.ir._module import ModuleSpec
from curvplan.lowering import Objective, PlanState, StepInfo, lower_plan
from curvplan.modules._blocks import constrain
from curvplan.planner import Plan, compile_plan
from curvplan.runtime._checks import check_batch, check_params, check_state_matches, check_state_type
from curvplan.runtime._sharding import in_auto_mode, init_placed, param_shardings


class OptaxPlanState(NamedTuple):
    """State of `as_optax`: the plan state plus the last step's telemetry."""

    plan_state: PlanState
    info: StepInfo


def _check_reads_given_grad(plan: Plan) -> None:
    """The gradient handed to ``update`` must reach the plan: a plan whose solver builds its own right-hand side
    from the batch (the row-space Gauss-Newton of ``egn``) would silently drop the caller's clipping, accumulation
    or a non-finite gradient, so it is refused here."""
    reads = [(op.name, r.node) for ph in plan.phases for op in ph.ops if op.role == "module" for r in op.reads]
    if any(node == q.grad() for _, node in reads):
        return
    provided = {x for ph in plan.phases for op in ph.ops if op.role == "provider" for x in op.outputs}
    who = sorted({name for name, node in reads if node in provided}) or [m.label for m in plan.modules]
    raise LoweringError(
        f"no module of this plan reads the gradient given to update(): {', '.join(f'`{w}`' for w in who)} "
        "works from the model on the batch instead, so a gradient transformed before it would be ignored",
        where=f"cp.as_optax(plan {plan.name!r}), quantity %grad",
        fix="run this method with `cp.Optimizer(plan, ...)`, or choose one whose solver reads %grad "
            "(e.g. `cp.presets.gauss_newton_cg`)",
    )


def as_optax(
    plan: Plan | Sequence[ModuleSpec],
    loss_fn: Callable | None = None,
    *,
    model_fn: Callable | None = None,
    loss: str | None = None,
    example_batch: Any = None,
    mesh: Any = None,
    batch_axes: str | Sequence[str] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Wraps a plan as an optax transformation.

    The incoming ``updates`` are the user's gradient and are reused as ``%grad``: the plan is recompiled with
    ``given=[grad]``, so a phase that needs only the gradient evaluates no extra forward/backward pass.
    Extra arguments are keyword-only: ``batch=`` (required when a phase needs more than the gradient) and
    ``rng=``; unknown extras are ignored. The phase is chosen with ``lax.switch`` on the in-state step, so the
    update works inside a user's own ``jax.jit``. ``state.info`` holds the last step's `StepInfo`.
    ``example_batch`` (shapes are what matter) is traced at ``init`` by modules that lay out per-layer state,
    so K-FAC reads each layer's weight layout off the model (see `Optimizer.init`).

    With ``mesh=`` (and ``batch_axes=``, default ``"data"``) the plan is placed on the mesh as for
    `Optimizer`: ``init`` returns the state on the plan's shardings (parameter-shaped entries as their
    parameter), ``update`` keeps it there, block work is split over the devices, and a ``batch`` split over
    the batch axes (``jax.device_put`` with a ``NamedSharding``) gives means over the global batch.

    Examples:
        >>> import jax, jax.numpy as jnp, optax, curvplan as cp
        >>> f = lambda w, b: jnp.sum((w - b) ** 2)
        >>> newton = cp.as_optax(cp.presets.newton_cg(lam=0.0, radius=None), f)  # the exact step: no radius
        >>> tx = optax.chain(optax.clip_by_global_norm(10.0), newton)
        >>> w = jnp.zeros(2); state = tx.init(w)
        >>> g = jax.grad(f)(w, jnp.ones(2))
        >>> updates, state = tx.update(g, state, w, batch=jnp.ones(2))
        >>> [float(x) for x in optax.apply_updates(w, updates)]
        [1.0, 1.0]
    """
    base = plan if isinstance(plan, Plan) else None
    planned = compile_plan(
        base.modules if base else plan,
        optimize=base.optimize if base else True,
        name=base.name if base else "plan",
        given=[q.grad()],
        max_period=base.max_period if base else 100_000,
        mesh=mesh,
        batch_axes=batch_axes,
    )
    _check_reads_given_grad(planned)
    lowered = lower_plan(planned, Objective(loss_fn=loss_fn, model_fn=model_fn, loss_kind=loss), mesh)
    shardings: list[Any] = [None, None]  # the state's and the parameters' shardings, set by init on a mesh

    def init_fn(params):
        check_params(lowered, params, "init(params)")
        if mesh is None:
            return OptaxPlanState(lowered.init(params, batch=example_batch), lowered.empty_info())
        shardings[0], state = init_placed(lowered, params, None, example_batch, mesh)
        shardings[1] = param_shardings(params, mesh)
        return OptaxPlanState(state, lowered.empty_info())

    def update_fn(updates, state: OptaxPlanState, params=None, *, batch=None, rng=None, **extra):
        del extra
        where = "update(updates, state, params, batch=...)"
        check_state_type(state, OptaxPlanState, where, "pass the state from this transformation's `init(params)` "
                         "(an `Optimizer` state belongs to `opt.step`)")
        if params is None:
            raise LoweringError(
                "curvplan's optax transformation needs the parameters",
                where="update(updates, state, params)",
                fix="call `tx.update(grads, state, params, batch=batch)`",
            )
        check_params(lowered, params, where)
        check_state_matches(lowered, params, state.plan_state, where,
                            batch if example_batch is None else example_batch)
        check_batch(lowered, params, batch, where)
        if mesh is None or shardings[0] is None:
            new_updates, plan_state, info = lowered.switch(params, state.plan_state, batch, rng,
                                                           {q.grad(): updates})
            return new_updates, OptaxPlanState(plan_state, info)

        def body(params, plan_state, updates, batch, rng):
            new_updates, plan_state, info = lowered.switch(params, plan_state, batch, rng, {q.grad(): updates})
            return constrain(new_updates, shardings[1]), constrain(plan_state, shardings[0]), info

        new_updates, plan_state, info = in_auto_mode(body, mesh, params, shardings[0])(
            params, state.plan_state, updates, batch, rng)
        return new_updates, OptaxPlanState(plan_state, info)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
