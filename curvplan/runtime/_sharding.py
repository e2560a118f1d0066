"""Shardings of the optimizer state and of batches on a mesh, from the plan's placement.

The state rule (`Plan.placement`): an entry shaped like a sharded parameter takes that parameter's sharding
(moments, accumulators, carried directions: FSDP / ZeRO-3 style, sharded exactly as the weights are); any other
entry of at least one axis (Kronecker factors, eigenbases, roots, per-block moments, and the moments of
replicated parameters: ZeRO-1 style) is split over the plan's block axes on its first dimension they divide;
scalars, and entries no such dimension fits, are replicated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from curvplan.ir._errors import InputError
from curvplan.planner import Placement


def _param_specs(params: Any, mesh: Any) -> dict[tuple[int, ...], PartitionSpec]:
    """Shape -> the sharding spec of the first sharded parameter of that shape on ``mesh``."""
    out: dict[tuple[int, ...], PartitionSpec] = {}
    for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(param_shardings(params, mesh))):
        if any(s.spec):
            out.setdefault(tuple(np.shape(p)), s.spec)
    return out


def state_shardings(state_shapes: Any, params: Any, mesh: Any, placement: Placement) -> Any:
    """A `NamedSharding` for every leaf of ``state_shapes`` (arrays or ``ShapeDtypeStruct``), by the rule above."""
    by_shape = _param_specs(params, mesh)
    axes = placement.block_axes
    k = placement.shares(axes)
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(x):
        shape = tuple(np.shape(x))
        if not shape:
            return replicated
        if shape in by_shape:
            return NamedSharding(mesh, by_shape[shape])
        for d, n in enumerate(shape):
            if k > 1 and n % k == 0:
                return NamedSharding(mesh, PartitionSpec(*([None] * d), axes))
        return replicated

    return jax.tree.map(one, state_shapes)


def param_shardings(params: Any, mesh: Any) -> Any:
    """Each parameter's `NamedSharding` on ``mesh`` (replicated where it has none there): what a step's new
    parameters are pinned to, so they never take another sharding from the state they were updated with."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(p):
        s = getattr(p, "sharding", None)
        return s if isinstance(s, NamedSharding) and dict(s.mesh.shape) == dict(mesh.shape) else replicated

    return jax.tree.map(one, params)


def batch_sharding(mesh: Any, placement: Placement, stacked: bool = False) -> NamedSharding:
    """The batch's sharding: its leading axis (the second for the stacked batches of ``run``) split over the
    plan's batch axes."""
    spec = (None, placement.batch_axes) if stacked else (placement.batch_axes,)
    return NamedSharding(mesh, PartitionSpec(*spec))


def shard_batch(batch: Any, mesh: Any, placement: Placement, stacked: bool = False) -> Any:
    """Each leaf of a host batch (numpy or jax arrays, the same global batch on every process) as a global array
    split over the batch axes; works in one process and across several (`jax.distributed`)."""
    sharding = batch_sharding(mesh, placement, stacked)
    split = placement.shares(placement.batch_axes)

    def one(x):
        x = np.asarray(x)
        rows = x.shape[1 if stacked else 0] if x.ndim > int(stacked) else None
        if rows is None or rows % split:
            raise InputError(f"a batch leaf of shape {x.shape} cannot be split {split} ways over the batch axes "
                             f"{placement.batch_axes}", where="shard_batch(batch)",
                             fix=f"make its {'second' if stacked else 'leading'} (batch) axis a multiple of {split}")
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(one, batch)


def init_placed(lowered: Any, params: Any, rng: Any, batch: Any, mesh: Any) -> tuple[Any, Any]:
    """``(shardings, state)``: the state of ``lowered.init`` computed straight onto its shardings (one compiled
    program with those output shardings, so it also works across processes)."""

    def init(p, b):
        return lowered.init(p, rng, b)

    shapes = jax.eval_shape(init, params, batch)
    shardings = state_shardings(shapes, params, mesh, lowered.plan.placement)
    return shardings, jax.jit(init, out_shardings=shardings)(params, batch)


def explicit(mesh: Any) -> bool:
    return mesh is not None and all(t == AxisType.Explicit for t in mesh.axis_types)


def on_mesh(mesh: Any):
    """The context a step runs in: ``jax.set_mesh(mesh)`` for an explicit-axes mesh, else nothing."""
    return jax.set_mesh(mesh) if explicit(mesh) else contextlib.nullcontext()


def in_auto_mode(body: Callable, mesh: Any, params: Any, state_shardings: Any) -> Callable:
    """``body(params, state, ...) -> (params, state, info)`` run with the mesh's axes in Auto mode.

    On an explicit-axes mesh (``jax.make_mesh``'s default) every array's sharding is part of its type and
    each op must agree on it; the optimizer's internals instead let GSPMD propagate shardings, and the
    results come back with the parameters' shardings (read from their types), the state's placed shardings
    and replicated telemetry. On an auto mesh ``body`` is returned as is.
    """
    if not explicit(mesh):
        return body
    replicated = NamedSharding(mesh, PartitionSpec())

    def of(p):
        s = jax.typeof(p).sharding
        return s if s.mesh.axis_names else replicated

    out = (jax.tree.map(of, params), state_shardings, replicated)
    return jax.sharding.auto_axes(body, axes=tuple(mesh.axis_names), out_sharding=out)
