"""How the user gives the model: `Objective`, and the provider implementations that differentiate it."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp

from curvplan.ir import quantities as q
from curvplan.ir._errors import LoweringError
from curvplan.modules._base import LinearOperator

LossKind = Literal["mse", "ce"]


def mse_loss(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """½ mean over examples of the squared error summed over output dims (so the GGN's Λ_b = I)."""
    outputs = outputs.reshape(outputs.shape[0], -1)
    targets = jnp.reshape(targets, outputs.shape)
    return 0.5 * jnp.mean(jnp.sum((outputs - targets) ** 2, axis=-1))


def ce_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy with integer labels (labels reshaped to ``logits.shape[:-1]``)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    labels = jnp.reshape(labels, logits.shape[:-1]).astype(jnp.int32)
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))


_LOSSES = {"mse": mse_loss, "ce": ce_loss}


@dataclasses.dataclass(frozen=True)
class Objective:
    """The model and loss an optimizer differentiates.

    Give either a loss function (enough for gradient and Hessian methods) or a model function and a loss kind
    (needed for Gauss-Newton methods, which linearize the model outputs):

    - ``Objective(loss_fn=f)``: ``f(params, batch) -> scalar``.
    - ``Objective(model_fn=g, loss_kind="ce")``: ``g(params, inputs) -> outputs`` and ``batch = (inputs, targets)``;
      ``"mse"`` is ½·mean_b‖F_b − y_b‖², ``"ce"`` is mean softmax cross-entropy with integer labels.

    Examples:
        >>> import jax.numpy as jnp
        >>> obj = Objective(model_fn=lambda w, x: x @ w, loss_kind="mse")
        >>> float(obj.loss(jnp.ones(2), (jnp.eye(2), jnp.zeros(2))))
        0.5
    """

    loss_fn: Callable[[Any, Any], jax.Array] | None = None
    model_fn: Callable[[Any, Any], jax.Array] | None = None
    loss_kind: LossKind | None = None

    def __post_init__(self):
        if self.loss_fn is None and self.model_fn is None:
            raise LoweringError(
                "no model given",
                where="Objective / Optimizer / as_optax",
                fix="pass `loss_fn=f` with f(params, batch) -> scalar, or `model_fn=g, loss='mse'|'ce'`",
            )
        if self.model_fn is not None and self.loss_kind not in _LOSSES:
            raise LoweringError(
                f"model_fn needs a loss kind, got loss={self.loss_kind!r}",
                where="Objective(model_fn=...)",
                fix="pass `loss='mse'` or `loss='ce'`",
            )

    def loss(self, params: Any, batch: Any) -> jax.Array:
        if self.loss_fn is not None:
            return self.loss_fn(params, batch)
        x, y = batch
        return _LOSSES[self.loss_kind](self.model_fn(params, x), y)


# -- providers ------------------------------------------------------------------------------------------
def _loss_only(obj: Objective, params, batch, rng):
    return {q.loss(): obj.loss(params, batch)}


def _value_and_grad(obj: Objective, params, batch, rng):
    loss, g = jax.value_and_grad(obj.loss)(params, batch)
    return {q.loss(): loss, q.grad(): g}


def _linearize_grad(obj: Objective, params, batch, rng):
    (loss, g), f_jvp = jax.linearize(lambda p: jax.value_and_grad(obj.loss)(p, batch), params)
    op = LinearOperator(lambda v: f_jvp(v)[1], "hessian")
    return {q.loss(): loss, q.grad(): g, q.hvp_op("hessian"): op}


def _linearize_model(obj: Objective, params, batch, rng):
    if obj.model_fn is None:
        raise LoweringError(
            "this plan needs the model outputs (a Gauss-Newton operator) but only a loss function was given",
            where="provider linearize_model",
            fix="give `model_fn=g, loss='mse'|'ce'` instead of (or as well as) `loss_fn`",
        )
    x, y = batch
    f = lambda p: obj.model_fn(p, x)  # noqa: E731
    outputs, f_jvp = jax.linearize(f, params)
    f_vjp = jax.linear_transpose(f_jvp, params)
    n = outputs.shape[0]
    loss_of_outputs = lambda out: _LOSSES[obj.loss_kind](out, y)  # noqa: E731
    loss, r = jax.value_and_grad(loss_of_outputs)(outputs)
    (g,) = f_vjp(r)
    vals = {q.loss(): loss, q.grad(): g, q.outputs(): outputs}

    def ggn_mse(v):  # loss = ½ mean_b |F_b - y_b|²: H_F = I / B
        (out,) = f_vjp(f_jvp(v) / n)
        return out

    def ggn_ce(v):  # H_F per example = diag(p) - p pᵀ, over B
        p = jax.lax.stop_gradient(jax.nn.softmax(outputs, axis=-1))
        u = f_jvp(v)
        w = p * u - p * jnp.sum(p * u, axis=-1, keepdims=True)
        (out,) = f_vjp(w / n)
        return out

    if obj.loss_kind == "mse":
        vals[q.ggn_op("mse")] = LinearOperator(ggn_mse, "ggn_mse")
    else:
        vals[q.ggn_op("ce")] = LinearOperator(ggn_ce, "ggn_ce")
    return vals


def _layer_io(obj: Objective, params, batch, rng):
    raise LoweringError(
        "the layer_io provider (layer inputs and output cotangents) is not implemented yet",
        where="provider layer_io",
        fix="use modules that need grad / hvp_op / ggn_op only, until layer discovery lands",
    )


PROVIDER_IMPLS: dict[str, Callable[..., dict]] = {
    "loss_only": _loss_only,
    "value_and_grad": _value_and_grad,
    "linearize_grad": _linearize_grad,
    "linearize_model": _linearize_model,
    "layer_io": _layer_io,
}


def register_provider_impl(name: str, fn: Callable[..., dict]) -> None:
    """Registers the JAX implementation of a provider rule (see `curvplan.ir.register_provider`)."""
    PROVIDER_IMPLS[name] = fn
