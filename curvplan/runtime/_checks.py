"""Checks at the boundary of a step: what the user hands to `Optimizer` / `as_optax`, on shapes and dtypes.

They run when a step is traced (once per input signature, never per step) and before any of the user's code
is differentiated, so a data, signature or state mistake is an `InputError` that names the argument, what was
expected, what came, and the fix, instead of a traceback from deep inside the step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from curvplan.ir._errors import Error, InputError
from curvplan.lowering import LoweredPlan, PlanState
from curvplan.planner import Plan, compile_plan


def as_plan(plan: Any, mesh: Any = None, batch_axes: Any = None) -> Plan:
    """``plan`` as a `Plan`: a plan is kept, a module list (or an uncalled preset, refused) is compiled. Given a
    mesh, a plan that is not placed yet is recompiled from its modules, placed on it."""
    if isinstance(plan, Plan):
        if mesh is None or plan.placement is not None:
            return plan
        return compile_plan(plan.modules, optimize=plan.optimize, name=plan.name, given=plan.given,
                            max_period=plan.max_period, mesh=mesh, batch_axes=batch_axes)
    return compile_plan(plan, mesh=mesh, batch_axes=batch_axes)


def spec(tree: Any) -> Any:
    """Shapes and dtypes of a pytree's array leaves (tracers included), for `jax.eval_shape`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree)


def _key(path) -> str:
    return jax.tree_util.keystr(path) or "(the root)"


def check_state_type(state: Any, expected: type, where: str, fix: str) -> None:
    if not isinstance(state, expected):
        raise InputError(
            f"expected a {expected.__name__}, got a {type(state).__name__}",
            where=where, fix=fix)


