"""Gauss-Newton-Bartlett diagonal (Sophia-G's estimator; docs/math.md §2.7)."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from pydantic import Field

from curvplan.ir import fresh
from curvplan.ir import quantities as q
from curvplan.modules._base import Module
from curvplan.modules.curvature._fisher import require_rng


class GNBDiag(Module):
    """``diag ≈ B · (1/S) Σ_s ĝ_s ⊙ ĝ_s`` with ĝ_s the mean gradient at targets sampled from the model.

    For CE, ŷ_b ~ Cat(softmax F_b) and ĝ = Jᵀ(p − onehot ŷ)/B (one VJP on the cached linearization); for MSE,
    ŷ_b ~ N(F_b, I). Cross-example terms vanish in expectation, so the estimate is unbiased for diag(GGN).
    Produces ``%diag.curvature[est=gnb, probes=S]``; needs ``model_fn`` and ``loss=``.

    >>> from curvplan.modules.estimators._gnb import GNBDiag
    >>> GNBDiag(samples=2).outputs()
    (diag[curvature; est=gnb, probes=2],)
    """

    kind: Literal["gnb_diag"] = "gnb_diag"
    samples: int = Field(1, ge=1)
    info_fields = (("gnb_samples", "int"),)

    def consumes(self):
        return {"fisher": fresh(q.fisher_op("sampled")), "rng": fresh(q.rng())}

    def produces(self):
        return {"diag": q.diag("curvature", est="gnb", probes=self.samples)}

    def apply(self, inputs, state, ctx):
        key = require_rng(inputs.rng, ctx, "sampled labels")
        sampler = inputs.fisher
        gs = sampler.grads(key, self.samples)
        d = jax.tree.map(lambda g: sampler.batch_size * jnp.mean(g * g, axis=0), gs)
        return {"diag": d}, state, {"gnb_samples": jnp.asarray(self.samples, jnp.int32)}
