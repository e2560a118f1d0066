from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from pydantic import Field

from curvplan.ir import carried, fresh
from curvplan.ir import quantities as q
from curvplan.modules._base import Module

precond_diag = q.precond_diag


class DiagEMAState(NamedTuple):
    """The raw (not bias-corrected) EMA ``v`` and the number of refreshes ``count``."""

    v: Any
    count: jax.Array


class DiagEMA(Module):
    """EMA of a diagonal curvature estimate, bias-corrected by the number of refreshes.

    ``mode="sophia"`` averages d; ``mode="adahessian"`` averages d². Runs on its cadence (e.g. ``every=10``)
    and its output ``%precond.diag`` is read carried in between.
    """

    kind: Literal["diag_ema"] = "diag_ema"
    beta: float = Field(0.99, ge=0.0, lt=1.0)
    mode: Literal["sophia", "adahessian"] = "sophia"
    estimate: tuple[tuple[str, int | str], ...] = (("est", "hutchinson"), ("probes", 1))
    """Attributes of the ``%diag.curvature`` quantity to average."""

    def consumes(self):
        return {"curvature": fresh(q.diag("curvature", **dict(self.estimate)))}

    def produces(self):
        return {"diag": precond_diag()}

    def init(self, params, ctx) -> DiagEMAState:
        return DiagEMAState(jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.int32))

    def apply(self, inputs, state: DiagEMAState, ctx):
        v = optax.tree.update_moment(inputs.curvature, state.v, self.beta, 1 if self.mode == "sophia" else 2)
        count = state.count + 1
        # not optax.tree.bias_correction: the floor keeps a beta that rounds to 1 from dividing by zero
        bc = jnp.maximum(1 - self.beta ** count.astype(jnp.result_type(float)), 1e-8)
        return {"diag": jax.tree.map(lambda x: (x / bc).astype(x.dtype), v)}, DiagEMAState(v, count)


class DiagonalDirectionState(NamedTuple):
    """The first moment ``m`` (EMA of the gradient, not bias-corrected) and the step ``count``."""

    m: Any
    count: jax.Array


class DiagonalDirection(Module):
    """A diagonally preconditioned momentum direction ``%direction.diag`` (AdaHessian / Sophia style).

    m ← EMA_β1(m, g), m̂ = m / (1 − β1^t); s = m̂ / den with den = max(v̂, 0)^(power/2) + eps (AdaHessian)
    or max(γ v̂, eps) (Sophia, then clipped to [-1, 1]).
    """

    kind: Literal["diagonal_direction"] = "diagonal_direction"
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    mode: Literal["sophia", "adahessian"] = "adahessian"
    gamma: float = Field(0.01, gt=0)
    power: float = Field(1.0, gt=0)
    eps: float = Field(1e-8, gt=0)

    def consumes(self):
        return {"grad": fresh(q.grad()), "diag": carried(precond_diag())}

    def produces(self):
        return {"direction": q.direction("diag")}

    def init(self, params, ctx) -> DiagonalDirectionState:
        return DiagonalDirectionState(jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.int32))

    def apply(self, inputs, state: DiagonalDirectionState, ctx):
        g, v = inputs.grad, inputs.diag
        m = optax.tree.update_moment(g, state.m, self.beta1, 1)
        count = state.count + 1
        mhat = optax.tree.bias_correction(m, self.beta1, count)
        if self.mode == "adahessian":
            s = jax.tree.map(lambda a, b: a / (jnp.maximum(b, 0) ** (self.power / 2) + self.eps), mhat, v)
        else:
            s = jax.tree.map(lambda a, b: jnp.clip(a / jnp.maximum(self.gamma * b, self.eps), -1, 1), mhat, v)
        return {"direction": s}, DiagonalDirectionState(m, count)
