from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from pydantic import Field

from curvplan.ir import fresh
from curvplan.ir import quantities as q
from curvplan.ir._errors import LoweringError
from curvplan.modules._base import Module
from curvplan.modules.curvature import curv_op


def rademacher_like(key: jax.Array, tree, num: int):
    """``num`` independent Rademacher (±1) pytrees shaped like ``tree``, stacked on a leading axis."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    out = [jax.random.rademacher(k, (num,) + x.shape, dtype=x.dtype) for k, x in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, out)


class HutchinsonDiag(Module):
    """Hutchinson's diagonal estimate ``(1/S) Σ_s z_s ⊙ C z_s`` with Rademacher probes z_s.

    Produces ``%diag.curvature`` (unbiased for diag(C)). The S probes are pushed through the operator in
    one batched (vmapped) call.
    """

    kind: Literal["hutchinson_diag"] = "hutchinson_diag"
    probes: int = Field(1, ge=1)

    def consumes(self):
        return {"op": fresh(curv_op()), "rng": fresh(q.rng())}

    def produces(self):
        return {"diag": q.diag("curvature", est="hutchinson", probes=self.probes)}

    def apply(self, inputs, state, ctx):
        key = inputs.rng
        if key is None:
            raise LoweringError(
                "HutchinsonDiag needs random probes but the step was given no rng",
                where=f"module `{ctx.module}`, quantity rng",
                fix="pass `rng=jax.random.key(0)` (or any key) to step / update / run",
            )
        z = rademacher_like(key, ctx.params, self.probes)
        cz = jax.vmap(inputs.op.mv)(z)
        d = jax.tree.map(lambda a, b: jnp.mean(a * b, axis=0), z, cz)
        return {"diag": d}, state