def check_params(lowered: LoweredPlan, params: Any, where: str) -> None:
    """Parameters are arrays (or numbers), and floating point where the model is differentiated in them; name
    the leaves that are not."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    odd = [f"{_key(p)}: {type(x).__name__}" for p, x in leaves
           if not (hasattr(x, "dtype") and hasattr(x, "shape")) and not isinstance(x, (int, float, complex))]
    if odd:
        raise InputError(
            f"parameters must be arrays; {len(odd)} leaves are not: {', '.join(odd[:5])}", where=where,
            fix="pass only the arrays: equinox `params, static = eqx.partition(model, eqx.is_inexact_array)` and "
                "`eqx.combine(params, static)` inside the loss; flax nnx `nnx.split(model, nnx.Param)`")
    if lowered.model_need is None:
        return
    bad = [f"{_key(p)}: {jnp.result_type(x)}" for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
           if not jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if bad:
        raise InputError(
            f"parameters must be floating point to be differentiated; {len(bad)} leaves are not: {', '.join(bad[:5])}",
            where=where,
            fix="keep integer arrays (counters, indices) out of params, e.g. in the batch or a closure "
                "(flax nnx: `nnx.Optimizer(..., wrt=nnx.Param)`; equinox: `eqx.filter(model, eqx.is_inexact_array)`)")


def check_state_matches(lowered: LoweredPlan, params: Any, state: PlanState, where: str, batch: Any = None) -> None:
    """The state was built by this plan for parameters of these shapes (as `init` builds it, with or without an
    example batch: K-FAC lays its state out from the model's layers when init saw one)."""
    try:
        _match(jax.eval_shape(lowered.init, spec(params)), state, where)
    except InputError:
        if batch is None or not lowered.objective.given:
            raise
        _match(jax.eval_shape(lambda p, b: lowered.init(p, None, b), spec(params), spec(batch)), state, where)


def _match(expected: PlanState, state: PlanState, where: str) -> None:
    have, want = sorted(state.modules), sorted(expected.modules)
    if have != want:
        raise InputError(
            f"this state was built by another plan: it holds the modules {have}, this plan has {want}",
            where=where, fix="build the state with this optimizer's `init(params)` (or restore the matching "
                             "checkpoint)")
    got = jax.tree_util.tree_flatten_with_path(state)
    exp = jax.tree_util.tree_flatten_with_path(expected)
    if got[1] != exp[1]:
        raise InputError("the state's structure differs from what `init(params)` builds for these parameters",
                         where=where, fix="build the state with `init(params)` for the same parameter pytree")
    for (path, a), (_, b) in zip(got[0], exp[0]):
        if tuple(jnp.shape(a)) != tuple(b.shape):
            raise InputError(
                f"state leaf {_key(path)} has shape {tuple(jnp.shape(a))}, but these parameters need {tuple(b.shape)}",
                where=where, fix="the state was built for parameters of other shapes: call `init(params)` again")


def check_batch(lowered: LoweredPlan, params: Any, batch: Any, where: str) -> None:
    """A plan that evaluates the model gets a batch that fits it: ``(inputs, targets)`` with labels of the
    right kind for ``model_fn``, or a batch on which ``loss_fn`` returns a scalar."""
    needs = lowered.model_need
    if needs is None:
        return
    _, module, quantity = needs
    obj = lowered.objective
    no_batch = InputError(
        f"module `{module}` needs {quantity.name}, which is computed from the model on the batch, but the step "
        f"got no batch", where=where,
        fix="pass the batch: `tx.update(grads, state, params, batch=batch)` / `opt.step(params, state, batch)`")
    if batch is None and obj.model_fn is not None:
        raise no_batch
    if batch is None:  # a loss that needs no data is fine; one that fails without it was not given its batch
        try:
            out = jax.eval_shape(obj.loss_fn, spec(params), None)
        except Error:
            raise
        except Exception as e:
            raise no_batch from e
        _check_scalar(out)
        return
    if obj.model_fn is not None:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise InputError(f"with model_fn the batch is (inputs, targets), got a {type(batch).__name__}",
                             where=where, fix="pass `batch=(inputs, targets)`")
        x, y = batch
        out = _trace(obj.model_fn, params, x, what="model_fn(params, inputs)",
                     fix="model_fn takes (params, inputs), in that order, and returns the outputs")
        _check_targets(obj.loss_kind, out, y, where)
    else:
        _check_scalar(_trace(obj.loss_fn, params, batch, what="loss_fn(params, batch)",
                             fix="loss_fn takes (params, batch), in that order, and returns a scalar"))


def _check_scalar(out) -> None:
    if not hasattr(out, "shape") or tuple(out.shape) != ():
        raise InputError(
            f"loss_fn returned {_describe(out)}, not a scalar", where="loss_fn(params, batch)",
            fix="return the mean (or sum) over the batch, e.g. `jnp.mean(per_example_losses)`")


def _trace(fn, params, arg, *, what: str, fix: str):
    try:
        return jax.eval_shape(fn, spec(params), spec(arg))
    except Error:
        raise
    except Exception as e:  # the user's function fails on these arguments: say so before the step does
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise InputError(f"{what} failed on the given arguments: {type(e).__name__}: {first}",
                         where=what, fix=fix) from e


def _describe(out) -> str:
    return f"an array of shape {tuple(out.shape)}" if hasattr(out, "shape") else f"a {type(out).__name__}"


def _check_targets(kind: str, out, y, where: str) -> None:
    if not hasattr(out, "shape"):
        raise InputError(f"model_fn returned {_describe(out)}, not an array of outputs", where="model_fn",
                         fix="return one array of outputs (logits for loss='ce')")
    oshape, yshape, ydt = tuple(out.shape), tuple(jnp.shape(y)), jnp.result_type(y)
    if kind == "ce":
        if not jnp.issubdtype(ydt, jnp.integer):
            onehot = yshape == oshape
            raise InputError(
                f"loss='ce' takes integer class labels, got {'one-hot ' if onehot else ''}{ydt} targets of shape "
                f"{yshape} for outputs {oshape}", where=f"{where}, batch targets",
                fix="pass `labels.argmax(-1)`" if onehot else "pass integer labels, e.g. `targets.astype(jnp.int32)`")
        if int(np.prod(yshape)) != int(np.prod(oshape[:-1])):
            raise InputError(
                f"loss='ce' needs one label per output row: outputs {oshape} need {oshape[:-1]} labels, got {yshape}",
                where=f"{where}, batch targets", fix="give one integer label per example (and position)")
    elif int(np.prod(yshape)) != int(np.prod(oshape)):
        raise InputError(
            f"loss='mse' needs one target per output: outputs {oshape}, targets {yshape}",
            where=f"{where}, batch targets", fix=f"give targets of shape {oshape}")
