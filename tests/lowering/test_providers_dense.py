"""Provider implementations against independent dense float64 references (docs/math.md §2.1-2.3).

Every reference below is built from scratch: the loss functions are re-written here (not taken from
`curvplan.lowering._objective`), and the curvature matrices are formed explicitly from `jax.hessian` /
`jax.jacobian` of the *flattened* parameter vector (`ravel_pytree`), then compared with the provider's
matrix-free operators applied to random vectors and to every basis vector.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from curvplan.ir import quantities as q
from curvplan.lowering._objective import PROVIDER_IMPLS, Objective

B = 7  # batch size
D_IN, D_HID = 3, 5


pytestmark = pytest.mark.usefixtures("x64")  # float64 references (tests/conftest.py)


# -- a small MLP 3-5-C (tanh), params a dict; C=None means scalar outputs of shape (B,) ------------------
def init_mlp(seed: int, d_out: int | None):
    rs = np.random.RandomState(seed)
    w2_shape = (D_HID,) if d_out is None else (D_HID, d_out)
    b2_shape = () if d_out is None else (d_out,)
    return {
        "W1": jnp.asarray(rs.randn(D_IN, D_HID)),
        "b1": jnp.asarray(0.5 * rs.randn(D_HID)),
        "W2": jnp.asarray(rs.randn(*w2_shape)),
        "b2": jnp.asarray(0.5 * rs.randn(*b2_shape)),
    }


def mlp(p, x):
    return jnp.tanh(x @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]


# Independent re-implementations of the two losses (the conventions of docs/math.md §2.2/§2.3).
def ref_mse(out, y):
    out = out.reshape(out.shape[0], -1)
    y = y.reshape(out.shape)
    return 0.5 * jnp.sum((out - y) ** 2) / out.shape[0]  # ½·(1/B)·Σ_b ‖F_b − y_b‖²


def ref_ce(logits, labels):
    lse = jax.scipy.special.logsumexp(logits, axis=-1)
    picked = logits[jnp.arange(logits.shape[0]), labels]
    return jnp.sum(lse - picked) / logits.shape[0]


def make_data(seed: int, d_out: int | None, kind: str):
    rs = np.random.RandomState(100 + seed)
    x = jnp.asarray(rs.randn(B, D_IN))
    if kind == "ce":
        y = jnp.asarray(rs.randint(0, d_out, size=B))
    else:
        y = jnp.asarray(rs.randn(B) if d_out is None else rs.randn(B, d_out))
    return x, y


REF_LOSS = {"mse": ref_mse, "ce": ref_ce}
CASES = [("mse", None), ("mse", 2), ("ce", 2), ("ce", 4)]  # (loss kind, output dim)


def setup(kind, d_out, seed=0):
    params = init_mlp(seed, d_out)
    x, y = make_data(seed, d_out, kind)
    flat, unravel = ravel_pytree(params)
    ref_loss_flat = lambda f: REF_LOSS[kind](mlp(unravel(f), x), y)  # noqa: E731
    return params, (x, y), flat, unravel, ref_loss_flat


def run_provider(provider, obj, params, batch, op_q=None, vectors=None):
    """Calls the provider under `jax.jit` (as the runtime does) and applies its operator ``op_q`` to each
    row of ``vectors`` (flat, unraveled to the params pytree).

    Returns ``(values, names, products)``: the non-operator values keyed by quantity name, the names of
    every quantity the provider produced, and the (k, P) operator products (or None)."""
    flat, unravel = ravel_pytree(params)
    names: list[str] = []

    def go(params, batch, vectors):
        vals = PROVIDER_IMPLS[provider](obj, params, batch, None)
        names.extend(sorted(k.name for k in vals))
        prods = None
        if op_q is not None:
            op = vals[op_q]
            prods = jax.vmap(lambda v: ravel_pytree(op.mv(unravel(v)))[0])(vectors)
        keep = {k.name: v for k, v in vals.items() if k.kind not in ("hvp_op", "ggn_op")}
        return keep, prods

    if vectors is None:
        vectors = jnp.zeros((1, flat.size))
    vals, prods = jax.jit(go)(params, batch, vectors)
    return vals, names, (None if prods is None else np.asarray(prods))


def op_matrix_and_products(provider, obj, params, batch, op_q, V):
    """Dense operator matrix (column i = operator applied to basis vector e_i) and the operator applied to
    the columns of V."""
    n = ravel_pytree(params)[0].size
    vecs = jnp.concatenate([jnp.eye(n, dtype=jnp.float64), jnp.asarray(V.T)], axis=0)
    vals, names, prods = run_provider(provider, obj, params, batch, op_q, vecs)
    return vals, names, prods[:n].T, prods[n:].T


def test_x64_is_on_inside_this_module():
    assert jnp.zeros(1).dtype == jnp.float64
    params = init_mlp(0, 2)
    assert all(v.dtype == jnp.float64 for v in jax.tree.leaves(params))


def dense_hessian(loss_flat, flat):
    return np.asarray(jax.jit(jax.hessian(loss_flat))(flat))


def dense_jacobian(model_flat, flat):
    return np.asarray(jax.jit(jax.jacobian(model_flat))(flat))


# -- (a) Hessian ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind,d_out,how", [c + ("loss_fn",) for c in CASES] + [("mse", None, "model_fn"), ("ce", 4, "model_fn")]
)
def test_linearize_grad_hvp_equals_dense_hessian(kind, d_out, how):
    params, batch, flat, unravel, ref_loss_flat = setup(kind, d_out)
    if how == "loss_fn":
        obj = Objective(loss_fn=lambda p, b: REF_LOSS[kind](mlp(p, b[0]), b[1]))
    else:
        obj = Objective(model_fn=mlp, loss_kind=kind)
    n = flat.size
    V = np.random.RandomState(7).randn(n, 3)
    _, names, H_op, HV = op_matrix_and_products("linearize_grad", obj, params, batch, q.hvp_op("hessian"), V)
    assert names == sorted(["%loss", "%grad", q.hvp_op("hessian").name])

    H = dense_hessian(ref_loss_flat, flat)
    assert H.shape == (n, n)
    assert np.abs(H).max() > 1e-3  # the reference is not trivially zero
    np.testing.assert_allclose(HV, H @ V, rtol=0, atol=1e-10 * max(1.0, np.abs(H @ V).max()))
    np.testing.assert_allclose(H_op, H, rtol=0, atol=1e-10)
    # The Hessian of this tanh net is indefinite (unlike any GGN), so the comparison is discriminating.
    assert np.linalg.eigvalsh(0.5 * (H + H.T)).min() < -1e-6


# -- (b) GGN for MSE ------------------------------------------------------------------------------------
@pytest.mark.parametrize("d_out", [None, 2])
def test_linearize_model_ggn_mse_equals_JtJ_over_B(d_out):
    params, batch, flat, unravel, ref_loss_flat = setup("mse", d_out)
    x, y = batch
    obj = Objective(model_fn=mlp, loss_kind="mse")
    n = flat.size
    V = np.random.RandomState(3).randn(n, 3)
    _, names, G_op, GV = op_matrix_and_products("linearize_model", obj, params, batch, q.ggn_op("mse"), V)
    assert q.ggn_op("mse").name in names and q.ggn_op("ce").name not in names

    J = dense_jacobian(lambda f: mlp(unravel(f), x), flat)  # (B, P) or (B, C, P)
    J = J.reshape(B, -1, n)  # (B, C, P), C=1 for scalar outputs
    C = J.shape[1]
    G = sum(J[b].T @ np.eye(C) @ J[b] for b in range(B)) / B  # H_F = I for ½·mean_b‖F_b−y_b‖²

    np.testing.assert_allclose(GV, G @ V, rtol=0, atol=1e-12 * max(1.0, np.abs(G @ V).max()))
    np.testing.assert_allclose(G_op, G, rtol=0, atol=1e-12)

    # Cross-check of the H_F = I convention: the Hessian of the loss w.r.t. the outputs is I / B (a mean
    # over all B·C entries would give I/(B·C) instead).
    out = jax.jit(mlp)(params, x)
    H_out = np.asarray(jax.jit(jax.hessian(lambda o: ref_mse(o, y)))(out)).reshape(out.size, out.size)
    np.testing.assert_allclose(H_out, np.eye(out.size) / B, atol=1e-14)


# -- (c) GGN for softmax cross-entropy ------------------------------------------------------------------
@pytest.mark.parametrize("d_out", [2, 4])
def test_linearize_model_ggn_ce_equals_fisher(d_out):
    params, batch, flat, unravel, ref_loss_flat = setup("ce", d_out)
    x, y = batch
    obj = Objective(model_fn=mlp, loss_kind="ce")
    n = flat.size
    V = np.random.RandomState(5).randn(n, 3)
    _, names, G_op, GV = op_matrix_and_products("linearize_model", obj, params, batch, q.ggn_op("ce"), V)
    assert q.ggn_op("ce").name in names and q.ggn_op("mse").name not in names

    J = dense_jacobian(lambda f: mlp(unravel(f), x), flat)  # (B, C, P)
    logits = np.asarray(jax.jit(mlp)(params, x))
    P = np.exp(logits - logits.max(axis=1, keepdims=True))
    P /= P.sum(axis=1, keepdims=True)
    G = sum(J[b].T @ (np.diag(P[b]) - np.outer(P[b], P[b])) @ J[b] for b in range(B)) / B

    # Independent check of the per-example output Hessian diag(p) − p pᵀ (one example's CE).
    H_b = np.asarray(jax.jit(jax.hessian(lambda z: ref_ce(z[None], y[:1])))(jnp.asarray(logits[0])))
    np.testing.assert_allclose(H_b, np.diag(P[0]) - np.outer(P[0], P[0]), atol=1e-14)

    np.testing.assert_allclose(GV, G @ V, rtol=0, atol=1e-12 * max(1.0, np.abs(G @ V).max()))
    np.testing.assert_allclose(G_op, G, rtol=0, atol=1e-12)
    # The GGN differs from the (indefinite) Hessian on this net, so the check is discriminating.
    H = dense_hessian(ref_loss_flat, flat)
    assert np.abs(G_op - H).max() > 1e-3


# -- (d) loss and gradient from every provider ----------------------------------------------------------
ALL_PROVIDERS = ["loss_only", "value_and_grad", "linearize_grad", "linearize_model"]


@pytest.mark.parametrize("kind,d_out", CASES)
def test_provider_loss_and_grad_match_value_and_grad(kind, d_out):
    params, batch, flat, unravel, ref_loss_flat = setup(kind, d_out, seed=1)
    obj = Objective(model_fn=mlp, loss_kind=kind)
    # All four providers in one compiled program (one compile per case keeps the file fast).
    names: dict[str, list[str]] = {}

    def all_providers(params, batch):
        out = {}
        for prov in ALL_PROVIDERS:
            vals = PROVIDER_IMPLS[prov](obj, params, batch, None)
            names[prov] = sorted(k.name for k in vals)
            out[prov] = {k.name: v for k, v in vals.items() if k.kind not in ("hvp_op", "ggn_op")}
        return out

    got = jax.jit(all_providers)(params, batch)

    ref_l, ref_g = jax.jit(jax.value_and_grad(ref_loss_flat))(flat)
    # The loss value also in plain numpy (no JAX at all in this reference).
    x, y = (np.asarray(a) for a in batch)
    h = np.tanh(x @ np.asarray(params["W1"]) + np.asarray(params["b1"]))
    out = h @ np.asarray(params["W2"]) + np.asarray(params["b2"])
    if kind == "mse":
        np_loss = 0.5 * np.sum((out.reshape(B, -1) - y.reshape(B, -1)) ** 2) / B
    else:
        m = out.max(axis=1, keepdims=True)
        logp = out - m - np.log(np.exp(out - m).sum(axis=1, keepdims=True))
        np_loss = -logp[np.arange(B), y].mean()
    np.testing.assert_allclose(float(ref_l), np_loss, rtol=1e-13)

    assert names["loss_only"] == ["%loss"]
    for prov in ALL_PROVIDERS:
        vals = got[prov]
        np.testing.assert_allclose(float(vals["%loss"]), np_loss, rtol=1e-12, err_msg=prov)
        assert vals["%loss"].dtype == jnp.float64
        if prov == "loss_only":
            continue
        assert jax.tree.structure(vals["%grad"]) == jax.tree.structure(params)
        g, _ = ravel_pytree(vals["%grad"])
        np.testing.assert_allclose(np.asarray(g), np.asarray(ref_g), rtol=0, atol=1e-12, err_msg=prov)
    np.testing.assert_allclose(np.asarray(got["linearize_model"]["%outputs"]), out, atol=1e-13)


@pytest.mark.parametrize("provider", ["value_and_grad", "linearize_grad"])
def test_loss_fn_objective_loss_grad_hessian(provider):
    """Same with a plain `loss_fn` objective (no model): a non-quadratic loss of a dict of arrays."""
    rs = np.random.RandomState(11)
    params = {"a": jnp.asarray(rs.randn(3, 2)), "c": jnp.asarray(rs.randn(4))}
    batch = jnp.asarray(rs.randn(3, 4))

    def f(p, b):
        return jnp.sum(jnp.sin(p["a"].T @ b) ** 2) + jnp.sum(jnp.exp(0.3 * p["c"]) * b[0])

    flat, unravel = ravel_pytree(params)
    loss_flat = lambda v: f(unravel(v), batch)  # noqa: E731
    ref_l, ref_g = jax.jit(jax.value_and_grad(loss_flat))(flat)
    obj = Objective(loss_fn=f)
    if provider == "linearize_grad":
        V = np.random.RandomState(2).randn(flat.size, 2)
        vals, _, H_op, HV = op_matrix_and_products(provider, obj, params, batch, q.hvp_op("hessian"), V)
        H = dense_hessian(loss_flat, flat)
        np.testing.assert_allclose(H_op, H, rtol=0, atol=1e-10)
        np.testing.assert_allclose(HV, H @ V, rtol=0, atol=1e-10 * max(1.0, np.abs(H @ V).max()))
    else:
        vals, _, _ = run_provider(provider, obj, params, batch)
    np.testing.assert_allclose(float(vals["%loss"]), float(ref_l), rtol=1e-13)
    np.testing.assert_allclose(np.asarray(ravel_pytree(vals["%grad"])[0]), np.asarray(ref_g), atol=1e-12)

