from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from pydantic import Field, model_validator

from curvplan.ir import carried, fresh
from curvplan.ir import quantities as q
from curvplan.ir._errors import ConfigError
from curvplan.modules._base import Module
from curvplan.modules.curvature import curv_op


class GainRatio(Module):
    """The trust-region gain ratio ρ = actual / predicted decrease of the step just taken (docs/math.md §4).

    With δ the **final applied** update (after learning rate, momentum, clipping, weight decay):
    act = L(θ) − L(θ + δ) on the same batch (one extra forward), pred = −(gᵀδ + ½(δᵀCδ + λ‖δ‖²)) (one
    curvature-vector product at θ). ρ = act / pred when both are finite and pred > 1e-16; ρ = −∞ when both
    are finite, δ ≠ 0 and pred ≤ 0 (the model predicts an increase, so it is not to be trusted); else NaN
    (a failed evaluation, a zero step, or 0 < pred ≤ 1e-16, too small to divide by).
    Produces ``%rho``; reports ``loss_after``, ``pred_decrease``, ``act_decrease``, ``rho``. Give it a
    cadence (``every=k``) to pay for it on every k-th step only.

    >>> from curvplan.modules import GainRatio
    >>> sorted(u.quantity.name for u in GainRatio(every=5).uses())
    ['%curv_op', '%grad', '%lambda', '%loss', '%update', 'batch', 'params']
    """

    kind: Literal["gain_ratio"] = "gain_ratio"
    include_lambda: bool = True
    """Include ½λ‖δ‖² in the predicted decrease (Somax); kfac-jax leaves it out."""
    sink = True  # its telemetry is wanted even when no damping module reads %rho
    nonfinite_outputs = ("rho",)  # NaN: no valid ratio this time
    info_fields = (("loss_after", "float"), ("pred_decrease", "float"), ("act_decrease", "float"),
                   ("rho", "float"))

    def consumes(self):
        return {"update": fresh(q.update()), "loss": fresh(q.loss()), "grad": fresh(q.grad()),
                "op": fresh(curv_op()), "lam": carried(q.lam()), "params": fresh(q.params()),
                "batch": fresh(q.batch())}

    def produces(self):
        return {"rho": q.rho()}

    def init_carried(self, name, params, ctx):
        return jnp.asarray(jnp.nan, jnp.result_type(float))

    def apply(self, inputs, state, ctx):
        vdot = optax.tree.vdot
        delta, g, lam = inputs.update, inputs.grad, inputs.lam
        loss_after = ctx.objective.loss(optax.tree.add_scale(inputs.params, 1.0, delta), inputs.batch)
        quad = vdot(delta, inputs.op.mv(delta))
        if self.include_lambda:
            quad = quad + lam * vdot(delta, delta)
        pred = -(vdot(g, delta) + 0.5 * quad)
        act = inputs.loss - loss_after
        finite = jnp.isfinite(act) & jnp.isfinite(pred)
        valid = finite & (pred > 1e-16)
        uphill = finite & (pred <= 0) & (vdot(delta, delta) > 0)  # the model predicts an increase
        rho = jnp.where(valid, act / jnp.where(valid, pred, 1.0), jnp.where(uphill, -jnp.inf, jnp.nan))
        info = {"loss_after": loss_after, "pred_decrease": pred, "act_decrease": act, "rho": rho}
        return {"rho": rho}, state, info


class TrustRegionState(NamedTuple):
    """The current λ and how many valid gain ratios have moved it."""

    lam: jax.Array
    updates: jax.Array


class TrustRegionDamping(Module):
    """Levenberg-Marquardt damping driven by the gain ratio ``%rho`` (docs/math.md §4).

    When ρ is not NaN: clip it to [−5, 5]; ρ < ``low`` → λ ×= ``increase``; ρ > ``high`` → λ ×=
    ``decrease``; clamp λ to [``lam_min``, ``lam_max``]. A NaN ρ (a failed evaluation) leaves λ unchanged;
    ρ = −∞ (`GainRatio`'s mark of a predicted increase) raises it. Runs after
    `GainRatio` on the same steps (give both the same cadence); the new λ is read (carried) by the solver
    from the next step on, and steps are never rejected. Produces ``%lambda``.

    >>> from curvplan.modules import TrustRegionDamping
    >>> TrustRegionDamping(lam0=1.0).increase
    1.5
    """

    kind: Literal["trust_region_damping"] = "trust_region_damping"
    lam0: float = Field(1.0, gt=0)
    low: float = 0.25
    high: float = 0.75
    increase: float = Field(1.5, gt=1.0)
    decrease: float = Field(0.5, gt=0.0, lt=1.0)
    lam_min: float = Field(1e-12, gt=0)
    lam_max: float = Field(1e6, gt=0)
    info_fields = (("lambda_next", "float"),)

    @model_validator(mode="after")
    def _check(self):
        if not self.low < self.high:
            raise ConfigError(f"low={self.low} must be below high={self.high}", fix="e.g. low=0.25, high=0.75")
        if not self.lam_min <= self.lam0 <= self.lam_max:
            raise ConfigError(f"lam0={self.lam0} is outside [lam_min, lam_max]=[{self.lam_min}, {self.lam_max}]",
                              fix="change lam0 or the bounds")
        return self

    def consumes(self):
        return {"rho": fresh(q.rho())}

    def produces(self):
        return {"lam": q.lam()}

    def _lam0(self):
        return jnp.asarray(self.lam0, jnp.result_type(float))

    def init(self, params, ctx) -> TrustRegionState:
        return TrustRegionState(self._lam0(), jnp.zeros((), jnp.int32))

    def init_carried(self, name, params, ctx):
        return self._lam0()

    def apply(self, inputs, state: TrustRegionState, ctx):
        rho = inputs.rho
        valid = ~jnp.isnan(rho)  # −∞: the model predicted an increase → clipped to −5 → λ rises
        r = jnp.clip(jnp.where(valid, rho, 0.5 * (self.low + self.high)), -5.0, 5.0)
        factor = jnp.where(r < self.low, self.increase, jnp.where(r > self.high, self.decrease, 1.0))
        lam = jnp.where(valid, jnp.clip(state.lam * factor, self.lam_min, self.lam_max), state.lam)
        return {"lam": lam}, TrustRegionState(lam, state.updates + valid.astype(jnp.int32)), {"lambda_next": lam}
