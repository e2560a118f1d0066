from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from pydantic import Field, model_validator

from curvplan.ir import carried, fresh
from curvplan.ir import quantities as q
from curvplan.ir._errors import ConfigError
from curvplan.modules._base import Module
from curvplan.modules.curvature import curv_op

# how the step's coefficients were found (the `quad_fallback` telemetry)
SOLVED_2D, SOLVED_1D, FALLBACK_LR = 0, 1, 2


class QuadraticStepState(NamedTuple):
    """The update this module produced last step (zeros before the first: then M₂₂ = 0 and the 1-D solve runs)."""

    previous: Any


class QuadraticStep(Module):
    """Direction -> ``%update`` with the learning rate and momentum that minimize the local quadratic model
    (Martens & Grosse 2015, §7; docs/math.md §6.1): a drop-in replacement for `UpdateTail`.

    With Δ the direction (gradient sign), δ₋ the previous update, v₁ = −Δ, v₂ = δ₋ and the model
    m(c) = ½cᵀMc + bᵀc, ``M_ij = v_iᵀ(C + λI)v_j`` (C the plan's ``%curv_op`` on this batch, two products),
    ``b_i = gᵀv_i``: the update is ``c₁v₁ + c₂v₂`` with ``c = −M⁻¹b``, so α = c₁ is the learning rate and
    β = c₂ the momentum. Safeguards: on the first step, or when M is not safely positive definite or c is
    not finite, the 1-D minimizer on v₁ alone (α = −b₁/M₁₁, β = 0, when M₁₁ > 0); failing that α =
    ``fallback_lr``, β = 0. Reports ``alpha``, ``beta``, ``model_change`` (m(c) for the step taken: negative
    when the model predicts a decrease) and ``quad_fallback`` (0: 2-D solve, 1: 1-D solve, 2: fallback_lr).

    Args:
        source: which ``%direction.<source>`` to read (``kfac``, ``newton``, ...).
        include_lambda: put λI in M (and read ``%lambda``), as kfac-jax's coefficient solve does; False
            minimizes the undamped model (then no damping module is needed).
        fallback_lr: α when the model has no minimizer along v₁ (negative curvature, a zero or non-finite
            product); kept small because nothing in the step says how far to go.
        alpha_bounds, beta_bounds: optional ``(low, high)`` bounds on α and β (off by default). A β outside
            its bounds is set to the nearer bound and α re-minimized for it, the model's minimizer over the
            band when α is free; α is then clipped. ``beta_bounds=(0, 1)`` keeps the momentum recurrence
            stable (the adaptive `kfac` preset uses it).
        fixed: ``(α, β)`` skips the solve (no curvature products, no ``%curv_op``): update = −αΔ + βδ₋, which
            is `UpdateTail(learning_rate=α, momentum=β)`; the model change is then not reported.

    >>> from curvplan.modules import QuadraticStep
    >>> QuadraticStep(source="kfac").input_names()
    ('direction', 'grad', 'op', 'lam')
    >>> QuadraticStep(fixed=(0.1, 0.9)).input_names(), QuadraticStep().state_names()
    (('direction',), ('previous',))
    """

    kind: Literal["quadratic_step"] = "quadratic_step"
    source: str = "newton"
    include_lambda: bool = True
    fallback_lr: float = Field(1e-3, ge=0.0)
    alpha_bounds: tuple[float, float] | None = None
    beta_bounds: tuple[float, float] | None = None
    fixed: tuple[float, float] | None = None
    info_fields = (("alpha", "float"), ("beta", "float"), ("model_change", "float"), ("quad_fallback", "int"))

    @model_validator(mode="after")
    def _check(self):
        for name in ("alpha_bounds", "beta_bounds"):
            bounds = getattr(self, name)
            if bounds is not None and not bounds[0] <= bounds[1]:
                raise ConfigError(f"{name}={bounds} has low > high", fix=f"give {name}=(low, high) with low <= high")
        if self.fixed is not None:
            alpha, beta = self.fixed
            if not (alpha >= 0 and 0 <= beta < 1):
                raise ConfigError(f"fixed={self.fixed} needs alpha >= 0 and 0 <= beta < 1",
                                  fix="give fixed=(learning_rate, momentum), e.g. fixed=(0.1, 0.9)")
            if self.alpha_bounds is not None or self.beta_bounds is not None:
                raise ConfigError("fixed coefficients are not clipped: alpha_bounds / beta_bounds do nothing",
                                  fix="drop the bounds, or drop fixed= to let the model choose alpha and beta")
        return self

    def consumes(self):
        uses = {"direction": fresh(q.direction(self.source))}
        if self.fixed is None:
            uses |= {"grad": fresh(q.grad()), "op": fresh(curv_op())}
            if self.include_lambda:
                uses["lam"] = carried(q.lam())
        return uses

    def produces(self):
        return {"update": q.update()}

    def init(self, params, ctx) -> QuadraticStepState:
        return QuadraticStepState(jax.tree.map(jnp.zeros_like, params))

    def _coefficients(self, inputs, v1, v2):
        """(α, β, model change, how found) minimizing the model on span{v1, v2} (see the class docstring)."""
        vdot = optax.tree.vdot
        op = inputs.op.damped(inputs.lam) if self.include_lambda else inputs.op
        av1, av2 = op.mv(v1), op.mv(v2)
        m11, m22, m12 = vdot(v1, av1), vdot(v2, av2), 0.5 * (vdot(v1, av2) + vdot(v2, av1))
        b1, b2 = vdot(inputs.grad, v1), vdot(inputs.grad, v2)
        dt = jnp.result_type(m11, m22, m12, b1, b2)
        m11, m22, m12, b1, b2 = (jnp.asarray(x, dt) for x in (m11, m22, m12, b1, b2))
        # positive definite, and not so close to singular (v1, v2 nearly parallel in the M metric) that
        # rounding decides the answer: det / (M11 M22) = 1 − cos² of their angle
        det = m11 * m22 - m12 * m12
        rel_floor = jnp.sqrt(jnp.finfo(dt).eps)
        ok2 = (m11 > 0) & (m22 > 0) & (det > rel_floor * m11 * m22)  # m22 = 0 before the first update
        safe_det = jnp.where(ok2, det, 1.0)
        a2, c2 = (-b1 * m22 + b2 * m12) / safe_det, (-b2 * m11 + b1 * m12) / safe_det
        ok2 = ok2 & jnp.isfinite(a2) & jnp.isfinite(c2)
        a1 = -b1 / jnp.where(m11 > 0, m11, 1.0)
        ok1 = (m11 > 0) & jnp.isfinite(a1)
        alpha = jnp.where(ok2, a2, jnp.where(ok1, a1, jnp.asarray(self.fallback_lr, dt)))
        beta = jnp.where(ok2, c2, jnp.zeros((), dt))
        how = jnp.where(ok2, SOLVED_2D, jnp.where(ok1, SOLVED_1D, FALLBACK_LR)).astype(jnp.int32)
        if self.beta_bounds is not None:
            # β held at its bound, α re-minimized: m is convex in α, so this is the minimizer over the band
            clipped = jnp.clip(beta, *self.beta_bounds)
            resolved = -(b1 + clipped * m12) / jnp.where(m11 > 0, m11, 1.0)
            alpha = jnp.where((clipped != beta) & (m11 > 0) & jnp.isfinite(resolved), resolved, alpha)
            beta = clipped
        if self.alpha_bounds is not None:
            alpha = jnp.clip(alpha, *self.alpha_bounds)
        change = 0.5 * (alpha * alpha * m11 + 2 * alpha * beta * m12 + beta * beta * m22) + alpha * b1 + beta * b2
        return alpha, beta, change, how

    def apply(self, inputs, state: QuadraticStepState, ctx):
        d, prev = inputs.direction, state.previous
        if self.fixed is not None:
            alpha, beta = self.fixed
            info = {"alpha": alpha, "beta": beta}
        else:
            v1 = jax.tree.map(jnp.negative, d)
            alpha, beta, change, how = self._coefficients(inputs, v1, prev)
            info = {"alpha": alpha, "beta": beta, "model_change": change, "quad_fallback": how}
        new = jax.tree.map(lambda di, pi: -alpha * di + beta * pi, d, prev)
        update = jax.tree.map(lambda u, di: u.astype(di.dtype), new, d)
        kept = jax.tree.map(lambda u, pi: u.astype(pi.dtype), new, prev)
        return {"update": update}, QuadraticStepState(kept), info
