"""The execution side of the module contract.

A runnable module subclasses `Module` (declaration + JAX implementation):

- ``init(params, ctx) -> state``: runs once, outside the step. Return ``()`` for stateless modules.
- ``init_carried(q, params, ctx)``: the value a carried output holds before its first computation.
- ``apply(inputs, state, ctx) -> (outputs, state)``: runs on the steps its cadence selects. ``inputs`` maps
  each consumed `Quantity` (as declared) to its value; ``outputs`` maps each produced quantity to a value.
  Telemetry goes through ``ctx.report(key, value)`` for keys declared in ``info_fields``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from curvplan.ir._module import Module as _Declaration
from curvplan.ir._quantity import Quantity

Params = Any
PyTree = Any


@dataclasses.dataclass
class Context:
    """What a module sees when it runs.

    Attributes:
        step: the optimizer step (traced int32 scalar).
        rng: a PRNG key private to this module and step (``None`` if the caller gave no rng).
        params: the current parameters.
        batch: the current batch.
        objective: the user's model / loss description (`curvplan.Objective`).
        module: the module's name.
        layers: at ``init`` given a batch, a zero-argument function returning the model's `LayerReport`
            (layer discovery on that batch; computed on first call, shared by the plan's modules); else None.
    """

    step: jax.Array
    rng: jax.Array | None
    params: Params
    batch: Any
    objective: Any
    module: str
    info: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
    layers: Callable[[], Any] | None = None

    def report(self, key: str, value: Any) -> None:
        """Records a telemetry value (the key must be in the module's ``info_fields``)."""
        self.info[key] = value


class Module(_Declaration):
    """Base of runnable modules (a declaration plus ``init`` / ``apply``)."""

    def init(self, params: Params, ctx: Context) -> PyTree:
        """Initial state (runs once). Stateless modules keep the default ``()``."""
        del params, ctx
        return ()

    def init_carried(self, q: Quantity, params: Params, ctx: Context) -> PyTree:
        """Value of carried output ``q`` before the module first runs (default: zeros like params)."""
        del q, ctx
        return jax.tree.map(jnp.zeros_like, params)

    def apply(self, inputs: dict[Quantity, Any], state: PyTree, ctx: Context) -> tuple[dict[Quantity, Any], PyTree]:
        raise NotImplementedError(f"{type(self).__name__}.apply")


# -- small pytree helpers shared by modules -------------------------------------------------------------
def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
    """Sum of elementwise products over all leaves (real inner product)."""
    leaves = jax.tree.leaves(jax.tree.map(lambda x, y: jnp.vdot(x, y), a, b))
    return sum(leaves[1:], leaves[0]) if leaves else jnp.zeros(())


def tree_add_scaled(a: PyTree, alpha: Any, b: PyTree) -> PyTree:
    """a + alpha * b."""
    return jax.tree.map(lambda x, y: x + alpha * y, a, b)


def tree_norm(a: PyTree) -> jax.Array:
    return jnp.sqrt(tree_vdot(a, a))


def tree_all_finite(a: PyTree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(a)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


class LinearOperator:
    """A symmetric linear operator on parameter pytrees: ``op.mv(v)`` or ``op(v)``.

    Operators are trace-time values (closures over a linearization); they are never carried across steps.
    ``op.damped(lam)`` returns v -> (C + lam I) v.
    """

    def __init__(self, mv: Callable[[PyTree], PyTree], name: str = "op"):
        self._mv = mv
        self.name = name

    def mv(self, v: PyTree) -> PyTree:
        return self._mv(v)

    __call__ = mv

    def damped(self, lam: Any) -> "LinearOperator":
        return LinearOperator(lambda v: tree_add_scaled(self._mv(v), lam, v), f"({self.name} + lambda I)")

    def __repr__(self) -> str:
        return f"LinearOperator({self.name})"
