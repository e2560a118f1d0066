"""How the user gives the model: `Objective`, and the provider implementations that differentiate it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp

from curvplan.ir import quantities as q
from curvplan.ir._errors import LoweringError
from curvplan.lowering._layers import LayerArrays, capture, discover_layers
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
    (needed for Gauss-Newton methods, which linearize the model outputs). A plan that only transforms a given
    gradient (`as_optax` with Muon, Shampoo, SOAP, ...) needs neither: ``Objective()``.

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
        if self.model_fn is not None and self.loss_kind not in _LOSSES:
            raise LoweringError(
                f"model_fn needs a loss kind, got loss={self.loss_kind!r}",
                where="Objective(model_fn=...)",
                fix="pass `loss='mse'` or `loss='ce'`",
            )

    @property
    def given(self) -> bool:
        """Whether a model was given (a plan that uses only the given gradient needs none)."""
        return self.loss_fn is not None or self.model_fn is not None

    def loss(self, params: Any, batch: Any) -> jax.Array:
        if not self.given:
            raise LoweringError(
                "no model given", where="Objective.loss",
                fix="pass `loss_fn=f` with f(params, batch) -> scalar, or `model_fn=g, loss='mse'|'ce'`")
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


def _in_dtypes_of(like, f: Callable) -> Callable:
    """``f`` (a linearized map) taking tangents in the dtypes of ``like`` (the primals: bf16 parameters give
    bf16 tangents), and returning its results in the dtypes of the tangents it was handed (the solver's, float32
    or wider), so curvature products accumulate in the solver's precision."""
    def mv(v):
        out = f(jax.tree.map(lambda t, p: t.astype(jnp.result_type(p)), v, like))
        return jax.tree.map(lambda o, t: o.astype(t.dtype), out, v)
    return mv


def _linearize_grad(obj: Objective, params, batch, rng):
    (loss, g), f_jvp = jax.linearize(lambda p: jax.value_and_grad(obj.loss)(p, batch), params)
    op = LinearOperator(_in_dtypes_of(params, lambda v: f_jvp(v)[1]), "hessian")
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
        vals[q.ggn_op("mse")] = LinearOperator(_in_dtypes_of(params, ggn_mse), "ggn_mse")
    else:
        vals[q.ggn_op("ce")] = LinearOperator(_in_dtypes_of(params, ggn_ce), "ggn_ce")
    vjp = lambda u: f_vjp(u)[0]  # noqa: E731
    lin = ModelLinearization(outputs, y, f_jvp, vjp, obj.loss_kind, r * n)
    vals[q.model_lin()] = lin
    vals[q.fisher_op("sampled")] = FisherSampler(lin)
    return vals


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class ModelLinearization:
    """The value of ``%model_lin``: the model linearized at the current params on the batch.

    ``jvp(v)`` is J v (shaped like ``outputs``), ``vjp(u)`` is Jᵀ u (shaped like params), ``residual`` is the
    per-example ∂ℓ_b/∂F_b (so that the mean-loss gradient is ``vjp(residual) / B``). A pytree whose leaves are
    the arrays (the closures ride along as static data and are only valid inside the step that made them).
    """

    outputs: Any
    targets: Any
    jvp: Callable[[Any], Any]
    vjp: Callable[[Any], Any]
    loss_kind: str
    residual: Any

    def tree_flatten(self):
        return (self.outputs, self.targets, self.residual), (self.jvp, self.vjp, self.loss_kind)

    @classmethod
    def tree_unflatten(cls, aux, children):
        outputs, targets, residual = children
        jvp, vjp, loss_kind = aux
        return cls(outputs, targets, jvp, vjp, loss_kind, residual)


@jax.tree_util.register_pytree_node_class
class FisherSampler:
    """The value of ``%fisher_op.sampled``: gradients at targets sampled from the model's predictive.

    CE: ŷ_b ~ Cat(softmax F_b), e_b = p_b − onehot(ŷ_b); MSE: ŷ_b ~ N(F_b, I), e_b = F_b − ŷ_b. Then
    E[e_b e_bᵀ] = Λ_b, so ``grads(key, S)`` (S draws of ĝ = Jᵀe / B) gives B·E[ĝ⊙ĝ] = diag(GGN) and
    ``operator(key)`` (v ↦ Jᵀ(e ⊙ (e·Jv)) / B, one draw per example) is unbiased for the GGN.
    """

    def __init__(self, lin: ModelLinearization):
        self.lin = lin

    @property
    def batch_size(self) -> int:
        return self.lin.outputs.shape[0]

    def tree_flatten(self):
        return (self.lin,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)

    def residuals(self, key: jax.Array, num: int) -> jax.Array:
        """``num`` draws of the per-example residuals e, shape (num, *outputs.shape)."""
        out = jax.lax.stop_gradient(self.lin.outputs)
        if self.lin.loss_kind == "ce":
            ys = jax.random.categorical(key, out, axis=-1, shape=(num,) + out.shape[:-1])
            return jax.nn.softmax(out, axis=-1)[None] - jax.nn.one_hot(ys, out.shape[-1], dtype=out.dtype)
        return -jax.random.normal(key, (num,) + out.shape, out.dtype)

    def grads(self, key: jax.Array, num: int) -> Any:
        """``num`` sampled-label mean gradients ĝ_s = Jᵀ e_s / B, stacked on a leading axis."""
        return jax.vmap(self.lin.vjp)(self.residuals(key, num) / self.batch_size)

    def operator(self, key: jax.Array) -> LinearOperator:
        """The one-sample Monte-Carlo Fisher v ↦ (1/B) Σ_b J_bᵀ e_b (e_b · J_b v)."""
        e = self.residuals(key, 1)[0]
        e2 = e.reshape(self.batch_size, -1)

        def mv(v):
            u = self.lin.jvp(v).reshape(e2.shape)
            w = e2 * jnp.sum(e2 * u, axis=-1, keepdims=True)
            return self.lin.vjp((w / self.batch_size).reshape(e.shape))

        return LinearOperator(mv, "fisher_sampled")


