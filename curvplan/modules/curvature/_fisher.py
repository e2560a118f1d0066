"""Fisher curvature operators (docs/math.md §2.4, §2.7) and the ``%model_lin`` quantity."""

from __future__ import annotations

from typing import Literal

from curvplan.ir import fresh
from curvplan.ir import quantities as q
from curvplan.ir._errors import LoweringError
from curvplan.modules._base import Module
from curvplan.modules.curvature._operators import curv_op

model_lin = q.model_lin


class EmpiricalFisher(Module):
    """The empirical Fisher ``E = (1/B) Σ_b g_b g_bᵀ`` of the per-example gradients, as `%curv_op`.

    Not ``g ⊙ g`` of the mean gradient: ``E v = (1/B) Σ_b g_b (g_b · v)`` from per-example gradients
    (provider ``per_example_grads``, a vmap of the gradient over the batch's leading axis).

    >>> from curvplan.modules.curvature._fisher import EmpiricalFisher
    >>> [u.quantity.name for u in EmpiricalFisher().uses()]
    ['%fisher_op.empirical']
    """

    kind: Literal["empirical_fisher"] = "empirical_fisher"

    def consumes(self):
        return {"fisher": fresh(q.fisher_op("empirical"))}

    def produces(self):
        return {"op": curv_op()}

    def apply(self, inputs, state, ctx):
        return {"op": inputs.fisher}, state


class SampledFisher(Module):
    """The one-sample Monte-Carlo Fisher ``(1/B) Σ_b J_bᵀ e_b e_bᵀ J_b`` as `%curv_op` (unbiased for the GGN).

    ``e_b`` is the output residual at a target sampled from the model (``ŷ ~ Cat(softmax F_b)`` for CE,
    ``ŷ ~ N(F_b, I)`` for MSE), drawn once per step with the module's own key.

    >>> from curvplan.modules.curvature._fisher import SampledFisher
    >>> [u.quantity.name for u in SampledFisher().uses()]
    ['%fisher_op.sampled', 'rng']
    """

    kind: Literal["sampled_fisher"] = "sampled_fisher"

    def consumes(self):
        return {"fisher": fresh(q.fisher_op("sampled")), "rng": fresh(q.rng())}

    def produces(self):
        return {"op": curv_op()}

    def apply(self, inputs, state, ctx):
        key = require_rng(inputs.rng, ctx, "sampled targets")
        return {"op": inputs.fisher.operator(key)}, state


def require_rng(key, ctx, what: str):
    """The module's key, or a `LoweringError` saying to pass ``rng=`` when the step got none."""
    if key is None:
        raise LoweringError(
            f"module `{ctx.module}` draws {what} but the step was given no rng",
            where=f"module `{ctx.module}`, quantity rng",
            fix="pass `rng=jax.random.key(0)` (or any key) to step / update / run",
        )
    return key
