"""Trust-region damping: the gain ratio against closed forms, the λ rule against a plain-Python reference,
the plan diff that adding it causes, and Levenberg-Marquardt against AdamW on Friedman1 (W4), in steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvplan as cp
from benchmarks.workloads import get_workload
from curvplan.examples.digits import batches, evaluate, init_mlp, load_digits, mlp
from curvplan.modules import CG, ConstantDamping, GainRatio, Hessian, TrustRegionDamping, UpdateTail
from curvplan.modules._base import Inputs


def _quadratic(seed=0, n=6):
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((n, n))
    a = m @ m.T + n * np.eye(n)
    b = rng.standard_normal(n)
    return a, b


@pytest.mark.parametrize("lam, include_lambda", [(0.0, False), (0.3, True), (0.3, False)])
def test_gain_ratio_matches_closed_form_on_a_quadratic(x64, lam, include_lambda):
    """L(θ) = ½θᵀAθ − bᵀθ with C = A: act and pred computed with numpy from the definitions; with λ = 0 the
    quadratic model is exact, so ρ = 1."""
    a, b = _quadratic()
    loss = lambda w, batch: 0.5 * w @ (jnp.asarray(a) @ w) - jnp.asarray(b) @ w  # noqa: E731
    mods = [Hessian(), ConstantDamping(lam=lam), CG(tol=1e-12, maxiter=50, warm_start=False),
            UpdateTail(learning_rate=0.7), GainRatio(include_lambda=include_lambda)]
    opt = cp.Optimizer(mods, loss_fn=loss)
    w0 = np.linspace(-1.0, 1.0, 6)
    state = opt.init(jnp.asarray(w0))
    w1, state, info = opt.step(jnp.asarray(w0), state, None)
    delta = np.asarray(w1) - w0
    # the step is −0.7 (A + λI)⁻¹ g
    g = a @ w0 - b
    np.testing.assert_allclose(delta, -0.7 * np.linalg.solve(a + lam * np.eye(6), g), rtol=1e-8)
    f = lambda w: 0.5 * w @ a @ w - b @ w  # noqa: E731
    act = f(w0) - f(w0 + delta)
    pred = -(g @ delta + 0.5 * (delta @ a @ delta + (lam * delta @ delta if include_lambda else 0.0)))
    # StepInfo stores telemetry as float32: compare to float32 resolution (a few ulps, 2^-23 ≈ 1.2e-7)
    np.testing.assert_allclose(float(info.act_decrease), act, rtol=5e-7)
    np.testing.assert_allclose(float(info.pred_decrease), pred, rtol=5e-7)
    np.testing.assert_allclose(float(info.rho), act / pred, rtol=5e-7)
    np.testing.assert_allclose(float(info.loss_after), f(w0 + delta), rtol=5e-7)
    if lam == 0.0:
        np.testing.assert_allclose(float(info.rho), 1.0, rtol=5e-7)


def _lambda_rule(lam, rho, low=0.25, high=0.75, inc=1.5, dec=0.5, lo=1e-12, hi=1e6):
    """docs/math.md §4, written out in plain Python."""
    if np.isnan(rho):
        return lam
    r = min(max(rho, -5.0), 5.0)
    if r < low:
        lam *= inc
    elif r > high:
        lam *= dec
    return min(max(lam, lo), hi)


def test_trust_region_lambda_follows_the_rule():
    mod = TrustRegionDamping(lam0=1.0)
    state = mod.init(None, None)
    ctx = cp.modules.Context(step=jnp.zeros((), jnp.int32), rng=None, params=None, batch=None, objective=None,
                             module="tr")
    lam = 1.0
    for rho in [0.1, 0.9, 0.5, np.nan, -100.0, -np.inf, 10.0, 0.75, 0.25, 0.2] + [0.0] * 80:
        out, state, info = mod.apply(Inputs({"rho": jnp.asarray(rho, jnp.float32)}, "tr"), state, ctx)
        lam = _lambda_rule(lam, rho)
        np.testing.assert_allclose(float(out["lam"]), lam, rtol=1e-5)
        assert float(info["lambda_next"]) == float(out["lam"]) == float(state.lam)
    assert lam == 1e6  # eighty increases hit the clamp


@pytest.mark.parametrize("lr", [3.0, 0.0])
def test_a_model_predicting_an_increase_raises_lambda(x64, lr):
    """L = ½θᵀAθ − bᵀθ, C = A, λ₀ = 1, δ = −lr (A + I)⁻¹g, the λ term left out of the model (as in K-FAC's
    adaptive preset). With lr = 3 the step overshoots: numpy's pred = −(gᵀδ + ½δᵀAδ) is negative, so the
    model is not to be trusted and λ must rise to 1.5·λ₀ = 1.5 (before the fix ρ was NaN and λ stayed 1).
    A zero step (lr = 0) tells nothing about the model: ρ is NaN and λ stays 1."""
    a, b = _quadratic()
    loss = lambda w, batch: 0.5 * w @ (jnp.asarray(a) @ w) - jnp.asarray(b) @ w  # noqa: E731
    mods = [Hessian(), TrustRegionDamping(lam0=1.0), GainRatio(include_lambda=False),
            CG(tol=1e-12, maxiter=50, warm_start=False), UpdateTail(learning_rate=lr)]
    opt = cp.Optimizer(mods, loss_fn=loss)
    w0 = np.linspace(-1.0, 1.0, 6)
    w1, state, info = opt.step(jnp.asarray(w0), opt.init(jnp.asarray(w0)), None)
    g = a @ w0 - b
    delta = -lr * np.linalg.solve(a + np.eye(6), g)
    pred = -(g @ delta + 0.5 * delta @ a @ delta)
    np.testing.assert_allclose(float(info.pred_decrease), pred, rtol=5e-7, atol=1e-12)
    assert not bool(info.skipped)
    if lr:
        assert pred < 0
        assert float(info.rho) == -np.inf
        assert float(info.lambda_next) == min(max(1.0 * 1.5, 1e-12), 1e6)
    else:
        assert pred == 0.0 and np.isnan(float(info.rho))
        assert float(info.lambda_next) == 1.0


def test_predicted_increase_raises_lambda_up_to_the_clamp():
    """ρ = −∞ (a predicted increase) multiplies λ by ``increase`` and clamps it: 0.8·2 → 1.6, then 1.6·2 → 2."""
    mod = TrustRegionDamping(lam0=0.8, increase=2.0, lam_max=2.0)
    state = mod.init(None, None)
    ctx = cp.modules.Context(step=jnp.zeros((), jnp.int32), rng=None, params=None, batch=None, objective=None,
                             module="tr")
    for want in (1.6, 2.0):
        out, state, _ = mod.apply(Inputs({"rho": jnp.asarray(-jnp.inf, jnp.float32)}, "tr"), state, ctx)
        np.testing.assert_allclose(float(out["lam"]), want, rtol=1e-6)


def test_trust_region_config_errors():
    with pytest.raises(cp.Error, match="low=0.9 must be below high"):
        TrustRegionDamping(low=0.9, high=0.5)
    with pytest.raises(cp.Error, match="outside"):
        TrustRegionDamping(lam0=1e9)


@pytest.mark.parametrize("kw, module", [({}, "trust_region_damping"), ({"name": "tr"}, "tr")])
def test_trust_region_bad_bounds_raise_one_config_error_naming_the_module(kw, module):
    with pytest.raises(cp.ConfigError) as e:
        TrustRegionDamping(low=0.9, high=0.1, **kw)
    text = str(e.value)
    assert text.count("where:") == 1 and text.count("fix:") == 1, text
    assert e.value.where == f"module `{module}`"
    assert e.value.what == "low=0.9 must be below high=0.1"
    assert e.value.__cause__ is None and e.value.__suppress_context__  # raised once, not chained


def test_adding_a_trust_region_adds_exactly_the_rho_nodes_at_their_cadence():
    base = cp.presets.gauss_newton_cg(loss="mse")
    with_tr = [m for m in base if not isinstance(m, ConstantDamping)] + [
        TrustRegionDamping(every=5), GainRatio(every=5)]
    d = cp.diff_plans(cp.compile_plan(base, name="gn"), cp.compile_plan(with_tr, name="gn"))
    assert set(d.added) == {"gain_ratio: gain_ratio @every(5)", "trust_region_damping: trust_region_damping @every(5)"}
    assert set(d.removed) == {"constant_damping: constant_damping @every(1)"}
    assert [x[0] for x in d.added_quantities] == ["%rho"], d.added_quantities
    assert not d.changed
    plan = cp.compile_plan(with_tr, name="gn")
    # ρ (one extra forward + one GGN product) runs on steps 0, 5, 10, ... only
    assert [("gain_ratio" in plan.running(t)) for t in range(11)] == [t % 5 == 0 for t in range(11)]


def test_levenberg_marquardt_needs_10x_fewer_steps_than_adamw_on_friedman1():
    """W4 (Friedman1 MLP 10-64-64-1, full batch): the train MSE LM reaches in 20 steps is not reached by
    AdamW (best of three learning rates) within 200 steps."""
    w = get_workload("w4-full")
    batch = next(w.batches())
    params0 = w.init(jax.random.key(0))
    # full batch: deterministic, so λ may go as low as the gain ratio allows (the minibatch floor is λ0 / 10)
    opt = cp.Optimizer(cp.presets.levenberg_marquardt(lam_min=1e-12), **w.optimizer_kwargs())
    p, state = params0, opt.init(params0)
    for _ in range(20):
        p, state, info = opt.step(p, state, batch)
    lm_loss = float(w.loss_fn(p, batch))
    assert lm_loss < 0.5 * float(w.loss_fn(params0, batch))

    def adamw_steps_to(target, lr, budget=200):
        tx = optax.adamw(lr, weight_decay=0.0)

        def body(carry, _):
            p, s = carry
            loss, g = jax.value_and_grad(w.loss_fn)(p, batch)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), loss

        _, losses = jax.lax.scan(body, (params0, tx.init(params0)), None, length=budget + 1)
        hit = np.nonzero(np.asarray(losses) <= target)[0]
        return int(hit[0]) if len(hit) else None

    for lr in (1e-3, 3e-3, 1e-2):
        assert adamw_steps_to(lm_loss, lr) is None, f"AdamW lr={lr} reached LM's 20-step loss {lm_loss:.2e}"


@pytest.mark.parametrize("preset", ["levenberg_marquardt", "hessian_free"])
def test_minibatch_presets_train_the_digits_mlp_at_their_default_damping_floor(preset):
    """On minibatches ρ is measured on the batch the step was fitted to, so it keeps approving a smaller λ until
    one step overshoots the next batch: with a floor of 1e-12 both presets diverge on the digits MLP (test loss
    ~1e3 after 60 steps); the presets' floor (λ0 / 10) keeps them training."""
    (xtr, ytr), (xte, yte) = load_digits()
    p = init_mlp(jax.random.key(0))
    start = float(evaluate(p, xte, yte)[0])
    opt = cp.Optimizer(getattr(cp.presets, preset)(loss="ce"), model_fn=mlp, loss="ce")
    s = opt.init(p)
    for t, b in enumerate(batches(xtr, ytr, 256, 60, 1)):
        p, s, info = opt.step(p, s, b, jax.random.key(t))
    assert int(s.skipped) == 0
    assert float(evaluate(p, xte, yte)[0]) < 0.1 * start
