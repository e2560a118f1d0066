"""Fisher operators against dense float64 references (docs/math.md §2.4, §2.7).

- Empirical Fisher: the ``per_example_grads`` provider's operator equals (1/B) Σ_b g_b g_bᵀ with g_b from an
  explicit Python loop of `jax.grad` over single examples (and differs from g gᵀ).
- Sampled Fisher: ``linearize_model`` really produces ``%fisher_op.sampled``; its operator equals the dense
  (1/B) Σ_b J_bᵀ e_b e_bᵀ J_b for the residuals it drew, and those residuals have E[e eᵀ] = Λ_b (the GGN's
  output Hessian), checked by Monte Carlo with a tolerance from the exact variance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import curvplan as cp
from curvplan.ir import quantities as q
from curvplan.lowering._objective import PROVIDER_IMPLS, Objective
from curvplan.modules import ConstantDamping, UpdateTail
from curvplan.modules.curvature._fisher import EmpiricalFisher, SampledFisher
from curvplan.modules.solvers._direct import DenseDirect

pytestmark = pytest.mark.usefixtures("x64")  # float64 references (tests/conftest.py)

B, D_IN, D_HID, C = 5, 3, 4, 3


def mlp(p, x):
    return jnp.tanh(x @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]


def setup(kind, seed=0):
    rs = np.random.RandomState(seed)
    params = {"W1": jnp.asarray(rs.randn(D_IN, D_HID)), "b1": jnp.asarray(0.5 * rs.randn(D_HID)),
              "W2": jnp.asarray(rs.randn(D_HID, C)), "b2": jnp.asarray(0.5 * rs.randn(C))}
    x = jnp.asarray(rs.randn(B, D_IN))
    y = jnp.asarray(rs.randint(0, C, B)) if kind == "ce" else jnp.asarray(rs.randn(B, C))
    return params, (x, y)


def example_loss(kind, p, x, y):
    """ℓ for one example, written independently of curvplan."""
    f = mlp(p, x)
    if kind == "ce":
        return jax.scipy.special.logsumexp(f) - f[y]
    return 0.5 * jnp.sum((f - y) ** 2)


def op_matrix(op, params):
    flat0, unravel = ravel_pytree(params)
    return jax.vmap(lambda e: ravel_pytree(op.mv(unravel(e)))[0], out_axes=1)(jnp.eye(flat0.size))


@pytest.mark.parametrize("kind", ["ce", "mse"])
@pytest.mark.parametrize("how", ["loss_fn", "model_fn"])
def test_empirical_fisher_equals_per_example_loop(kind, how):
    params, (x, y) = setup(kind)
    # reference: a Python loop over examples
    gs = np.stack([np.asarray(ravel_pytree(jax.grad(example_loss, argnums=1)(kind, params, x[b], y[b]))[0])
                   for b in range(B)])
    losses = [float(example_loss(kind, params, x[b], y[b])) for b in range(B)]
    E_ref = gs.T @ gs / B
    g_ref = gs.mean(axis=0)
    if how == "loss_fn":
        def loss_fn(p, bt):
            return jnp.mean(jax.vmap(lambda a, t: example_loss(kind, p, a, t))(*bt))

        obj = Objective(loss_fn=loss_fn)
    else:
        obj = Objective(model_fn=mlp, loss_kind=kind)

    @jax.jit
    def run(params, batch):
        vals = PROVIDER_IMPLS["per_example_grads"](obj, params, batch, None)
        E = op_matrix(vals[q.fisher_op("empirical")], params)
        return vals[q.loss()], ravel_pytree(vals[q.grad()])[0], E

    loss, g, E = (np.asarray(a) for a in run(params, (x, y)))
    np.testing.assert_allclose(loss, np.mean(losses), rtol=1e-12)
    np.testing.assert_allclose(g, g_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(E, E_ref, rtol=1e-10, atol=1e-12)
    # not the outer product of the mean gradient, and its diagonal is not g ⊙ g
    assert np.linalg.norm(E - np.outer(g, g)) > 0.1 * np.linalg.norm(E)
    assert np.linalg.norm(np.diag(E) - g * g) > 0.1 * np.linalg.norm(np.diag(E))


def test_empirical_fisher_newton_step_and_plan():
    kind, lam = "ce", 0.2
    params, batch = setup(kind, seed=1)
    x, y = batch
    gs = np.stack([np.asarray(ravel_pytree(jax.grad(example_loss, argnums=1)(kind, params, x[b], y[b]))[0])
                   for b in range(B)])
    g = gs.mean(axis=0)
    ref = np.linalg.solve(gs.T @ gs / B + lam * np.eye(len(g)), g)
    mods = [EmpiricalFisher(), ConstantDamping(lam=lam), DenseDirect(), UpdateTail()]
    plan = cp.compile_plan(mods)
    assert "per_example_grads(params, batch)" in str(plan)
    opt = cp.Optimizer(plan, model_fn=mlp, loss=kind)
    new, _, info = opt.step(params, opt.init(params), batch)
    step = np.asarray(ravel_pytree(params)[0] - ravel_pytree(new)[0])
    np.testing.assert_allclose(step, ref, rtol=1e-9)


@pytest.mark.parametrize("kind", ["ce", "mse"])
def test_sampled_fisher_operator_matches_dense_formula(kind):
    params, (x, y) = setup(kind, seed=2)
    flat0, unravel = ravel_pytree(params)
    J = np.asarray(jax.jacobian(lambda f: mlp(unravel(f), x))(flat0))  # (B, C, n)
    key = jax.random.key(3)

    @jax.jit
    def run(params, batch):
        vals = PROVIDER_IMPLS["linearize_model"](Objective(model_fn=mlp, loss_kind=kind), params, batch, None)
        sampler = vals[q.fisher_op("sampled")]  # the provider produces the quantity it declares
        return sampler.residuals(key, 1)[0], op_matrix(sampler.operator(key), params)

    e, F = (np.asarray(a) for a in run(params, (x, y)))
    F_ref = sum(np.outer(J[b].T @ e[b], J[b].T @ e[b]) for b in range(B)) / B
    np.testing.assert_allclose(F, F_ref, rtol=1e-10, atol=1e-12)
    # the residuals are of the declared kind: p − onehot(ŷ) (CE) or Gaussian noise (MSE)
    if kind == "ce":
        p = np.asarray(jax.nn.softmax(mlp(params, x), axis=-1))
        onehot = p - e
        assert np.allclose(onehot.sum(axis=1), 1) and np.allclose(onehot, np.round(onehot), atol=1e-12)


def test_sampled_residuals_second_moment_is_output_hessian():
    """E[e_b e_bᵀ] = diag(p_b) − p_b p_bᵀ for CE. Each entry of e eᵀ takes C values (one per label), so its
    exact variance is computed by enumerating the labels; the mean of S draws must be within 5σ/√S."""
    params, (x, y) = setup("ce", seed=4)
    S = 20000
    out = jnp.asarray(mlp(params, x))

    @jax.jit
    def draws(params, batch):
        vals = PROVIDER_IMPLS["linearize_model"](Objective(model_fn=mlp, loss_kind="ce"), params, batch, None)
        e = vals[q.fisher_op("sampled")].residuals(jax.random.key(5), S)  # (S, B, C)
        return jnp.mean(e[..., :, None] * e[..., None, :], axis=0)

    M = np.asarray(draws(params, (x, y)))
    p = np.asarray(jax.nn.softmax(out, axis=-1))
    for b in range(B):
        Lam = np.diag(p[b]) - np.outer(p[b], p[b])
        outcomes = [np.outer(p[b] - np.eye(C)[k], p[b] - np.eye(C)[k]) for k in range(C)]
        mean = sum(p[b, k] * outcomes[k] for k in range(C))
        np.testing.assert_allclose(mean, Lam, atol=1e-14)  # the algebra: E[e eᵀ] = Λ_b
        var = sum(p[b, k] * outcomes[k] ** 2 for k in range(C)) - mean**2
        assert np.all(np.abs(M[b] - Lam) <= 5 * np.sqrt(var / S) + 1e-12)


def test_sampled_fisher_module_in_a_plan():
    kind, lam = "ce", 0.5
    params, batch = setup(kind, seed=6)
    mods = [SampledFisher(), ConstantDamping(lam=lam), DenseDirect(), UpdateTail()]
    plan = cp.compile_plan(mods)
    assert "%fisher_op.sampled" in str(plan) and "linearize_model" in str(plan)
    opt = cp.Optimizer(plan, model_fn=mlp, loss=kind)
    new, _, _ = opt.step(params, opt.init(params), batch, rng=jax.random.key(0))
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(new))
    with pytest.raises(cp.Error, match="rng"):
        opt.step(params, opt.init(params), batch)
