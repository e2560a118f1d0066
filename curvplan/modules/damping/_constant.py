from __future__ import annotations

from typing import Literal

import jax.numpy as jnp
from pydantic import Field

from curvplan.ir import quantities as q
from curvplan.modules._base import Module


class ConstantDamping(Module):
    """A fixed damping strength: ``%lambda = lam`` every step.

    >>> from curvplan.modules import ConstantDamping
    >>> ConstantDamping(lam=0.1).lam
    0.1
    """

    kind: Literal["constant_damping"] = "constant_damping"
    lam: float = Field(1.0, ge=0.0)

    def produces(self):
        return {"lam": q.lam()}

    def init_carried(self, name, params, ctx):
        return jnp.asarray(self.lam, jnp.result_type(float))

    def apply(self, inputs, state, ctx):
        return {"lam": jnp.asarray(self.lam, jnp.result_type(float))}, state
