"""Shared Hutchinson probes: one batch of products ``(z_s, C z_s)`` feeds the diagonal and the trace.

``HutchinsonProbes(probes=S)`` produces ``%probes.curvature[probes=S]``; `ProbeDiag` and `HutchinsonTrace`
consume it, so a plan that wants both runs the S operator products once (docs/math.md §1 Q7, §2.6).

See `curvplan.modules._presets_second_order.hutchinson_estimates` for the list that shares them.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from pydantic import Field

from curvplan.ir import fresh
from curvplan.ir import quantities as q
from curvplan.modules._base import Module
from curvplan.modules.curvature._fisher import require_rng
from curvplan.modules.curvature._operators import curv_op
from curvplan.modules.estimators._hutchinson import rademacher_like

probes = q.probes


class Probes(NamedTuple):
    """``z`` and ``cz``: pytrees shaped like params with a leading probe axis of size S."""

    z: Any
    cz: Any


class HutchinsonProbes(Module):
    """Draws S Rademacher probes z_s and pushes them through `%curv_op` in one vmapped call.

    >>> from curvplan.modules.estimators._probes import HutchinsonProbes
    >>> HutchinsonProbes(probes=4).outputs()
    (probes[curvature; probes=4],)
    """

    kind: Literal["hutchinson_probes"] = "hutchinson_probes"
    probes: int = Field(1, ge=1)
    info_fields = (("hutchinson_probes", "int"),)

    def consumes(self):
        return {"op": fresh(curv_op()), "rng": fresh(q.rng())}

    def produces(self):
        return {"probes": probes(self.probes)}

    def apply(self, inputs, state, ctx):
        key = require_rng(inputs.rng, ctx, "random probes")
        z = rademacher_like(key, ctx.params, self.probes)
        cz = jax.vmap(inputs.op.mv)(z)
        return {"probes": Probes(z, cz)}, state, {"hutchinson_probes": jnp.asarray(self.probes, jnp.int32)}


class ProbeDiag(Module):
    """Hutchinson's diagonal ``(1/S) Σ_s z_s ⊙ C z_s`` from shared probes.

    Produces the same ``%diag.curvature[est=hutchinson, probes=S]`` as `HutchinsonDiag`, so `DiagEMA`
    reads either; use this one when a `HutchinsonTrace` runs on the same probes.

    >>> from curvplan.modules.estimators._probes import ProbeDiag
    >>> ProbeDiag(probes=2).outputs()
    (diag[curvature; est=hutchinson, probes=2],)
    """

    kind: Literal["probe_diag"] = "probe_diag"
    probes: int = Field(1, ge=1)

    def consumes(self):
        return {"probes": fresh(probes(self.probes))}

    def produces(self):
        return {"diag": q.diag("curvature", est="hutchinson", probes=self.probes)}

    def apply(self, inputs, state, ctx):
        p = inputs.probes
        d = jax.tree.map(lambda a, b: jnp.mean(a * b, axis=0), p.z, p.cz)
        return {"diag": d}, state


class HutchinsonTrace(Module):
    """Hutchinson's trace ``(1/S) Σ_s z_sᵀ C z_s`` from shared probes: ``%trace.curvature``.

    Unbiased; with Rademacher probes its variance per probe is ``2 Σ_{i≠j} C_ij²``. Reports the estimate
    and its standard error (from the spread of the S per-probe values; NaN for S = 1).

    >>> from curvplan.modules.estimators._probes import HutchinsonTrace
    >>> HutchinsonTrace(probes=2).outputs()
    (trace[curvature; est=hutchinson, probes=2],)
    """

    kind: Literal["hutchinson_trace"] = "hutchinson_trace"
    probes: int = Field(1, ge=1)
    sink = True  # telemetry: runs even when nothing reads the trace
    info_fields = (("trace", "float"), ("trace_stderr", "float"))

    def consumes(self):
        return {"probes": fresh(probes(self.probes))}

    def produces(self):
        return {"trace": q.trace("curvature", est="hutchinson", probes=self.probes)}

    def apply(self, inputs, state, ctx):
        p = inputs.probes
        per = sum(jnp.sum((a * b).reshape(a.shape[0], -1), axis=1)
                  for a, b in zip(jax.tree.leaves(p.z), jax.tree.leaves(p.cz)))
        t = jnp.mean(per)
        se = jnp.std(per, ddof=1) / jnp.sqrt(per.shape[0]) if self.probes > 1 else jnp.nan
        return {"trace": t}, state, {"trace": t, "trace_stderr": se}
