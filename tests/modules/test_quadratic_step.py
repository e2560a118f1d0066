"""QuadraticStep: α and β from the 2×2 quadratic model against a dense numpy float64 reference (the GGN of a
tanh MLP built from its Jacobian), fixed coefficients against UpdateTail's momentum, the fallbacks, and the
configuration errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import curvplan as cp
from curvplan.lowering._objective import ce_loss
from curvplan.modules import GGN, ConstantDamping, Hessian, IdentitySolve, QuadraticStep, UpdateTail
from curvplan.modules._base import Context, Inputs, LinearOperator

SHAPES = {"w1": (4, 5), "b1": (5,), "w2": (5, 3), "b2": (3,)}
B, C = 12, 3


def model_fn(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def _problem(dtype, steps):
    keys = jax.random.split(jax.random.PRNGKey(0), len(SHAPES) + 2 * steps)
    params = {k: (0.5 * jax.random.normal(kk, s)).astype(dtype) for (k, s), kk in zip(SHAPES.items(), keys)}
    ks = keys[len(SHAPES):]
    batches = [(jax.random.normal(ks[2 * t], (B, 4), dtype), jax.random.randint(ks[2 * t + 1], (B,), 0, C))
               for t in range(steps)]
    return params, batches


def _dense_ggn_and_grad(theta, unravel, batch):
    """Numpy float64 C = (1/B) Σ_b J_bᵀ(diag p_b − p_b p_bᵀ)J_b and g = (1/B) Σ_b J_bᵀ(p_b − e_{y_b}) for the mean
    softmax cross-entropy, from the Jacobian of the logits (B, C, n)."""
    x, y = batch
    f = lambda th: model_fn(unravel(th), x)  # noqa: E731
    J = np.asarray(jax.jacobian(f)(jnp.asarray(theta)), np.float64)
    logits = np.asarray(f(jnp.asarray(theta)), np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    lam_out = np.stack([np.diag(pb) - np.outer(pb, pb) for pb in p])  # (B, C, C)
    ggn = np.einsum("bcn,bcd,bdm->nm", J, lam_out, J) / B
    r = p - np.eye(C)[np.asarray(y)]
    g = np.einsum("bcn,bc->n", J, r) / B
    return ggn, g


def _ref_coefficients(ggn, g, delta, prev, lam, first):
    """α, β, model change and the update from numpy: M c = −b on span{−Δ, δ₋} (the 1-D solve on the first step)."""
    n = len(g)
    a = ggn + lam * np.eye(n)
    v1 = -delta
    if first:
        m11, b1 = v1 @ a @ v1, g @ v1
        alpha, beta = -b1 / m11, 0.0
        change = 0.5 * alpha**2 * m11 + alpha * b1
    else:
        V = np.stack([v1, prev], axis=1)
        M, b = V.T @ a @ V, V.T @ g
        c = np.linalg.solve(M, -b)
        alpha, beta = c
        change = 0.5 * c @ M @ c + b @ c
    return alpha, beta, change, alpha * v1 + beta * prev


@pytest.mark.parametrize("include_lambda", [True, False])
def test_coefficients_match_a_dense_numpy_solve(x64, include_lambda):
    """Three steps of [GGN(ce), λ = 0.05, Δ = g (IdentitySolve), QuadraticStep] on a 4-5-3 tanh MLP, a new
    batch each step. The reference runs its own trajectory in numpy: per step the dense GGN from the Jacobian,
    M_ij = v_iᵀ(C + λ'I)v_j with v = (−g, δ₋) and λ' = λ or 0, b = Vᵀg, c = solve(M, −b) (the 1-D formula on
    step 0). The update agrees to 1e-8 relative, α / β / the model change to float32 telemetry resolution."""
    lam, steps = 0.05, 3
    params, batches = _problem(jnp.float64, steps)
    mods = [GGN(loss="ce"), ConstantDamping(lam=lam), IdentitySolve(), QuadraticStep(include_lambda=include_lambda)]
    opt = cp.Optimizer(mods, model_fn=model_fn, loss="ce")
    state = opt.init(params)
    theta, unravel = ravel_pytree(params)
    theta = np.asarray(theta, np.float64)
    prev = np.zeros_like(theta)
    p = params
    for t, batch in enumerate(batches):
        ggn, g = _dense_ggn_and_grad(theta, unravel, batch)
        alpha, beta, change, upd = _ref_coefficients(ggn, g, g, prev, lam if include_lambda else 0.0, t == 0)
        new, state, info = opt.step(p, state, batch)
        got = np.asarray(ravel_pytree(new)[0]) - np.asarray(ravel_pytree(p)[0])
        err = np.linalg.norm(got - upd) / np.linalg.norm(upd)
        assert err < 1e-8, f"step {t}: relative update error {err:.2e} (alpha {alpha}, beta {beta})"
        np.testing.assert_allclose(float(info.alpha), alpha, rtol=5e-7)
        np.testing.assert_allclose(float(info.beta), beta, rtol=5e-7, atol=0 if t else 1e-30)
        np.testing.assert_allclose(float(info.model_change), change, rtol=5e-7)
        assert float(info.model_change) < 0
        assert int(info.quad_fallback) == (1 if t == 0 else 0)
        if t:
            assert abs(beta) > 1e-3  # the momentum term is really exercised
        theta, prev, p = theta + upd, upd, new


def test_fixed_coefficients_equal_update_tail_momentum():
    """With ``fixed=(α, β)``: u_t = −αΔ_t + βu_{t−1}. optax.trace keeps m_t = Δ_t + βm_{t−1} and UpdateTail
    applies u_t = −αm_t = −αΔ_t + β(−αm_{t−1}) = −αΔ_t + βu_{t−1}, the same recurrence: five float32 steps
    agree to 1e-6. The fixed step needs no curvature (a loss function alone suffices) and its plan has no
    %curv_op; a numpy run of the recurrence on g_t = ∇L(θ_t) checks both."""
    alpha, beta = 0.3, 0.7
    params, batches = _problem(jnp.float32, 5)
    loss_fn = lambda p, b: ce_loss(model_fn(p, b[0]), b[1])  # noqa: E731
    fixed = cp.Optimizer([IdentitySolve(), QuadraticStep(fixed=(alpha, beta))], loss_fn=loss_fn)
    tail = cp.Optimizer([IdentitySolve(), UpdateTail(learning_rate=alpha, momentum=beta)], loss_fn=loss_fn)
    assert "%curv_op" not in str(fixed.plan)
    pf, sf, pt, st = params, fixed.init(params), params, tail.init(params)
    flat, unravel = ravel_pytree(params)
    ref, prev = np.asarray(flat, np.float64), np.zeros(flat.shape)
    for batch in batches:
        g = ravel_pytree(jax.grad(loss_fn)(unravel(jnp.asarray(ref, jnp.float32)), batch))[0]
        u = -alpha * np.asarray(g, np.float64) + beta * prev
        ref, prev = ref + u, u
        pf, sf, info = fixed.step(pf, sf, batch)
        pt, st, _ = tail.step(pt, st, batch)
        np.testing.assert_allclose(np.asarray(ravel_pytree(pf)[0]), np.asarray(ravel_pytree(pt)[0]),
                                   rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(ravel_pytree(pf)[0]), ref, rtol=1e-5, atol=1e-5)
        assert float(info.alpha) == pytest.approx(alpha) and float(info.beta) == pytest.approx(beta)
        assert np.isnan(float(info.model_change)) and int(info.quad_fallback) == -1


# -- the fallbacks, on the module itself with a dense operator ------------------------------------------------
def _ctx():
    return Context(step=jnp.zeros((), jnp.int32), rng=None, params=None, batch=None, objective=None, module="qs")


def _apply(mod, A, g, delta, prev, lam=0.0):
    A = jnp.asarray(A)
    inputs = {"direction": jnp.asarray(delta), "grad": jnp.asarray(g), "op": LinearOperator(lambda v: A @ v)}
    if mod.include_lambda:
        inputs["lam"] = jnp.asarray(lam)
    state = mod.init(jnp.asarray(delta), None)._replace(previous=jnp.asarray(prev))
    out, new_state, info = mod.apply(Inputs(inputs, "qs"), state, _ctx())
    return np.asarray(out["update"]), new_state, {k: np.asarray(v) for k, v in info.items()}


def test_first_step_uses_the_one_dimensional_solve(x64):
    """Step 0 (δ₋ = 0): α = −b₁/M₁₁ = (gᵀΔ) / (Δᵀ(A + λI)Δ), β = 0, from numpy; flagged 1."""
    rng = np.random.default_rng(1)
    m = rng.standard_normal((5, 5))
    A = m @ m.T
    g, delta, lam = rng.standard_normal(5), rng.standard_normal(5), 0.2
    upd, state, info = _apply(QuadraticStep(), A, g, delta, np.zeros(5), lam)
    alpha = (g @ delta) / (delta @ (A + lam * np.eye(5)) @ delta)
    np.testing.assert_allclose(info["alpha"], alpha, rtol=1e-12)
    assert info["beta"] == 0.0 and info["quad_fallback"] == 1
    np.testing.assert_allclose(upd, -alpha * delta, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(state.previous), upd, rtol=0)


@pytest.mark.parametrize("case", ["indefinite_2d", "parallel", "negative_curvature", "nan_operator"])
def test_fallbacks_give_finite_steps(x64, case):
    """An indefinite 2×2 model (M₁₁ > 0 > det) and a previous update parallel to Δ (det = 0) fall back to the
    1-D solve; negative curvature along Δ (M₁₁ < 0) and a NaN operator fall back to α = fallback_lr, β = 0.
    Every update is finite."""
    A = np.diag([1.0, -4.0])
    g = np.array([1.0, 0.5])
    delta, prev = {"indefinite_2d": (np.array([1.0, 0.0]), np.array([0.0, 1.0])),
                   "parallel": (np.array([1.0, 0.0]), np.array([-2.0, 0.0])),
                   "negative_curvature": (np.array([0.0, 1.0]), np.array([1.0, 0.0])),
                   "nan_operator": (np.array([1.0, 0.0]), np.array([0.0, 1.0]))}[case]
    if case == "nan_operator":
        A = np.full((2, 2), np.nan)
    mod = QuadraticStep(include_lambda=False, fallback_lr=0.01)
    upd, _, info = _apply(mod, A, g, delta, prev)
    assert np.all(np.isfinite(upd))
    if case in ("indefinite_2d", "parallel"):
        alpha = (g @ delta) / (delta @ A @ delta)
        assert info["quad_fallback"] == 1
        np.testing.assert_allclose(info["alpha"], alpha, rtol=1e-12)
        np.testing.assert_allclose(upd, -alpha * delta, rtol=1e-12)
    else:
        assert info["quad_fallback"] == 2
        assert info["alpha"] == 0.01 and info["beta"] == 0.0
        np.testing.assert_allclose(upd, -0.01 * delta, rtol=1e-12)


def test_negative_curvature_on_a_nonconvex_quadratic_does_not_give_nan(x64):
    """L = ½wᵀAw − bᵀw with A = diag(−1, 2) through the Hessian, λ = 0, Δ = g: at w₀ = (1, 0) the gradient lies
    on the negative eigenvector, so step 0 takes fallback_lr; step 1 (g now has a positive-curvature part)
    solves again. All steps finite, the first exactly −fallback_lr·g."""
    A, b = jnp.diag(jnp.array([-1.0, 2.0])), jnp.array([0.0, -0.3])
    loss = lambda w, batch: 0.5 * w @ (A @ w) - b @ w  # noqa: E731
    opt = cp.Optimizer([Hessian(), ConstantDamping(lam=0.0), IdentitySolve(), QuadraticStep()], loss_fn=loss)
    w = jnp.array([1.0, 0.0])
    state = opt.init(w)
    g0 = np.asarray(A @ w - b)
    w1, state, info = opt.step(w, state, None)
    assert int(info.quad_fallback) == 2 and float(info.alpha) == pytest.approx(1e-3)
    np.testing.assert_allclose(np.asarray(w1 - w), -1e-3 * g0, rtol=1e-12)
    for _ in range(3):
        w1, state, info = opt.step(w1, state, None)
        assert np.all(np.isfinite(np.asarray(w1))) and not bool(info.skipped)


def _box_minimum(M, b, lo, hi):
    """argmin ½cᵀMc + bᵀc over the box lo <= c <= hi (M positive definite), by trying every active set: the
    free coordinates solve their sub-system with the others at a bound (numpy)."""
    best, best_c = np.inf, None
    for fix in ((), (0,), (1,), (0, 1)):
        for sides in np.ndindex(*(2,) * len(fix)):
            c = np.zeros(2)
            for i, side in zip(fix, sides):
                c[i] = (lo, hi)[side][i]
            if not np.all(np.isfinite(c)):
                continue  # no bound on that side
            free = [i for i in range(2) if i not in fix]
            if free:
                c[free] = np.linalg.solve(M[np.ix_(free, free)], -(b[free] + M[np.ix_(free, fix)] @ c[list(fix)]))
            if np.all(c >= lo - 1e-12) and np.all(c <= hi + 1e-12):
                val = 0.5 * c @ M @ c + b @ c
                if val < best:
                    best, best_c = val, c
    return best_c


@pytest.mark.parametrize("seed", range(6))
def test_a_bounded_momentum_gives_the_models_minimum_over_the_band(x64, seed):
    """With β bounded and α free, the update is the minimizer of the model over the band (numpy's box QP by
    active sets); with α bounded too, α is clipped after that. Seeds where a bound bites and where none does."""
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((4, 4))
    A = m @ m.T + np.eye(4)
    g, prev = rng.standard_normal(4), rng.standard_normal(4)
    V = np.stack([-0.1 * g, prev], axis=1)
    M, b = V.T @ A @ V, V.T @ g
    lo, hi = np.array([-np.inf, 0.0]), np.array([np.inf, 0.3])
    c = _box_minimum(M, b, lo, hi)
    upd, _, info = _apply(QuadraticStep(include_lambda=False, beta_bounds=(0.0, 0.3)), A, g, 0.1 * g, prev)
    np.testing.assert_allclose([info["alpha"], info["beta"]], c, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(upd, V @ c, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(info["model_change"], 0.5 * c @ M @ c + b @ c, rtol=1e-10)
    both = _apply(QuadraticStep(include_lambda=False, alpha_bounds=(0.0, 0.5), beta_bounds=(0.0, 0.3)),
                  A, g, 0.1 * g, prev)[2]
    np.testing.assert_allclose([both["alpha"], both["beta"]], [np.clip(c[0], 0.0, 0.5), c[1]], rtol=1e-10)


def test_consumes_follow_the_fields():
    names = lambda m: [u.quantity.name for u in m.uses()]  # noqa: E731
    assert names(QuadraticStep(source="kfac")) == ["%direction.kfac", "%grad", "%curv_op", "%lambda"]
    assert names(QuadraticStep(include_lambda=False)) == ["%direction.newton", "%grad", "%curv_op"]
    assert names(QuadraticStep(fixed=(0.1, 0.5))) == ["%direction.newton"]


@pytest.mark.parametrize("kw, match", [
    ({"fixed": (-0.1, 0.5)}, "needs alpha >= 0"),
    ({"fixed": (0.1, 1.0)}, "needs alpha >= 0 and 0 <= beta < 1"),
    ({"fixed": (0.1, 0.5), "alpha_bounds": (0.0, 1.0)}, "are not clipped"),
    ({"alpha_bounds": (1.0, 0.0)}, "alpha_bounds=.* has low > high"),
    ({"beta_bounds": (0.5, -0.5)}, "beta_bounds=.* has low > high"),
    ({"fallback_lr": -1e-3}, "fallback_lr"),
    ({"fixed": (float("nan"), 0.5)}, "fixed"),
])
def test_config_errors_name_the_module(kw, match):
    with pytest.raises(cp.ConfigError, match=match) as e:
        QuadraticStep(name="qs", **kw)
    assert e.value.where == "module `qs`"


def test_kfac_with_the_quadratic_step_trains_the_digits_mlp():
    """``kfac(adaptive=True)`` is the adaptive-damping preset (kfac-jax's decay 0.9) with `UpdateTail` swapped
    for ``QuadraticStep(source="kfac", beta_bounds=(0, 1))``: 40 steps on the digits MLP, every step after the first solved in 2-D, no
    step skipped, test loss below a tenth of the start."""
    from curvplan.examples.digits import batches, evaluate, init_mlp, load_digits, mlp

    (xtr, ytr), (xte, yte) = load_digits()
    mods = cp.presets.kfac(adaptive=True)
    swapped = [QuadraticStep(source="kfac", beta_bounds=(0.0, 1.0)) if isinstance(m, UpdateTail) else m
               for m in cp.presets.kfac(adapt_damping_every=5, damping_decay=0.9)]
    assert not cp.diff_plans(cp.compile_plan(mods), cp.compile_plan(swapped))
    p = init_mlp(jax.random.key(0))
    start = float(evaluate(p, xte, yte)[0])
    opt = cp.Optimizer(mods, model_fn=mlp, loss="ce")
    s = opt.init(p, batch=(xtr[:256], ytr[:256]))
    how = []
    for t, b in enumerate(batches(xtr, ytr, 256, 40, 1)):
        p, s, info = opt.step(p, s, b, jax.random.key(t))
        how.append(int(info.quad_fallback))
    assert how[0] == 1 and set(how[1:]) == {0}, how
    assert int(s.skipped) == 0
    assert float(evaluate(p, xte, yte)[0]) < 0.1 * start


@pytest.mark.parametrize("kw", [{"momentum": 0.9}, {"weight_decay": 1e-4}, {"clip_norm": 1.0}])
def test_adaptive_kfac_refuses_settings_the_model_would_override(kw):
    with pytest.raises(cp.ConfigError, match=f"drop {next(iter(kw))}="):
        cp.presets.kfac(adaptive=True, **kw)
