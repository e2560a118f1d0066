"""Direct, diagonal, identity and row-space (Woodbury) solvers against dense float64 references.

References are built here from scratch: the losses are re-written, the Hessian comes from `jax.hessian` of the
flattened parameter vector, the GGN from `jax.jacobian` of the flattened model outputs times the per-example
output Hessians Λ_b (themselves `jax.hessian` of the re-written per-example loss), and every solve is
`numpy.linalg.solve` in float64 (docs/math.md §2.1-2.5, §3, §8.1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import curvplan as cp
from curvplan.ir._errors import LoweringError
from curvplan.lowering._objective import PROVIDER_IMPLS, Objective
from curvplan.modules import GGN, ConstantDamping, Context, DiagEMA, Hessian, HutchinsonDiag, UpdateTail
from curvplan.modules._base import Inputs
from curvplan.modules.curvature._fisher import model_lin
from curvplan.modules.solvers._direct import DenseDirect, DiagonalSolve, IdentitySolve
from curvplan.modules.solvers._row import RowSpace, row_system

pytestmark = pytest.mark.usefixtures("x64")  # float64 references (tests/conftest.py)

B, D_IN, D_HID = 6, 3, 4


def init_mlp(seed, d_out):
    rs = np.random.RandomState(seed)
    w2 = (D_HID,) if d_out is None else (D_HID, d_out)
    return {"W1": jnp.asarray(rs.randn(D_IN, D_HID)), "b1": jnp.asarray(0.5 * rs.randn(D_HID)),
            "W2": jnp.asarray(rs.randn(*w2)), "b2": jnp.asarray(0.5 * rs.randn(*w2[1:]))}


def mlp(p, x):
    return jnp.tanh(x @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]


def ref_example_loss(kind):
    """Per-example loss ℓ(F_b, y_b), written independently of curvplan."""
    if kind == "mse":
        return lambda f, y: 0.5 * jnp.sum((jnp.ravel(f) - jnp.ravel(y)) ** 2)
    return lambda f, y: jax.scipy.special.logsumexp(f) - f[y]


def data(seed, kind, d_out):
    rs = np.random.RandomState(50 + seed)
    x = jnp.asarray(rs.randn(B, D_IN))
    if kind == "ce":
        return x, jnp.asarray(rs.randint(0, d_out, size=B))
    return x, jnp.asarray(rs.randn(B) if d_out is None else rs.randn(B, d_out))


def dense_reference(kind, d_out, seed=0):
    """(params, batch, g, H, G): gradient, Hessian and GGN of the mean loss as dense float64 numpy arrays."""
    params = init_mlp(seed, d_out)
    x, y = data(seed, kind, d_out)
    flat, unravel = ravel_pytree(params)
    ell = ref_example_loss(kind)
    loss_flat = lambda f: jnp.mean(jax.vmap(ell)(mlp(unravel(f), x), y))  # noqa: E731
    g = np.asarray(jax.jit(jax.grad(loss_flat))(flat))
    H = np.asarray(jax.jit(jax.hessian(loss_flat))(flat))
    out = mlp(params, x)
    J = np.asarray(jax.jit(jax.jacobian(lambda f: mlp(unravel(f), x).reshape(B, -1)))(flat))  # (B, C, n)
    Lam = np.asarray(jax.jit(jax.vmap(jax.hessian(ell)))(out.reshape(B, -1), y))  # (B, C, C)
    G = np.einsum("bci,bcd,bdj->ij", J, Lam, J) / B
    return params, (x, y), g, H, G


def ctx_for(params, batch, key=None):
    return Context(step=jnp.zeros((), jnp.int32), rng=key, params=params, batch=batch, objective=None,
                   module="m")


def flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


CASES = [("mse", None), ("mse", 3), ("ce", 3), ("ce", 5)]


# -- dense direct ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["solve", "eigh"])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_dense_direct_equals_numpy_solve(method, curvature):
    kind, d_out, lam = "ce", 3, 0.3
    params, batch, g, H, G = dense_reference(kind, d_out)
    C = H if curvature == "hessian" else G
    ref = np.linalg.solve(C + lam * np.eye(len(g)), g)
    mods = [Hessian() if curvature == "hessian" else GGN(loss=kind), ConstantDamping(lam=lam),
            DenseDirect(method=method), UpdateTail(learning_rate=1.0)]
    opt = cp.Optimizer(mods, model_fn=mlp, loss=kind)
    new, _, info = opt.step(params, opt.init(params), batch)
    step = flat(params) - flat(new)  # update = -lr * s
    assert rel(step, ref) < 1e-10
    if method == "eigh":  # telemetry: extreme eigenvalues of C (StepInfo floats are float32)
        w = np.linalg.eigvalsh(C)
        np.testing.assert_allclose([float(info.direct_eig_min), float(info.direct_eig_max)], [w[0], w[-1]],
                                   rtol=1e-5, atol=1e-6)


def test_dense_direct_refuses_large_models():
    params, batch, *_ = dense_reference("mse", None)
    opt = cp.Optimizer([Hessian(), ConstantDamping(), DenseDirect(max_params=5), UpdateTail()],
                       model_fn=mlp, loss="mse")
    with pytest.raises(LoweringError, match="max_params"):
        opt.step(params, opt.init(params), batch)


# -- diagonal and identity ------------------------------------------------------------------------------
def test_diagonal_and_identity_solves():
    rs = np.random.RandomState(3)
    g = {"a": jnp.asarray(rs.randn(3, 2)), "b": jnp.asarray(rs.randn(4))}
    d = {"a": jnp.asarray(rs.randn(3, 2)), "b": jnp.asarray(np.abs(rs.randn(4)))}
    lam = 0.25
    out, _ = DiagonalSolve(eps=0.0).apply(Inputs({"grad": g, "diag": d, "lam": jnp.asarray(lam)}, "diag"), (),
                                          ctx_for(g, None))
    s = out["direction"]
    for k in g:  # s = g / (max(d, 0) + λ), negative curvature entries clipped to 0
        want = np.asarray(g[k]) / (np.maximum(np.asarray(d[k]), 0) + lam)
        np.testing.assert_allclose(np.asarray(s[k]), want)
    out, _ = IdentitySolve().apply(Inputs({"grad": g}, "identity"), (), ctx_for(g, None))
    s = out["direction"]
    assert all(np.array_equal(np.asarray(s[k]), np.asarray(g[k])) for k in g)


def test_diagonal_solve_in_a_plan_with_exact_diagonal():
    """Quadratic ½xᵀAx − bᵀx, diagonal A: Hutchinson is exact on a diagonal matrix, DiagEMA(beta=0) keeps it,
    so DiagonalSolve gives x − (A + λ)⁻¹(Ax − b) per coordinate."""
    a = np.linspace(0.5, 3.0, 5)
    b = np.arange(5.0)
    lam = 0.1
    mods = [Hessian(), HutchinsonDiag(), DiagEMA(beta=0.0), ConstantDamping(lam=lam), DiagonalSolve(eps=0.0),
            UpdateTail()]
    opt = cp.Optimizer(mods, loss_fn=lambda x, bt: 0.5 * jnp.sum(bt[0] * x * x) - bt[1] @ x)
    x0 = jnp.ones(5)
    x1, _, _ = opt.step(x0, opt.init(x0), (jnp.asarray(a), jnp.asarray(b)), rng=jax.random.key(0))
    np.testing.assert_allclose(np.asarray(x1), 1 - (a - b) / (a + lam), rtol=1e-12)


# -- row space (Woodbury) -------------------------------------------------------------------------------
def run_row(kind, d_out, lam, **kw):
    params, batch, g, H, G = dense_reference(kind, d_out)
    mod = RowSpace(loss=kind, **kw)

    @jax.jit
    def solve(params, batch):
        lin = PROVIDER_IMPLS["linearize_model"](Objective(model_fn=mlp, loss_kind=kind), params, batch, None)
        inputs = Inputs({"lin": lin[model_lin()], "lam": jnp.asarray(lam)}, "row")
        out, _, _ = mod.apply(inputs, (), ctx_for(params, batch))
        return out["direction"]

    s = solve(params, batch)
    ref = np.linalg.solve(G + lam * np.eye(len(g)), g)
    return flat(s), ref


@pytest.mark.parametrize("kind,d_out", CASES)
@pytest.mark.parametrize("lam", [1e-2, 1.0])
def test_row_cholesky_equals_parameter_space_solve(kind, d_out, lam):
    s, ref = run_row(kind, d_out, lam, solver="cholesky")
    assert rel(s, ref) < 1e-6, rel(s, ref)


@pytest.mark.parametrize("kind,d_out", CASES)
def test_row_cg_equals_parameter_space_solve(kind, d_out):
    # m = B·C <= 30 rows: CG on the m×m SPD system converges in at most m iterations (float64).
    s, ref = run_row(kind, d_out, 0.1, solver="cg", tol=1e-13, maxiter=200)
    assert rel(s, ref) < 1e-6, rel(s, ref)


def test_row_ce_cholesky_factor_variant():
    """Λ_b + εI = L_bL_bᵀ (Somax's ε, the correct orientation): the curvature gains ε JᵀJ/B, so the step
    moves by O(ε); with ε = 1e-10 it matches the exact solve to 1e-6 and with 1e-6 still to 1e-3."""
    s, ref = run_row("ce", 4, 0.05, solver="cholesky", ce_factor="cholesky", eps=1e-10)
    assert rel(s, ref) < 1e-6
    s, ref = run_row("ce", 4, 0.05, solver="cholesky", ce_factor="cholesky", eps=1e-6)
    assert rel(s, ref) < 1e-3


def test_somax_ce_row_factorization_is_wrong():
    """docs/math.md §8.1: J̃ = L J (Somax v1.0.1) gives Jᵀ LᵀL J ≠ Jᵀ L Lᵀ J; rebuild that system densely
    and check it misses the GGN step while ours hits it."""
    kind, d_out, lam = "ce", 4, 0.05
    params, (x, y), g, H, G = dense_reference(kind, d_out)
    flat0, unravel = ravel_pytree(params)
    J = np.asarray(jax.jit(jax.jacobian(lambda f: mlp(unravel(f), x)))(flat0))  # (B, C, n)
    p = np.asarray(jax.nn.softmax(mlp(params, x), axis=-1))
    Lam = np.stack([np.diag(pb) - np.outer(pb, pb) for pb in p])
    L = np.linalg.cholesky(Lam + 1e-6 * np.eye(d_out))
    r = p - np.eye(d_out)[np.asarray(y)]
    Jw = np.einsum("bij,bjn->bin", L, J).reshape(-1, len(g))  # Somax: L_b J_b
    rw = np.stack([np.linalg.solve(Lb.T, rb) for Lb, rb in zip(L, r)]).reshape(-1)  # L_b^{-T} r_b
    s_somax = Jw.T @ np.linalg.solve(Jw @ Jw.T + B * lam * np.eye(len(rw)), rw)
    ref = np.linalg.solve(G + lam * np.eye(len(g)), g)
    assert rel(s_somax, ref) > 1e-2
    s, _ = run_row(kind, d_out, lam)
    assert rel(s, ref) < 1e-6


def test_row_system_operators_are_transposes_and_factor_the_ggn():
    """J̃ᵀJ̃ / B equals the dense GGN, and J̃ᵀr̃ / B equals the gradient, for the exact CE factor."""
    kind, d_out = "ce", 3
    params, batch, g, H, G = dense_reference(kind, d_out)
    n, unravel = len(g), ravel_pytree(params)[1]

    @jax.jit
    def rows(params, batch):
        lin = PROVIDER_IMPLS["linearize_model"](Objective(model_fn=mlp, loss_kind=kind), params, batch, None)
        apply_t, apply, rt = row_system(lin[model_lin()])
        m = rt.shape[0]
        Jt = jax.vmap(lambda e: ravel_pytree(apply_t(e))[0])(jnp.eye(m))  # (m, n): rows of J̃ by VJPs
        Jv = jax.vmap(lambda e: apply(unravel(e)), out_axes=1)(jnp.eye(n))  # (m, n): columns by JVPs
        return Jt, Jv, rt

    Jt, Jv, rt = (np.asarray(a) for a in rows(params, batch))
    np.testing.assert_allclose(Jt.T @ Jt / B, G, atol=1e-12)
    np.testing.assert_allclose(Jt.T @ rt / B, g, atol=1e-12)
    np.testing.assert_allclose(Jv, Jt, atol=1e-12)


def test_row_space_end_to_end_and_loss_mismatch():
    kind, d_out, lam = "mse", 3, 0.5
    params, batch, g, H, G = dense_reference(kind, d_out)
    opt = cp.Optimizer([RowSpace(loss=kind), ConstantDamping(lam=lam), UpdateTail()], model_fn=mlp, loss=kind)
    new, _, info = opt.step(params, opt.init(params), batch)
    ref = np.linalg.solve(G + lam * np.eye(len(g)), g)
    assert rel(flat(params) - flat(new), ref) < 1e-8
    assert int(info.row_dim) == B * d_out
    bad = cp.Optimizer([RowSpace(loss="ce"), ConstantDamping(lam=lam), UpdateTail()], model_fn=mlp,
                       loss="mse")
    with pytest.raises(LoweringError, match="RowSpace"):
        bad.step(params, bad.init(params), batch)
