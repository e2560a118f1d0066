"""`conjugate_gradient` against dense float64 references (docs/math.md §3.1, §8.2).

References: `numpy.linalg.solve` for the solution, and a textbook CG written here in plain numpy (with the
Steihaug stop on non-positive curvature) for the iterates where the exact path matters (maxiter cut-off,
negative curvature).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import cg_iterations
from jax.flatten_util import ravel_pytree

from curvplan.modules import conjugate_gradient
from curvplan.modules.solvers import CG_RESULTS

pytestmark = pytest.mark.usefixtures("x64")  # float64 references (tests/conftest.py)


def random_orthogonal(rs, n):
    Q, R = np.linalg.qr(rs.randn(n, n))
    return Q * np.sign(np.diag(R))


def spd_with_spectrum(rs, eigs):
    Q = random_orthogonal(rs, len(eigs))
    A = (Q * np.asarray(eigs, float)) @ Q.T
    return 0.5 * (A + A.T)


def spd(rs, n, cond):
    return spd_with_spectrum(rs, np.logspace(0, np.log10(cond), n))


def numpy_cg(A, b, maxiter, tol=0.0, M_inv=None):
    """Textbook (P)CG from x0 = 0; stops on pᵀAp <= 0 and returns the current iterate (b if it is still 0).

    Returns (x, iterations, negative_curvature)."""
    M_inv = np.ones_like(b) if M_inv is None else M_inv
    x = np.zeros_like(b)
    r = b.copy()
    z = M_inv * r
    p = z.copy()
    rz = r @ z
    for k in range(maxiter):
        if r @ r <= tol**2 * (b @ b):
            return x, k, False
        Ap = A @ p
        pAp = p @ Ap
        if pAp <= 0:
            return (b.copy() if not np.any(x) else x), k, True
        alpha = rz / pAp
        x = x + alpha * p
        r = r - alpha * Ap
        z = M_inv * r
        rz_new = r @ z
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x, maxiter, False


def jcg(A, b, **kw):
    A = jnp.asarray(A)
    return conjugate_gradient(lambda v: A @ v, jnp.asarray(b), **kw)


def rel_err(x, ref):
    return np.linalg.norm(np.asarray(x) - ref) / np.linalg.norm(ref)


# -- SPD systems vs numpy.linalg.solve ------------------------------------------------------------------
@pytest.mark.parametrize("n,cond", [(5, 10.0), (12, 1e2), (20, 1e3), (35, 1e4), (50, 1e4), (50, 1.0 + 1e-3)])
def test_spd_matches_numpy_solve(n, cond):
    rs = np.random.RandomState(n)
    A = spd(rs, n, cond)
    b = rs.randn(n)
    ref = np.linalg.solve(A, b)
    # In exact arithmetic CG ends in <= n steps; in floating point the loss of orthogonality delays it (the
    # textbook numpy CG above needs 14 / 30 / 92 / 155 steps for the κ = 1e2 / 1e3 / 1e4 / 1e4 cases here),
    # so maxiter comes from the condition-number bound, which holds in floating point too, not from n.
    maxiter = cg_iterations(np.linalg.cond(A), 1e-10)
    res = jcg(A, b, tol=1e-10, maxiter=maxiter)
    assert res.value.dtype == jnp.float64
    assert bool(res.result == CG_RESULTS.successful), (int(res.stats["num_steps"]), float(res.stats["residual"]))
    assert not bool(res.result == CG_RESULTS.negative_curvature)
    assert 1 <= int(res.stats["num_steps"]) <= maxiter
    # The reported residual is the (recursive) relative residual; the true one must agree closely.
    true_rel = np.linalg.norm(b - A @ np.asarray(res.value)) / np.linalg.norm(b)
    assert float(res.stats["residual"]) <= 1e-10
    assert true_rel <= 1e-9
    # ‖x − x*‖/‖x*‖ <= κ · ‖r‖/‖b‖.
    assert rel_err(res.value, ref) <= cond * true_rel + 1e-12


def test_pytree_rhs_matches_numpy_solve():
    rs = np.random.RandomState(1)
    b_tree = {"w": jnp.asarray(rs.randn(3, 4)), "c": jnp.asarray(rs.randn(5))}
    b_flat, unravel = ravel_pytree(b_tree)
    n = b_flat.size
    A = spd(rs, n, 1e3)
    Aj = jnp.asarray(A)
    matvec = lambda v: unravel(Aj @ ravel_pytree(v)[0])  # noqa: E731
    res = conjugate_gradient(matvec, b_tree, tol=1e-10, maxiter=5 * n)
    assert jax.tree.structure(res.value) == jax.tree.structure(b_tree)
    assert {k: v.shape for k, v in res.value.items()} == {"w": (3, 4), "c": (5,)}
    ref = np.linalg.solve(A, np.asarray(b_flat))
    x_flat = np.asarray(ravel_pytree(res.value)[0])
    assert bool(res.result == CG_RESULTS.successful)
    assert rel_err(x_flat, ref) <= 1e-7
    # Also under jit (as the runtime calls it).
    res_j = jax.jit(lambda bt: conjugate_gradient(matvec, bt, tol=1e-10, maxiter=5 * n))(b_tree)
    np.testing.assert_allclose(np.asarray(ravel_pytree(res_j.value)[0]), x_flat, rtol=0, atol=1e-12)


def test_jit_and_eager_agree_and_doc_example():
    A = np.array([[4.0, 1.0], [1.0, 3.0]])
    b = np.array([1.0, 2.0])
    res = jcg(A, b, tol=1e-12, maxiter=2)
    np.testing.assert_allclose(np.asarray(res.value), np.linalg.solve(A, b), atol=1e-14)
    assert int(res.stats["num_steps"]) == 2


# -- indefinite systems: Steihaug termination -----------------------------------------------------------
def test_negative_curvature_on_first_direction_returns_b():
    # A has eigenvalue -1 along e_1; b points mostly along e_1, so p₀ᵀAp₀ = bᵀAb = -1 + 0.01·(1+2+3+4) < 0.
    A = np.diag([-1.0, 1.0, 2.0, 3.0, 4.0])
    b = np.array([1.0, 0.1, 0.1, 0.1, 0.1])
    assert b @ A @ b < 0
    res = jcg(A, b, tol=1e-10, maxiter=5)
    assert bool(res.result == CG_RESULTS.negative_curvature)
    assert not bool(res.result == CG_RESULTS.successful)
    assert int(res.stats["num_steps"]) == 0
    np.testing.assert_array_equal(np.asarray(res.value), b)
    # Same with an exactly-zero-curvature first direction (pᵀAp = 0 must also stop, not divide by ~0).
    A0 = np.diag([-1.0, 1.0, 1.0, 1.0, 1.0])
    b0 = np.array([2.0, 1.0, 1.0, 1.0, 1.0])
    assert b0 @ A0 @ b0 == 0
    res0 = jcg(A0, b0, tol=1e-10, maxiter=5)
    assert bool(res0.result == CG_RESULTS.negative_curvature) and int(res0.stats["num_steps"]) == 0
    np.testing.assert_array_equal(np.asarray(res0.value), b0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_negative_curvature_later_returns_last_safe_iterate(seed):
    rs = np.random.RandomState(seed)
    n = 12
    eigs = np.concatenate([[-0.5, -2.0], np.linspace(1.0, 10.0, n - 2)])
    A = spd_with_spectrum(rs, eigs)  # symmetric, two negative eigenvalues
    # b mostly in the positive eigenspace so that the first direction has positive curvature.
    w, U = np.linalg.eigh(A)
    b = U @ (np.where(w < 0, 0.2, 1.0) * rs.randn(n))
    assert b @ A @ b > 0
    ref_x, ref_k, ref_neg = numpy_cg(A, b, maxiter=n)
    # With A-conjugate directions spanning the whole space, Sylvester's inertia forces some pᵀAp < 0.
    assert ref_neg and ref_k >= 1
    res = jcg(A, b, tol=1e-10, maxiter=n)
    assert bool(res.result == CG_RESULTS.negative_curvature)
    assert not bool(res.result == CG_RESULTS.successful)
    assert int(res.stats["num_steps"]) == ref_k
    x = np.asarray(res.value)
    assert np.all(np.isfinite(x))
    np.testing.assert_allclose(x, ref_x, rtol=0, atol=1e-9 * np.linalg.norm(ref_x))
    # The returned point is the last safe iterate, not the blown-up step a division by max(pᵀAp, eps)
    # would give: its norm stays of the order of the iterates so far.
    assert np.linalg.norm(x) < 1e3 * np.linalg.norm(b) / 0.5


def test_negative_curvature_output_finite_under_jit():
    A = np.diag([1.0, -1.0, 2.0])
    b = np.array([1.0, 1.0, 1.0])  # bᵀAb = 2 > 0; the second direction has negative curvature
    res = jax.jit(lambda b: conjugate_gradient(lambda v: jnp.asarray(A) @ v, b, tol=1e-10, maxiter=3))(
        jnp.asarray(b))
    ref_x, ref_k, ref_neg = numpy_cg(A, b, maxiter=3)
    assert ref_neg and ref_k == 1
    assert bool(res.result == CG_RESULTS.negative_curvature) and int(res.stats["num_steps"]) == 1
    np.testing.assert_allclose(np.asarray(res.value), ref_x, atol=1e-14)


# -- warm start, maxiter, finite termination ------------------------------------------------------------
def test_warm_start_from_solution_takes_zero_iterations():
    rs = np.random.RandomState(3)
    n = 20
    A = spd(rs, n, 1e2)
    b = rs.randn(n)
    x_star = np.linalg.solve(A, b)
    res = jcg(A, b, x0=jnp.asarray(x_star), tol=1e-10, maxiter=n)
    assert int(res.stats["num_steps"]) == 0
    assert bool(res.result == CG_RESULTS.successful)
    np.testing.assert_array_equal(np.asarray(res.value), x_star)
    # A warm start near (not at) the solution still converges to it, in fewer steps than a cold start.
    cold = jcg(A, b, tol=1e-10, maxiter=5 * n)
    warm = jcg(A, b, x0=jnp.asarray(x_star + 1e-6 * rs.randn(n)), tol=1e-10, maxiter=5 * n)
    assert bool(cold.result == CG_RESULTS.successful)
    assert bool(warm.result == CG_RESULTS.successful) and int(warm.stats["num_steps"]) < int(cold.stats["num_steps"])
    assert rel_err(warm.value, x_star) <= 1e-8


@pytest.mark.parametrize("maxiter", [1, 3, 7])
def test_maxiter_is_respected(maxiter):
    rs = np.random.RandomState(4)
    n = 30
    A = spd(rs, n, 1e3)
    b = rs.randn(n)
    res = jcg(A, b, tol=1e-14, maxiter=maxiter)
    assert int(res.stats["num_steps"]) == maxiter
    assert not bool(res.result == CG_RESULTS.successful)
    ref_x, ref_k, _ = numpy_cg(A, b, maxiter=maxiter)
    np.testing.assert_allclose(np.asarray(res.value), ref_x, rtol=0, atol=1e-10 * np.linalg.norm(ref_x))
    true_rel = np.linalg.norm(b - A @ np.asarray(res.value)) / np.linalg.norm(b)
    np.testing.assert_allclose(float(res.stats["residual"]), true_rel, rtol=1e-6)


def test_k_distinct_eigenvalues_converge_in_k_iterations():
    # W5: n = 64 with 4 distinct eigenvalues (16 copies each) -> the Krylov space has dimension 4.
    rs = np.random.RandomState(5)
    n, k = 64, 4
    A = spd_with_spectrum(rs, np.repeat([1.0, 3.0, 10.0, 30.0], n // k))
    b = rs.randn(n)
    res = jcg(A, b, tol=1e-8, maxiter=n)
    assert bool(res.result == CG_RESULTS.successful)
    assert int(res.stats["num_steps"]) <= k
    assert rel_err(res.value, np.linalg.solve(A, b)) <= 1e-7
    # ...and it genuinely needs the k-th step (the bound is not vacuous).
    assert not bool(jcg(A, b, tol=1e-8, maxiter=k - 1).result == CG_RESULTS.successful)


# -- preconditioning and stabilisation ------------------------------------------------------------------
@pytest.mark.parametrize("n", [10, 40])
def test_preconditioned_cg_with_exact_diagonal_matches_numpy(n):
    rs = np.random.RandomState(6 + n)
    S = spd(rs, n, 20.0)
    d = np.logspace(-2, 2, n)[rs.permutation(n)]
    A = np.sqrt(d)[:, None] * S * np.sqrt(d)[None, :]  # badly scaled; Jacobi fixes the scaling
    b = rs.randn(n)
    ref = np.linalg.solve(A, b)
    diag_inv = jnp.asarray(1.0 / np.diag(A))
    pcg = jcg(A, b, tol=1e-10, maxiter=n, precond=lambda r: diag_inv * r)
    assert bool(pcg.result == CG_RESULTS.successful)
    assert np.linalg.norm(b - A @ np.asarray(pcg.value)) / np.linalg.norm(b) <= 1e-9
    assert rel_err(pcg.value, ref) <= np.linalg.cond(A) * 1e-9
    # The preconditioned iterates are those of textbook PCG (a few steps, before rounding drifts them).
    ref3, _, _ = numpy_cg(A, b, maxiter=3, M_inv=1.0 / np.diag(A))
    pcg3 = jcg(A, b, tol=1e-14, maxiter=3, precond=lambda r: diag_inv * r)
    np.testing.assert_allclose(np.asarray(pcg3.value), ref3, rtol=0, atol=1e-9 * np.linalg.norm(ref3))
    plain3 = jcg(A, b, tol=1e-14, maxiter=3)
    assert np.abs(np.asarray(plain3.value) - ref3).max() > 1e-6  # the preconditioner really changes the path


@pytest.mark.parametrize("every", [1, 4, 10])
def test_stabilise_every_gives_same_solution(every):
    rs = np.random.RandomState(7)
    n = 30
    A = spd(rs, n, 10.0)  # κ = 10: even steepest descent (every=1) reaches 1e-10 in ~120 steps
    b = rs.randn(n)
    ref = np.linalg.solve(A, b)
    plain = jcg(A, b, tol=1e-10, maxiter=20 * n)
    stab = jcg(A, b, tol=1e-10, maxiter=20 * n, stabilise_every=every)
    assert int(plain.result) == int(stab.result) == CG_RESULTS.successful
    for res in (plain, stab):
        assert np.linalg.norm(b - A @ np.asarray(res.value)) / np.linalg.norm(b) <= 1e-9
        assert rel_err(res.value, ref) <= 10 * 1e-9
    np.testing.assert_allclose(np.asarray(stab.value), np.asarray(plain.value), rtol=0,
                               atol=1e-7 * np.linalg.norm(ref))
    if every == 1:
        # Restarting every iteration is steepest descent: far slower than CG on this system.
        assert int(stab.stats["num_steps"]) > int(plain.stats["num_steps"])


def test_preconditioned_negative_curvature_on_first_direction_returns_p0():
    A = np.diag([-1.0, 1.0, 2.0, 3.0, 4.0])
    b = np.array([1.0, 0.1, 0.1, 0.1, 0.1])
    m_inv = np.array([1.0, 0.5, 0.25, 2.0, 4.0])  # p₀ = M⁻¹b, and p₀ᵀAp₀ < 0
    assert (m_inv * b) @ A @ (m_inv * b) < 0
    res = jcg(A, b, tol=1e-10, maxiter=5, precond=lambda r: jnp.asarray(m_inv) * r)
    assert bool(res.result == CG_RESULTS.negative_curvature) and int(res.stats["num_steps"]) == 0
    np.testing.assert_array_equal(np.asarray(res.value), m_inv * b)