def _per_example_grads(obj: Objective, params, batch, rng):
    """Per-example losses and gradients by vmap over the leading (example) axis of every batch leaf.

    The loss of a one-example batch is ℓ_b for a mean-reduced loss, so the mean of the per-example values is
    the minibatch loss / gradient. Provides the empirical Fisher E v = (1/B) Σ_b g_b (g_b · v).
    """
    one = lambda b: jax.value_and_grad(obj.loss)(params, jax.tree.map(lambda x: x[None], b))  # noqa: E731
    losses, gs = jax.vmap(one)(batch)
    n = losses.shape[0]
    g = jax.tree.map(lambda x: jnp.mean(x, axis=0), gs)

    def fisher_mv(v):
        dots = sum(jnp.tensordot(a, b, axes=b.ndim) for a, b in zip(jax.tree.leaves(gs), jax.tree.leaves(v)))
        return jax.tree.map(lambda a: jnp.tensordot(dots, a, axes=1) / n, gs)

    fisher = LinearOperator(fisher_mv, "fisher_empirical")
    return {q.loss(): jnp.mean(losses), q.grad(): g, q.fisher_op("empirical"): fisher}


def _layer_io(obj: Objective, params, batch, rng):
    """One backward pass for loss, grad, layer inputs and output cotangents (`curvplan.lowering._layers`).

    The two dicts are `LayerArrays` (plain dicts with ``.report``, the `LayerReport` naming each layer's
    matrix layout, its bias and the leaves discovery could not handle)."""
    report = discover_layers(obj.loss, params, batch)
    loss, g, acts, cots = capture(obj.loss, report, params, batch)
    return {q.loss(): loss, q.grad(): g, q.activations(): LayerArrays(acts, report),
            q.out_cotangents(): LayerArrays(cots, report, _loss_terms(obj, batch))}


def _loss_terms(obj: Objective, batch) -> int:
    """How many terms the loss averages: the labels (CE, one per position), the examples (MSE), or for a plain
    loss function the leading axis of the batch's first leaf."""
    if obj.model_fn is not None:
        _, y = batch
        return int(jnp.size(y)) if obj.loss_kind == "ce" else int(jnp.shape(y)[0])
    return int(jnp.shape(jax.tree.leaves(batch)[0])[0])


def _layer_io_sampled(obj: Objective, params, batch, rng):
    """`_layer_io` plus ``%out_cotangents.sampled``: the layer output cotangents of the surrogate
    ``Σ e · F(params) / n`` whose output gradient e is a draw with E[e eᵀ] = the loss Hessian in the outputs
    (CE: softmax(F) − onehot(ŷ), ŷ ~ Cat(softmax F); MSE: −ε, ε ~ N(0, I)); n is the number of loss terms."""
    if obj.model_fn is None:
        raise LoweringError(
            "sampled-label cotangents need the model outputs, but the objective is a plain loss function",
            where="provider layer_io_sampled, quantity %out_cotangents.sampled",
            fix="give `model_fn=..., loss='ce'|'mse'`, or use empirical (true-label) factors",
        )
    if rng is None:
        raise LoweringError(
            "sampled-label cotangents need random numbers but the step got no rng",
            where="provider layer_io_sampled, quantity %out_cotangents.sampled",
            fix="pass `rng=jax.random.key(0)` (a fresh key per step) to step / update",
        )
    vals = _layer_io(obj, params, batch, rng)
    x, _ = batch
    out = jax.lax.stop_gradient(obj.model_fn(params, x))
    key = jax.random.fold_in(rng, 0x5A3)
    if obj.loss_kind == "ce":
        ys = jax.random.categorical(key, out, axis=-1)
        e = jax.nn.softmax(out, axis=-1) - jax.nn.one_hot(ys, out.shape[-1], dtype=out.dtype)
    else:
        e = -jax.random.normal(key, out.shape, out.dtype)
    n = _loss_terms(obj, batch)

    def surrogate(p, x, e):
        return jnp.sum(e * obj.model_fn(p, x)) / n

    report = discover_layers(surrogate, params, x, e)
    cots = capture(surrogate, report, params, x, e)[3]
    vals[q.out_cotangents(labels="sampled")] = LayerArrays(cots, report, n)
    return vals


PROVIDER_IMPLS: dict[str, Callable[..., dict]] = {
    "loss_only": _loss_only,
    "value_and_grad": _value_and_grad,
    "linearize_grad": _linearize_grad,
    "linearize_model": _linearize_model,
    "layer_io": _layer_io,
    "layer_io_sampled": _layer_io_sampled,
    "per_example_grads": _per_example_grads,
}


def register_provider_impl(name: str, fn: Callable[..., dict]) -> None:
    """Registers the JAX implementation of a provider rule (see `curvplan.ir.register_provider`)."""
    PROVIDER_IMPLS[name] = fn
