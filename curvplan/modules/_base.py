"""The execution side of the module contract.

A runnable module subclasses `Module` (a `curvplan.ir.ModuleSpec` plus its JAX implementation):

- ``init(params, ctx) -> State``: runs once, outside the step. ``State`` is a NamedTuple defined right above
  the module; its fields are the plan's ``state:`` entries and the checkpoint's layout. Stateless modules do
  not override it (they keep ``()``).
- ``init_carried(name, params, ctx)``: the value carried output ``name`` holds before it is first computed.
- ``apply(inputs, state, ctx) -> (outputs, state[, info])``: runs on the steps its cadence selects.
  ``inputs`` holds each consumed value under the module's own name (``inputs.grad``); ``outputs`` maps each
  produced name to its value; ``info`` (optional) maps telemetry keys from ``info_fields`` to scalars.

A complete module, `curvplan.modules.Lookahead`, is walked through in docs/writing-modules.md:

>>> from curvplan.modules import Lookahead
>>> Lookahead().input_names(), Lookahead().output_names(), Lookahead().state_names()
(('direction',), ('direction',), ('previous',))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from curvplan.ir._errors import LoweringError
from curvplan.ir._module import ModuleSpec
from curvplan.modules._blocks import LOCAL, BlockMap

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
        blocks: where this module's per-block work runs (`BlockMap`): ``ctx.blocks.map(fn, blocks)`` spreads
            it over the devices the plan placed it on, and is the plain loop on one device.
    """

    step: jax.Array
    rng: jax.Array | None
    params: Params
    batch: Any
    objective: Any
    module: str
    layers: Callable[[], Any] | None = None
    blocks: BlockMap = LOCAL


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

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def get(self, name: str, default: Any = None) -> Any:
        return self._values.get(name, default)

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

    def damped(self, lam: Any) -> LinearOperator:
        # λ is cast to each leaf's dtype: a float64 λ (x64 on) must not promote float32 products
        def mv(v):
            return jax.tree.map(lambda cv, vi: cv + jnp.asarray(lam, vi.dtype) * vi, self._mv(v), v)

        return LinearOperator(mv, f"({self.name} + lambda I)")

    def __repr__(self) -> str:
        return f"LinearOperator({self.name})"
