"""Estimators against dense float64 references: Hutchinson trace (and its probes shared with the diagonal),
Gauss-Newton-Bartlett diagonal, Lanczos extreme eigenvalues, spatial averaging (docs/math.md §2.6-2.7, §5).

Statistical tolerances are derived from each estimator's variance (comments say how); the exact expectation
of GNB is computed by enumerating every label draw.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ctx_for
from jax.flatten_util import ravel_pytree

import curvplan as cp
from curvplan.ir import quantities as q
from curvplan.lowering._objective import PROVIDER_IMPLS, Objective
from curvplan.modules import DiagEMA, DiagonalDirection, Hessian, HutchinsonDiag, LinearOperator, UpdateTail
from curvplan.modules._base import Inputs
from curvplan.modules._presets_second_order import hutchinson_estimates
from curvplan.modules.estimators._gnb import GNBDiag
from curvplan.modules.estimators._lanczos import Lanczos, lanczos_ritz_values
from curvplan.modules.estimators._probes import HutchinsonProbes, HutchinsonTrace, ProbeDiag, probes
from curvplan.modules.preconditioners._spatial import SpatialAverage, spatial_average
from curvplan.modules.solvers._direct import IdentitySolve

pytestmark = pytest.mark.usefixtures("x64")  # float64 references (tests/conftest.py)


def sym(rs, n):
    M = rs.randn(n, n)
    return 0.5 * (M + M.T)


# -- Hutchinson trace from shared probes ----------------------------------------------------------------
def trace_estimate(A, S, key, params=None):
    params = jnp.zeros(A.shape[0]) if params is None else params
    flat0, unravel = ravel_pytree(params)
    Aj = jnp.asarray(A)
    op = LinearOperator(lambda v: unravel(Aj @ ravel_pytree(v)[0]))

    @jax.jit
    def run(key):
        ctx = ctx_for(params, key)
        p, _, p_info = HutchinsonProbes(probes=S).apply(Inputs({"op": op, "rng": key}, "probes"), (), ctx)
        t, _, t_info = HutchinsonTrace(probes=S).apply(Inputs(p, "trace"), (), ctx)
        d, _ = ProbeDiag(probes=S).apply(Inputs(p, "diag"), (), ctx)
        return t["trace"], d["diag"], p_info | t_info
    return run(key)


def test_hutchinson_trace_unbiased_within_derived_bound():
    # Derivation. zᵀAz = Σ_i A_ii + Σ_{i≠j} A_ij z_i z_j for Rademacher z (z_i² = 1). The products z_i z_j
    # (i<j) are pairwise uncorrelated with variance 1, so Var(zᵀAz) = Σ_{i<j} (2A_ij)² = 2 Σ_{i≠j} A_ij².
    # The mean of S probes has std σ/√S; we require |est − tr A| <= 5σ/√S (5 sigma; seeds fixed).
    rs = np.random.RandomState(0)
    n, S = 15, 4000
    A = sym(rs, n) + np.diag(rs.uniform(-2, 4, n))
    sigma = np.sqrt(2 * ((A**2).sum() - (np.diag(A) ** 2).sum()))
    zs = []
    for seed in range(3):
        t, d, info = trace_estimate(A, S, jax.random.key(seed))
        zs.append((float(t) - np.trace(A)) / (sigma / np.sqrt(S)))
        # the reported standard error estimates σ/√S (relative error of a sample std at S = 4000 is ~2%)
        assert 0.85 < float(info["trace_stderr"]) / (sigma / np.sqrt(S)) < 1.15
        assert int(info["hutchinson_probes"]) == S
        # same probes: the trace estimate is exactly the sum of the diagonal estimate
        np.testing.assert_allclose(float(t), float(jnp.sum(d)), rtol=1e-12)
    assert max(abs(z) for z in zs) <= 5
    # exact for a diagonal matrix (no cross terms), even with one probe
    t, _, _ = trace_estimate(np.diag(np.arange(1.0, 6.0)), 1, jax.random.key(3))
    assert float(t) == 15.0


def test_hutchinson_trace_on_pytree_params():
    rs = np.random.RandomState(1)
    params = {"w": jnp.zeros((2, 3)), "c": jnp.zeros(4)}
    A = sym(rs, 10)
    S = 4000
    t, _, _ = trace_estimate(A, S, jax.random.key(1), params)
    sigma = np.sqrt(2 * ((A**2).sum() - (np.diag(A) ** 2).sum()))
    assert abs(float(t) - np.trace(A)) <= 5 * sigma / np.sqrt(S)


def test_probes_are_shared_in_the_plan():
    """Diagonal and trace in one plan: one `hutchinson_probes` op, and at every step the reported trace is the
    sum of the diagonal fed to DiagEMA (checked through DiagEMA(beta=0), whose output is that diagonal)."""
    mods = [Hessian()] + hutchinson_estimates(probes=3) + [
        DiagEMA(beta=0.0, estimate=(("est", "hutchinson"), ("probes", 3))), DiagonalDirection(mode="sophia"),
        UpdateTail(source="diag", learning_rate=0.0)]
    plan = cp.compile_plan(mods)
    text = str(plan)
    assert text.count("hutchinson_probes(") == 1 and probes(3).name in text
    rs = np.random.RandomState(2)
    A = jnp.asarray(sym(rs, 6))
    opt = cp.Optimizer(plan, loss_fn=lambda x, b: 0.5 * x @ b @ x)
    x = jnp.asarray(rs.randn(6))
    state = opt.init(x)
    for t in range(2):
        x, state, info = opt.step(x, state, A, rng=jax.random.key(t))
        diag = state.slots[plan.names[q.quantity("precond", "diag")]]
        np.testing.assert_allclose(float(info.trace), float(jnp.sum(diag)), rtol=1e-6)


def test_tagged_hutchinson_diag_feeds_diag_ema():
    """Regression: `HutchinsonDiag(tag="h")` returned its output under the tagged key, which lowering did not
    find. With a separable loss the Hessian is diagonal, so every Rademacher probe gives diag(H) exactly, and
    the carried `%precond.diag` must be the bias-corrected EMA of the closed-form diagonals at each iterate."""
    mods = [Hessian(), HutchinsonDiag(tag="h"), DiagEMA(take=(("diag.curvature", "h"),)), DiagonalDirection(),
            UpdateTail(source="diag")]
    plan = cp.compile_plan(mods)
    assert "diag_ema(%diag.curvature:h)" in str(plan), str(plan)
    c = jnp.asarray([0.5, 1.0, 2.0, 3.0])
    # L(x) = Σ c_i (x_i²/2 + x_i⁴/12): H = diag(c (1 + x²))
    opt = cp.Optimizer(plan, loss_fn=lambda x, b: jnp.sum(b * (0.5 * x**2 + x**4 / 12)))
    x = jnp.asarray([1.0, -0.5, 0.25, 2.0])
    state = opt.init(x)
    beta, v = DiagEMA().beta, np.zeros(4)
    for t in range(3):
        v = beta * v + (1 - beta) * np.asarray(c) * (1 + np.asarray(x) ** 2)
        x, state, info = opt.step(x, state, c, rng=jax.random.key(t))
        assert not bool(info.skipped) and np.all(np.isfinite(np.asarray(x)))
        got = np.asarray(state.slots[plan.names[q.precond_diag()]])
        np.testing.assert_allclose(got, v / (1 - beta ** (t + 1)), rtol=1e-12)


# -- Gauss-Newton-Bartlett ------------------------------------------------------------------------------
B, D_IN, D_HID = 3, 2, 3


def mlp(p, x):
    return jnp.tanh(x @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]


def gnb_setup(kind, C, seed=0):
    rs = np.random.RandomState(seed)
    params = {"W1": jnp.asarray(rs.randn(D_IN, D_HID)), "b1": jnp.asarray(rs.randn(D_HID) * 0.5),
              "W2": jnp.asarray(rs.randn(D_HID, C)), "b2": jnp.asarray(rs.randn(C) * 0.5)}
    x = jnp.asarray(rs.randn(B, D_IN))
    y = jnp.asarray(rs.randint(0, C, B)) if kind == "ce" else jnp.asarray(rs.randn(B, C))
    flat0, unravel = ravel_pytree(params)
    J = np.asarray(jax.jit(jax.jacobian(lambda f: mlp(unravel(f), x)))(flat0))  # (B, C, n)
    return params, (x, y), J


def gnb_estimate(kind, params, batch, S, key):
    @jax.jit
    def run(key):
        vals = PROVIDER_IMPLS["linearize_model"](Objective(model_fn=mlp, loss_kind=kind), params, batch, None)
        inputs = Inputs({"fisher": vals[q.fisher_op("sampled")], "rng": key}, "gnb")
        out, _, info = GNBDiag(samples=S).apply(inputs, (), ctx_for(params, key))
        return ravel_pytree(out["diag"])[0], info["gnb_samples"]
    est, samples = run(key)
    assert int(samples) == S
    return np.asarray(est)


def test_gnb_ce_exact_expectation_by_enumeration_and_unbiased_mc():
    C = 3
    params, (x, y), J = gnb_setup("ce", C)
    p = np.asarray(jax.nn.softmax(mlp(params, x), axis=-1))
    # dense GGN-CE diagonal: (1/B) Σ_b J_bᵀ (diag p_b − p_b p_bᵀ) J_b
    G = sum(J[b].T @ (np.diag(p[b]) - np.outer(p[b], p[b])) @ J[b] for b in range(B)) / B
    # Exact distribution of d = B·ĝ⊙ĝ, ĝ = (1/B) Σ_b J_bᵀ (p_b − e_{ŷ_b}): enumerate all C^B label draws.
    mean = np.zeros(G.shape[0])
    second = np.zeros(G.shape[0])
    for labels in itertools.product(range(C), repeat=B):
        prob = np.prod([p[b, labels[b]] for b in range(B)])
        ghat = sum(J[b].T @ (p[b] - np.eye(C)[labels[b]]) for b in range(B)) / B
        d = B * ghat**2
        mean += prob * d
        second += prob * d**2
    np.testing.assert_allclose(mean, np.diag(G), rtol=1e-12, atol=1e-14)  # unbiased, exactly
    sigma = np.sqrt(second - mean**2)
    # Monte Carlo: the module's mean of S draws has std σ_i/√S per coordinate; 5-sigma bound (fixed keys).
    S = 4000
    est = gnb_estimate("ce", params, (x, jnp.asarray(np.asarray(y))), S, jax.random.key(0))
    assert np.all(np.abs(est - np.diag(G)) <= 5 * sigma / np.sqrt(S) + 1e-12)
    # and it is genuinely random (not the exact diagonal by construction)
    assert np.any(np.abs(est - np.diag(G)) > 0.05 * sigma / np.sqrt(S))


def test_gnb_mse_unbiased_with_closed_form_variance():
    # MSE: ŷ_b ~ N(F_b, I), ĝ = −(1/B) Σ_b J_bᵀ ε_b is Gaussian per coordinate with variance
    # v_i = (1/B²) Σ_b ‖J_b[:, i]‖², so d_i = B ĝ_i² = diag(G)_i · χ²₁: mean diag(G)_i, std √2 · diag(G)_i.
    C = 2
    params, batch, J = gnb_setup("mse", C, seed=1)
    Gd = np.einsum("bci,bci->i", J, J) / B
    S = 4000
    est = gnb_estimate("mse", params, batch, S, jax.random.key(1))
    assert np.all(np.abs(est - Gd) <= 5 * np.sqrt(2) * Gd / np.sqrt(S) + 1e-12)


# -- Lanczos --------------------------------------------------------------------------------------------
def ritz(A, iters, seed=0):
    Aj = jnp.asarray(A)
    v0 = jnp.asarray(np.random.RandomState(seed).randn(A.shape[0]))
    run = jax.jit(lambda v: lanczos_ritz_values(lambda u: Aj @ u, v, iters, jax.random.key(seed)))
    return np.asarray(run(v0))


def test_lanczos_full_run_gives_every_eigenvalue():
    rs = np.random.RandomState(3)
    A = sym(rs, 25)
    np.testing.assert_allclose(ritz(A, 25), np.linalg.eigvalsh(A), atol=1e-10)
    # repeated eigenvalues make the Krylov space invariant early: the restart keeps going (breakdown path)
    Q, _ = np.linalg.qr(rs.randn(12, 12))
    w = np.array([-2.0, -2.0, -2.0, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0, 3.0, 3.0, 7.0])
    A = (Q * w) @ Q.T
    np.testing.assert_allclose(ritz(0.5 * (A + A.T), 12), w, atol=1e-10)


def test_lanczos_extremes_converge_before_the_rest():
    rs = np.random.RandomState(4)
    Q, _ = np.linalg.qr(rs.randn(60, 60))
    w = np.concatenate([[-6.0, -5.0], np.linspace(0.0, 1.0, 56), [9.0, 10.0]])
    A = (Q * w) @ Q.T
    r = ritz(0.5 * (A + A.T), 30)
    np.testing.assert_allclose([r[0], r[1], r[-2], r[-1]], [-6.0, -5.0, 9.0, 10.0], atol=1e-8)


@pytest.mark.parametrize("which,expect", [("largest", lambda w: w[::-1][:2]), ("smallest", lambda w: w[:2]),
                                          ("both", lambda w: np.concatenate([w[:2], w[::-1][:2]]))])
def test_lanczos_module_on_mlp_hessian(which, expect):
    rs = np.random.RandomState(5)
    params = {"W1": jnp.asarray(rs.randn(2, 3)), "W2": jnp.asarray(rs.randn(3))}
    x, y = jnp.asarray(rs.randn(8, 2)), jnp.asarray(rs.randn(8))
    loss = lambda p, b: 0.5 * jnp.mean((jnp.tanh(b[0] @ p["W1"]) @ p["W2"] - b[1]) ** 2)  # noqa: E731
    flat0, unravel = ravel_pytree(params)
    w = np.linalg.eigvalsh(np.asarray(jax.hessian(lambda f: loss(unravel(f), (x, y)))(flat0)))
    mods = [Hessian(), Lanczos(iters=9, k=2, which=which), IdentitySolve(), UpdateTail(learning_rate=0.0)]
    plan = cp.compile_plan(mods)
    opt = cp.Optimizer(plan, loss_fn=loss)
    _, state, info = opt.step(params, opt.init(params), (x, y), rng=jax.random.key(0))
    got = [float(info.eig_min), float(info.eig_max)]
    np.testing.assert_allclose(got, [w[0], w[-1]], rtol=1e-5, atol=1e-6)
    assert int(info.lanczos_iters) == 9

    @jax.jit
    def direct(params):
        vals = PROVIDER_IMPLS["linearize_grad"](Objective(loss_fn=loss), params, (x, y), None)
        inputs = Inputs({"op": vals[q.hvp_op("hessian")], "rng": jax.random.key(1)}, "lanczos")
        out, _, _ = Lanczos(iters=9, k=2, which=which).apply(inputs, (), ctx_for(params, None))
        return out["eigvals"]
    np.testing.assert_allclose(np.asarray(direct(params)), expect(w), atol=1e-9)


# -- spatial averaging ----------------------------------------------------------------------------------
def test_spatial_average_axes_for_flax_kernels():
    rs = np.random.RandomState(6)
    d = {"conv": rs.randn(3, 3, 4, 5), "conv1d": rs.randn(5, 2, 3), "dense": rs.randn(4, 5),
         "bias": rs.randn(5)}
    out = jax.tree.map(lambda x: np.asarray(spatial_average(jnp.asarray(x))), d)
    # (kh, kw, in, out): every (i, o) gets the mean over the 9 spatial taps of |d[:, :, i, o]|
    for i in range(4):
        for o in range(5):
            np.testing.assert_allclose(out["conv"][:, :, i, o], np.abs(d["conv"][:, :, i, o]).mean())
    for i in range(2):
        for o in range(3):
            np.testing.assert_allclose(out["conv1d"][:, i, o], np.abs(d["conv1d"][:, i, o]).mean())
    np.testing.assert_allclose(out["dense"], np.abs(d["dense"]))  # dense (in, out): no averaging by default
    np.testing.assert_allclose(out["bias"], np.abs(d["bias"]))
    dense_in = np.asarray(spatial_average(jnp.asarray(d["dense"]), absolute=False, dense_inputs=True))
    for o in range(5):  # Somax's per-output-unit average, on flax's input axis 0
        np.testing.assert_allclose(dense_in[:, o], d["dense"][:, o].mean())
    # the module maps the whole tree and renames the quantity
    from curvplan.modules._base import Inputs

    mod = SpatialAverage()
    res, _ = mod.apply(Inputs({"curvature": jax.tree.map(jnp.asarray, d)}, "spatial_average"), (), ctx_for(None))
    got = res["curvature"]
    np.testing.assert_allclose(np.asarray(got["conv"]), out["conv"])
