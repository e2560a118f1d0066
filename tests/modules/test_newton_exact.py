"""End-to-end exactness of Newton-CG and Gauss-Newton-CG through the public `curvplan.Optimizer`, and the
Hutchinson diagonal estimator against a dense matrix with a derived statistical tolerance. The exact steps
turn the presets' trust radius off (``radius=None``): it exists to stop a full step, and these take one.

The default radius itself is checked on a near-singular quadratic: the step stops on ‖s‖ = 1."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import cg_iterations

import curvplan
from curvplan.modules import Context, HutchinsonDiag, LinearOperator
from curvplan.modules._base import Inputs
from curvplan.modules.estimators._hutchinson import rademacher_like

pytestmark = pytest.mark.usefixtures("x64")  # float64 references (tests/conftest.py)


def spd(rs, n, cond):
    Q, R = np.linalg.qr(rs.randn(n, n))
    Q = Q * np.sign(np.diag(R))
    A = (Q * np.logspace(0, np.log10(cond), n)) @ Q.T
    return 0.5 * (A + A.T)


# -- Newton-CG, λ = 0, on a strictly convex quadratic ---------------------------------------------------
@pytest.mark.parametrize("cond", [10.0, 1e2])
def test_newton_step_solves_quadratic_exactly(cond):
    n = 20
    rs = np.random.RandomState(0)
    A, b = spd(rs, n, cond), rs.randn(n)
    x_star = np.linalg.solve(A, b)

    def loss_fn(x, batch):
        A_, b_ = batch
        return 0.5 * x @ A_ @ x - b_ @ x

    # CG in floating point can need more than n steps for a 1e-12 relative residual (loss of orthogonality):
    # give it the iterations the condition-number bound asks for, never a count at the edge of rounding.
    maxiter = cg_iterations(np.linalg.cond(A), 1e-12)
    opt = curvplan.Optimizer(curvplan.presets.newton_cg(lam=0.0, tol=1e-12, maxiter=maxiter, radius=None),
                             loss_fn=loss_fn)
    x0 = jnp.zeros(n)
    state = opt.init(x0)
    x1, state, info = opt.step(x0, state, (jnp.asarray(A), jnp.asarray(b)))
    assert x1.dtype == jnp.float64
    assert bool(info.cg_converged), (int(info.cg_iters), float(info.cg_residual))
    assert not bool(info.cg_negative_curvature)
    assert 1 <= int(info.cg_iters) <= maxiter
    np.testing.assert_allclose(np.asarray(x1), x_star, rtol=0, atol=1e-8 * np.abs(x_star).max())
    # The loss it reports is the loss at x0 = 0.
    np.testing.assert_allclose(float(info.loss), 0.0, atol=1e-12)

    # From a nonzero start the step is also exact (x1 = x0 − A⁻¹(A x0 − b) = x*).
    x0 = jnp.asarray(rs.randn(n))
    x1b, _, _ = opt.step(x0, opt.init(x0), (jnp.asarray(A), jnp.asarray(b)))
    np.testing.assert_allclose(np.asarray(x1b), x_star, rtol=0, atol=1e-8 * np.abs(x_star).max())


def test_newton_step_on_pytree_params_block_diagonal_quadratic():
    """Params as a dict: loss Σ_k ½ x_kᵀA_kx_k − b_kᵀx_k has a block-diagonal Hessian; one step solves it."""
    rs = np.random.RandomState(1)
    A1, A2 = spd(rs, 6, 10.0), spd(rs, 4, 10.0)
    b1, b2 = rs.randn(6), rs.randn(4)
    M = np.zeros((10, 10))
    M[:6, :6], M[6:, 6:] = A1, A2
    C = np.asarray(rs.randn(6, 4)) * 0.1  # couple the blocks so the Hessian is not block diagonal
    M[:6, 6:], M[6:, :6] = C, C.T
    assert np.linalg.eigvalsh(M).min() > 0
    ref = np.linalg.solve(M, np.concatenate([b1, b2]))

    def loss_fn(p, batch):
        A1_, A2_, C_, b1_, b2_ = batch
        u, v = p["u"], p["v"]
        return 0.5 * (u @ A1_ @ u + v @ A2_ @ v) + u @ C_ @ v - b1_ @ u - b2_ @ v

    opt = curvplan.Optimizer(curvplan.presets.newton_cg(lam=0.0, radius=None, tol=1e-12, maxiter=cg_iterations(
        np.linalg.cond(M), 1e-12)), loss_fn=loss_fn)
    p0 = {"u": jnp.zeros(6), "v": jnp.zeros(4)}
    p1, _, info = opt.step(p0, opt.init(p0), tuple(jnp.asarray(a) for a in (A1, A2, C, b1, b2)))
    got = np.concatenate([np.asarray(p1["u"]), np.asarray(p1["v"])])
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-8 * np.abs(ref).max())


# -- Gauss-Newton-CG on linear least squares ------------------------------------------------------------
def test_gauss_newton_step_equals_lstsq():
    rs = np.random.RandomState(2)
    X = rs.randn(50, 8) * np.logspace(0, 1, 8)  # columns of different scales
    y = X @ rs.randn(8) + 0.3 * rs.randn(50)
    w_ref = np.linalg.lstsq(X, y, rcond=None)[0]
    opt = curvplan.Optimizer(
        curvplan.presets.gauss_newton_cg(loss="mse", lam=0.0, radius=None, tol=1e-12,
                                         maxiter=cg_iterations(np.linalg.cond(X.T @ X), 1e-12)),
        model_fn=lambda w, x: x @ w, loss="mse",
    )
    w0 = jnp.zeros(8)
    w1, state, info = opt.step(w0, opt.init(w0), (jnp.asarray(X), jnp.asarray(y)))
    assert w1.dtype == jnp.float64
    assert bool(info.cg_converged)
    np.testing.assert_allclose(np.asarray(w1), w_ref, rtol=0, atol=1e-8 * np.abs(w_ref).max())
    # Loss reported at w0 = 0 is ½·mean(y²).
    # (StepInfo telemetry is float32 by design, even under x64: compare to float32 precision.)
    np.testing.assert_allclose(float(info.loss), 0.5 * np.mean(y**2), rtol=1e-6)
    # A second step from the optimum does nothing (gradient zero up to rounding).
    w2, _, info2 = opt.step(w1, state, (jnp.asarray(X), jnp.asarray(y)))
    np.testing.assert_allclose(np.asarray(w2), w_ref, rtol=0, atol=1e-8 * np.abs(w_ref).max())
    np.testing.assert_allclose(float(info2.loss), 0.5 * np.mean((X @ w_ref - y) ** 2), rtol=1e-6)


def test_gauss_newton_vector_output_least_squares():
    """Vector outputs (W is 5x3): the GGN step is the per-column lstsq solution (H_F = I convention)."""
    rs = np.random.RandomState(3)
    X, Y = rs.randn(40, 5), rs.randn(40, 3)
    W_ref = np.linalg.lstsq(X, Y, rcond=None)[0]
    opt = curvplan.Optimizer(
        curvplan.presets.gauss_newton_cg(loss="mse", lam=0.0, radius=None, tol=1e-12,
                                         maxiter=cg_iterations(np.linalg.cond(X.T @ X), 1e-12)),
        model_fn=lambda W, x: x @ W, loss="mse",
    )
    W0 = jnp.zeros((5, 3))
    W1, _, info = opt.step(W0, opt.init(W0), (jnp.asarray(X), jnp.asarray(Y)))
    np.testing.assert_allclose(np.asarray(W1), W_ref, rtol=0, atol=1e-8 * np.abs(W_ref).max())


# -- Hutchinson diagonal --------------------------------------------------------------------------------
def hutchinson(A, probes, key, params=None):
    n = A.shape[0]
    Aj = jnp.asarray(A)
    params = jnp.zeros(n) if params is None else params
    mod = HutchinsonDiag(probes=probes)
    ctx = Context(step=jnp.zeros((), jnp.int32), rng=key, params=params, batch=None, objective=None,
                  module="hutch")
    out, _ = mod.apply(Inputs({"op": LinearOperator(lambda v: Aj @ v), "rng": key}, "hutch"), (), ctx)
    d = out["diag"]
    return np.asarray(d)


def test_hutchinson_diag_within_derived_bound():
    # Derivation. For one Rademacher probe z (z_j = ±1 i.i.d.), coordinate i of z ⊙ Az is
    #     z_i (Az)_i = A_ii z_i² + Σ_{j≠i} A_ij z_i z_j = A_ii + Σ_{j≠i} A_ij z_i z_j.
    # For fixed i the products z_i z_j (j ≠ i) are themselves i.i.d. Rademacher, so the estimate is unbiased
    # with variance σ_i² = Σ_{j≠i} A_ij². The mean over S independent probes has standard deviation σ_i/√S.
    # We require |est_i − A_ii| <= 5 σ_i / √S for every i (a 5-sigma bound; with n = 12 coordinates and a
    # near-Gaussian mean at S = 4000, the chance that a correct estimator fails is ~12·6e-7, and the keys
    # are fixed anyway). An estimator that reused one probe S times would have std σ_i, not σ_i/√S, and
    # would fail this bound on essentially every coordinate.
    rs = np.random.RandomState(4)
    n, S = 12, 4000
    M = rs.randn(n, n)
    A = 0.5 * (M + M.T) + np.diag(rs.uniform(-3, 3, n))  # symmetric, indefinite
    sigma = np.sqrt((A**2).sum(axis=1) - np.diag(A) ** 2)
    bound = 5 * sigma / np.sqrt(S)
    for seed in range(3):
        est = hutchinson(A, S, jax.random.key(seed))
        assert est.shape == (n,) and est.dtype == np.float64
        err = np.abs(est - np.diag(A))
        assert np.all(err <= bound), (err / (sigma / np.sqrt(S))).max()
    # The estimate is genuinely noisy at this S (the bound is not loose by orders of magnitude): the
    # normalised errors have roughly unit spread.
    z = (est - np.diag(A)) / (sigma / np.sqrt(S))
    assert 0.2 < np.std(z) < 3.0


def test_hutchinson_exact_for_diagonal_matrix_and_probes_are_rademacher():
    # Σ_{j≠i} A_ij² = 0 for a diagonal A: every probe gives diag(A) exactly, even S = 1.
    d = np.linspace(-2.0, 5.0, 9)
    np.testing.assert_array_equal(hutchinson(np.diag(d), 1, jax.random.key(0)), d)
    # The probes: ±1 entries, shaped like the params pytree, independent across the S axis and leaves.
    tree = {"a": jnp.zeros((3, 4)), "b": jnp.zeros(5)}
    z = rademacher_like(jax.random.key(1), tree, 2000)
    assert z["a"].shape == (2000, 3, 4) and z["b"].shape == (2000, 5)
    for leaf in jax.tree.leaves(z):
        v = np.asarray(leaf).reshape(2000, -1)
        assert set(np.unique(v)) == {-1.0, 1.0}
        # mean ≈ 0 and second-moment matrix ≈ I: |mean| and off-diagonal entries have std 1/√2000 ≈ 0.022.
        assert np.abs(v.mean(axis=0)).max() < 5 / np.sqrt(2000)
        G = v.T @ v / 2000
        assert np.abs(G - np.eye(G.shape[0])).max() < 5 / np.sqrt(2000)
    flat = np.concatenate([np.asarray(z["a"]).reshape(2000, -1), np.asarray(z["b"])], axis=1)
    G = flat.T @ flat / 2000
    assert np.abs(G - np.eye(17)).max() < 5 / np.sqrt(2000)  # leaves are independent of each other too


def test_hutchinson_on_pytree_params():
    """With dict params, the estimate is a dict shaped like params, matching diag of the raveled operator."""
    from jax.flatten_util import ravel_pytree

    rs = np.random.RandomState(5)
    params = {"w": jnp.zeros((2, 3)), "c": jnp.zeros(4)}
    flat, unravel = ravel_pytree(params)
    n = flat.size
    M = rs.randn(n, n)
    A = 0.5 * (M + M.T)
    Aj = jnp.asarray(A)
    S = 4000
    key = jax.random.key(7)
    mod = HutchinsonDiag(probes=S)
    ctx = Context(step=jnp.zeros((), jnp.int32), rng=key, params=params, batch=None, objective=None,
                  module="h")
    op = LinearOperator(lambda v: unravel(Aj @ ravel_pytree(v)[0]))
    out, _ = mod.apply(Inputs({"op": op, "rng": key}, "h"), (), ctx)
    d = out["diag"]
    assert jax.tree.structure(d) == jax.tree.structure(params)
    est = np.asarray(ravel_pytree(d)[0])
    sigma = np.sqrt((A**2).sum(axis=1) - np.diag(A) ** 2)
    assert np.all(np.abs(est - np.diag(A)) <= 5 * sigma / np.sqrt(S))


def test_damped_newton_step_uses_exact_lambda_under_x64():
    n, lam = 20, 0.1
    rs = np.random.RandomState(6)
    Q, _ = np.linalg.qr(rs.randn(n, n))
    A = (Q * np.logspace(-3, 0, n)) @ Q.T
    A = 0.5 * (A + A.T)
    b = rs.randn(n)
    ref = np.linalg.solve(A + lam * np.eye(n), b)  # the damped system (A + λI) s = b, in float64
    maxiter = cg_iterations(np.linalg.cond(A + lam * np.eye(n)), 1e-13)
    opt = curvplan.Optimizer(curvplan.presets.newton_cg(lam=lam, tol=1e-13, maxiter=maxiter, radius=None),
                             loss_fn=lambda x, bt: 0.5 * x @ bt[0] @ x - bt[1] @ x)
    x1, _, info = opt.step(jnp.zeros(n), opt.init(jnp.zeros(n)), (jnp.asarray(A), jnp.asarray(b)))
    assert bool(info.cg_converged)
    np.testing.assert_allclose(np.asarray(x1), ref, rtol=0, atol=1e-11 * np.abs(ref).max())


def test_default_radius_bounds_the_newton_step_on_a_near_singular_quadratic():
    """f(x) = ½xᵀAx − bᵀx with eigenvalues down to 1e-7 and λ = 0: the exact Newton step has norm ~1e6 (numpy),
    the preset's default radius 1 stops CG on the boundary and says so."""
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    a = (q * np.array([1e-7, 1e-3, 0.1, 0.5, 1.0, 2.0, 3.0, 4.0])) @ q.T
    b = rng.normal(size=8)
    assert np.linalg.norm(np.linalg.solve(a, b)) > 1e5
    A, B = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    opt = curvplan.Optimizer(curvplan.presets.newton_cg(lam=0.0, maxiter=8),
                             loss_fn=lambda x, _: 0.5 * x @ A @ x - B @ x)
    x0 = jnp.zeros(8, jnp.float32)
    x1, _, info = opt.step(x0, opt.init(x0), None)
    assert bool(info.cg_radius_reached)
    np.testing.assert_allclose(float(jnp.linalg.norm(x1)), 1.0, rtol=1e-5)
