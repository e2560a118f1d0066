"""The execution side of the module contract.

A runnable module subclasses `Module` (a `curvplan.ir.ModuleSpec` plus its JAX implementation):

- ``init(params, ctx) -> State``: runs once, outside the step. ``State`` is a NamedTuple defined right above
  the module; its fields are the plan's ``state:`` entries and the checkpoint's layout. Stateless modules do
  not override it (they keep ``()``).
- ``init_carried(name, params, ctx)``: the value carried output ``name`` holds before it is first computed.
- ``apply(inputs, state, ctx) -> (outputs, state[, info])``: runs on the steps its cadence selects.
  ``inputs`` holds each consumed value under the module's own name (``inputs.grad``); ``outputs`` maps each
  produced name to its value; ``info`` (optional) maps telemetry keys from ``info_fields`` to scalars.

>>> from typing import Literal, NamedTuple
>>> import jax, jax.numpy as jnp
>>> from curvplan.ir import fresh, quantities as q
>>> class ScaleState(NamedTuple):
...     count: jax.Array
>>> class Scale(Module):
...     kind: Literal["scale_demo"] = "scale_demo"
...     factor: float = 0.5
...     info_fields = (("scale_calls", "int"),)
...     def consumes(self): return {"grad": fresh(q.grad())}
...     def produces(self): return {"direction": q.direction("scaled")}
...     def init(self, params, ctx) -> ScaleState: return ScaleState(jnp.zeros((), jnp.int32))
...     def apply(self, inputs, state, ctx):
...         d = jax.tree.map(lambda g: self.factor * g, inputs.grad)
...         return {"direction": d}, ScaleState(state.count + 1), {"scale_calls": state.count + 1}
>>> Scale().state_names()
('count',)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp

from curvplan.ir._errors import LoweringError
from curvplan.ir._module import ModuleSpec
from curvplan.ir._quantity import Quantity

Params = Any
PyTree = Any


@dataclasses.dataclass
class Context:
    """What a module sees when it runs, besides its inputs.

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
    layers: Callable[[], Any] | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  # TRANSITIONAL: old-style modules

    def report(self, key: str, value: Any) -> None:  # TRANSITIONAL: old-style modules
        self.info[key] = value


class Inputs(Mapping):
    """A module's inputs under its own names: ``inputs.grad`` or ``inputs["grad"]``.

    >>> Inputs({"grad": 1.0}, "demo").grad
    1.0
    """

    def __init__(self, values: Mapping[str, Any], module: str):
        self._values = dict(values)
        self._module = module

    def __getitem__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise LoweringError(
                f"module `{self._module}` read input {name!r}, which it does not declare "
                f"(it declares {sorted(self._values)})",
                where=f"module `{self._module}`",
                fix="add it to the module's `consumes()` mapping",
            ) from None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return self[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Inputs({sorted(self._values)})"


class Module(ModuleSpec):
    """Base of runnable modules (a declaration plus ``init`` / ``apply``); see the module docstring."""

    def init(self, params: Params, ctx: Context) -> Any:
        """Initial state (runs once). Stateless modules keep the default ``()``."""
        del params, ctx
        return ()

    def init_carried(self, name: str, params: Params, ctx: Context) -> PyTree:
        """Value of carried output ``name`` before the module first runs (default: zeros like params)."""
        del name, ctx
        return jax.tree.map(jnp.zeros_like, params)

    def apply(self, inputs: Inputs, state: Any, ctx: Context) -> tuple:
        """``(outputs, state)`` or ``(outputs, state, info)``: outputs and info by name (see above)."""
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
