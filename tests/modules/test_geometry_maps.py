"""The pure LMO / polar / Schatten maps of `curvplan.modules.geometry` against numpy references (float64).

References: numpy.linalg.svd (polar factor U Vᵀ, singular values), optax.contrib's own Newton-Schulz, and
norms / dual norms written out here from their definitions (docs/math.md §7.1, in flax (d_in, d_out) layout).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from optax.contrib._muon import orthogonalize_via_newton_schulz

from curvplan.modules.geometry import _maps as M

pytestmark = pytest.mark.usefixtures("x64")


def svd_polar(a):
    u, _, vt = np.linalg.svd(a, full_matrices=False)
    return u @ vt


# -- Newton-Schulz ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(32, 64), (64, 32), (16, 16)])
@pytest.mark.parametrize("preset,steps", [("standard", 5), ("polar_express", 8), ("polar_express", 5)])
def test_newton_schulz_equals_optax(shape, preset, steps):
    x = jnp.asarray(np.random.RandomState(0).randn(*shape))
    coeffs = jnp.asarray(M.ns_schedule(preset, steps))
    ref = orthogonalize_via_newton_schulz(x, coeffs, steps)
    np.testing.assert_allclose(np.asarray(M.newton_schulz(x, preset, steps)), np.asarray(ref), atol=1e-12)


def test_newton_schulz_stack_is_one_batched_call_equal_to_per_matrix():
    rs = np.random.RandomState(1)
    stack = jnp.asarray(rs.randn(3, 20, 12))
    got = M.newton_schulz(stack)
    for i in range(3):
        np.testing.assert_allclose(np.asarray(got[i]), np.asarray(M.newton_schulz(stack[i])), atol=1e-13)


def test_polar_express_converges_to_polar_factor():
    # Polar Express is designed (Amsel et al.) for σ_min/σ_max ≥ 1e-3 after normalisation; a Gaussian 48×96
    # matrix is far inside that, so 8 iterations land within 2% of U Vᵀ, while the standard quintic does not
    # converge (its singular values oscillate in about [0.7, 1.2], §7.2).
    a = np.random.RandomState(2).randn(48, 96)
    pe = np.asarray(M.newton_schulz(jnp.asarray(a), "polar_express", 8))
    s = np.linalg.svd(pe, compute_uv=False)
    assert np.all(np.abs(s - 1) < 0.02), s
    np.testing.assert_allclose(pe, svd_polar(a), atol=0.02)
    s_std = np.linalg.svd(np.asarray(M.newton_schulz(jnp.asarray(a))), compute_uv=False)
    assert 0.6 < s_std.min() < 0.95 and 1.0 < s_std.max() < 1.25


@pytest.mark.parametrize("shape", [(7, 5), (5, 9), (6, 6)])
def test_spectral_exact_is_svd_polar(shape):
    a = np.random.RandomState(3).randn(*shape)
    np.testing.assert_allclose(np.asarray(M.spectral_exact(jnp.asarray(a))), svd_polar(a), atol=1e-12)


# -- the LMO table: maximiser of <M, D> over the unit ball, dual-norm identity --------------------------------
def primal_norm(d, norm):
    """The norm whose unit ball each LMO maximises over (normalized=True), from §7.1 in flax layout."""
    if norm == "frobenius":
        return np.linalg.norm(d)
    if norm == "sign":
        return np.abs(d).max() * d.shape[0]
    if norm == "bias_rms":
        return np.linalg.norm(d) / math.sqrt(d.size)
    if norm == "spectral":
        return np.linalg.norm(d, 2) / math.sqrt(d.shape[1] / d.shape[0])
    if norm == "spectral_conv":
        kh, kw, ci, co = d.shape
        return np.linalg.norm(d.reshape(-1, co), 2) * kh * kw / math.sqrt(co / ci)
    if norm == "colnorm":  # per input feature (flax row)
        return np.linalg.norm(d, axis=1).max() * d.shape[0] / math.sqrt(d.shape[1])
    if norm == "rownorm":  # per output unit (flax column)
        return np.linalg.norm(d, axis=0).max() * math.sqrt(d.shape[0])
    raise AssertionError(norm)


def dual_reference(m, norm):
    """Dual norms derived by hand: sup over the unit ball of primal_norm of <m, D>."""
    if norm == "frobenius":
        return np.linalg.norm(m)
    if norm == "sign":
        return np.abs(m).sum() / m.shape[0]
    if norm == "bias_rms":
        return math.sqrt(m.size) * np.linalg.norm(m)
    if norm == "spectral":
        return np.linalg.svd(m, compute_uv=False).sum() * math.sqrt(m.shape[1] / m.shape[0])
    if norm == "spectral_conv":
        kh, kw, ci, co = m.shape
        return np.linalg.svd(m.reshape(-1, co), compute_uv=False).sum() * math.sqrt(co / ci) / (kh * kw)
    if norm == "colnorm":
        return np.linalg.norm(m, axis=1).sum() * math.sqrt(m.shape[1]) / m.shape[0]
    if norm == "rownorm":
        return np.linalg.norm(m, axis=0).sum() / math.sqrt(m.shape[0])
    raise AssertionError(norm)


CASES = [
    ("frobenius", (6, 4)),
    ("sign", (6, 4)),
    ("bias_rms", (7,)),
    ("spectral", (6, 4)),
    ("spectral", (3, 8)),
    ("spectral_conv", (3, 3, 2, 5)),
    ("colnorm", (6, 4)),
    ("rownorm", (6, 4)),
]


@pytest.mark.parametrize("norm,shape", CASES)
def test_lmo_maximises_inner_product_over_unit_ball(norm, shape):
    rs = np.random.RandomState(4)
    m = rs.randn(*shape)
    d = np.asarray(M.lmo(jnp.asarray(m), norm, ns=None, eps=0.0))
    np.testing.assert_allclose(primal_norm(d, norm), 1.0, rtol=1e-10)  # on the unit sphere
    best = float(np.vdot(m, d))
    np.testing.assert_allclose(best, dual_reference(m, norm), rtol=1e-10)  # <M, D*> = ‖M‖_dual
    np.testing.assert_allclose(float(M.dual_norm(jnp.asarray(m), norm)), best, rtol=1e-10)
    for _ in range(200):  # random feasible points never beat it
        z = rs.randn(*shape) * rs.choice([1.0, 1e-2], size=shape)
        z = z / primal_norm(z, norm)
        assert np.vdot(m, z) <= best * (1 + 1e-12)


def test_spectral_lmo_with_newton_schulz_is_close_to_exact():
    m = np.random.RandomState(5).randn(16, 8)
    ns = np.asarray(M.lmo(jnp.asarray(m), "spectral", ns="polar_express", ns_steps=8))
    np.testing.assert_allclose(ns, svd_polar(m) * math.sqrt(8 / 16), atol=0.02)


# -- Schatten-p maps -----------------------------------------------------------------------------------------
def schatten_reference(m, p):
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return (u * s ** (0.0 if math.isinf(p) else 1.0 / p)) @ vt


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 4.0, 10.0, math.inf])
@pytest.mark.parametrize("shape", [(12, 7), (7, 12)])
def test_schatten_exact_matches_svd(p, shape):
    m = np.random.RandomState(6).randn(*shape)
    got = np.asarray(M.schatten_exact(jnp.asarray(m), 0.0 if math.isinf(p) else 1.0 / p))
    np.testing.assert_allclose(got, schatten_reference(m, p), atol=1e-10)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, 8.0, math.inf])
def test_schatten_lmo_is_the_s_p_plus_1_maximiser(p):
    rs = np.random.RandomState(7)
    m = rs.randn(9, 6)
    d = np.asarray(M.schatten_lmo(jnp.asarray(m), p))
    sd = np.linalg.svd(d, compute_uv=False)
    r = p + 1
    unit = sd.max() if math.isinf(r) else (sd**r).sum() ** (1 / r)
    np.testing.assert_allclose(unit, 1.0, rtol=1e-10)
    q = 1 + (0 if math.isinf(p) else 1 / p)
    sm = np.linalg.svd(m, compute_uv=False)
    np.testing.assert_allclose(np.vdot(m, d), (sm**q).sum() ** (1 / q), rtol=1e-10)  # dual: S_{1+1/p}
    for _ in range(100):
        z = rs.randn(9, 6)
        sz = np.linalg.svd(z, compute_uv=False)
        z = z / (sz.max() if math.isinf(r) else (sz**r).sum() ** (1 / r))
        assert np.vdot(m, z) <= np.vdot(m, d) * (1 + 1e-12)


def test_refit_coefficients_solve_the_constrained_least_squares():
    # Independent reference: minimise ∫₀¹(αx+βx³+γx⁵−x^e)² dx s.t. α+β+γ=1 by dense quadrature + lstsq on the
    # null-space parametrisation; p = 1 (e = 1) gives (1, 0, 0).
    np.testing.assert_allclose(np.asarray(M.refit_coefficients(1.0)), [1, 0, 0], atol=1e-12)
    e = 0.5 ** (1 / 5)
    x = np.linspace(0, 1, 200001)
    w = np.full_like(x, x[1])
    w[[0, -1]] /= 2
    basis = np.stack([x, x**3, x**5], 1)
    # α = 1 − β − γ
    a_mat = np.stack([basis[:, 1] - basis[:, 0], basis[:, 2] - basis[:, 0]], 1) * np.sqrt(w)[:, None]
    rhs = (x**e - basis[:, 0]) * np.sqrt(w)
    (b, c), *_ = np.linalg.lstsq(a_mat, rhs, rcond=None)
    np.testing.assert_allclose(np.asarray(M.refit_coefficients(e)), [1 - b - c, b, c], atol=1e-5)


def test_schatten_newton_schulz_error_is_measured_and_documented():
    """The refitted iteration (§7.6(d)) normalised by ‖M‖_{S_16} ≥ σ_max, 5 steps, against the exact SVD map.

    Measured relative Frobenius errors (seed 0, float64): Gaussian 64×32 (flat spectrum): 2.7% (p=2),
    3.2% (p=4), 4.9% (p=10), 13% (p=∞ run as p=1024); condition-100 spectrum: 15% (p=2), 28% (p=4),
    34% (p=10). Too large for a default: `SchattenDirection(method="exact")` is the default and
    ``method="auto"`` uses the iteration only above ``exact_max_dim``. The bounds below are the measured values
    with 10-25% headroom (normalising by ‖M‖_F instead would give 14% / 13% / 22% / 37% and fail them).
    """
    rs = np.random.RandomState(0)
    flat = rs.randn(64, 32)
    decay = rs.randn(64, 32) @ np.diag(np.logspace(0, -2, 32))

    def err(m, p):
        got = np.asarray(M.schatten_ns(jnp.asarray(m), p, 5))
        ref = schatten_reference(m, p)
        return np.linalg.norm(got - ref) / np.linalg.norm(ref)

    np.testing.assert_allclose(err(flat, 1.0), 0.0, atol=1e-12)  # p = 1: (1, 0, 0) is exact
    for p, bound in ((2.0, 0.03), (4.0, 0.04), (10.0, 0.06), (math.inf, 0.15)):
        assert err(flat, p) < bound, (p, err(flat, p))
    for p, bound in ((2.0, 0.18), (4.0, 0.36), (10.0, 0.43)):
        e = err(decay, p)
        assert 0.1 < e < bound, (p, e)  # large: this is why the exact path is the default


DIGITS_MLP_SHAPES = [(64, 32), (32, 32), (32, 10), (32, 64), (10, 32)]


def test_schatten_newton_schulz_p_inf_keeps_singular_values_at_most_one_in_float32():
    """The quintic's fixed point at 1 is repelling (slope ≈ 2.1 for p = ∞, 5 steps), so the normalisation must
    never underestimate σ_max: a power-iteration estimate did, and single seeds came out with σ_max near 300.
    """
    worst = 0.0
    for shape in DIGITS_MLP_SHAPES:
        for seed in range(8):
            m = np.random.RandomState(seed).randn(*shape).astype(np.float32)
            got = np.asarray(M.schatten_ns(jnp.asarray(m), math.inf, 5), dtype=np.float64)
            worst = max(worst, np.linalg.svd(got, compute_uv=False).max())
    assert worst <= 1 + 1e-3, worst


@pytest.mark.parametrize("shape", DIGITS_MLP_SHAPES + [(1, 7), (40, 3)])
def test_schatten_upper_bound_is_at_least_sigma_max(shape):
    # ‖M‖_{S_16} lies in [σ_max, rank^{1/16}·σ_max]; rank 1 is the tight end, and scales far outside float32's
    # comfortable range must not overflow or underflow (the bound runs in float32 here).
    rs = np.random.RandomState(8)
    for m in (rs.randn(*shape), np.outer(rs.randn(shape[0]), rs.randn(shape[1]))):
        for scale in (1e-20, 1.0, 1e20):
            a = (m * scale).astype(np.float32)
            s = np.linalg.svd(a.astype(np.float64), compute_uv=False)
            rank = int((s > 1e-6 * s.max()).sum())
            got = float(M.schatten_upper_bound(jnp.asarray(a)))
            assert s.max() * (1 - 1e-6) <= got <= s.max() * rank ** (1 / 16) * (1 + 1e-6), (scale, got, s.max())
