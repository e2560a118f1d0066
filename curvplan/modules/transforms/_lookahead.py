from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from pydantic import Field

from curvplan.ir import fresh
from curvplan.ir import quantities as q
from curvplan.modules._base import Module


class LookaheadState(NamedTuple):
    """The previous step's input direction (zeros before the first step)."""

    previous: Any


class Lookahead(Module):
    """Nesterov-style extrapolation of a direction: ``%direction.<target> = d_t + beta · (d_t − d_{t−1})``.

    The direction leans further along the way it is changing. On the first step ``d_{t−1} = 0``.

    >>> import curvplan as cp
    >>> mods = [cp.modules.IdentitySolve(), cp.modules.Lookahead(beta=0.5),
    ...         cp.modules.UpdateTail(learning_rate=0.1, source="lookahead")]
    >>> [op.op for op in cp.compile_plan(mods, name="la").phases[0].ops]
    ['value_and_grad', 'identity_solve', 'lookahead', 'update_tail']
    """

    kind: Literal["lookahead"] = "lookahead"
    beta: float = Field(0.9, ge=0.0, allow_inf_nan=False)
    source: str = "newton"
    target: str = "lookahead"

    def consumes(self):
        return {"direction": fresh(q.direction(self.source))}

    def produces(self):
        return {"direction": q.direction(self.target)}

    def init(self, params, ctx) -> LookaheadState:
        return LookaheadState(jax.tree.map(jnp.zeros_like, params))

    def apply(self, inputs, state: LookaheadState, ctx):
        d = inputs.direction
        out = jax.tree.map(lambda now, prev: now + self.beta * (now - prev), d, state.previous)
        return {"direction": out}, LookaheadState(d)
