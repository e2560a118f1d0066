"""Second-order presets: golden plan texts, and a few training steps on W1 (digits MLP) and W4 (Friedman1
MLP) with a loss-decrease assertion on a fixed small subset (full batch on it, so the loss is deterministic).

The dense-direct presets materialize the n×n curvature, so they train a narrower MLP (in-8-out) on the same
data; the others train the workloads' own models.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvplan as cp
from benchmarks.workloads import get_workload
from curvplan.modules import _presets_second_order as P
from curvplan.testing import assert_plan_text


# -- golden plans ---------------------------------------------------------------------------------------
def test_golden_newton_direct():
    assert_plan_text(cp.compile_plan(P.newton_direct(), name="newton_direct"), """
        plan newton_direct: 1 phase, period 1
        phase 0 @every(1) [linearize_grad]
          %grad, %hvp_op.hessian, %loss = linearize_grad(params, batch)
          %lambda                       = constant_damping() -> carried
          %curv_op                      = hessian(%hvp_op.hessian)
          %direction.newton             = dense_direct(%curv_op, %grad, %lambda)
          %update                       = update_tail(%direction.newton, params)
        state: step, update_tail.opt_state, slot %lambda
    """)


def test_golden_ggn_direct():
    assert_plan_text(cp.compile_plan(P.ggn_direct(loss="ce", method="eigh"), name="ggn_direct"), """
        plan ggn_direct: 1 phase, period 1
        phase 0 @every(1) [linearize_model]
          %ggn_op.ce, %grad, %loss = linearize_model(params, batch, rng)
          %lambda                  = constant_damping() -> carried
          %curv_op                 = ggn(%ggn_op.ce)
          %direction.newton        = dense_direct(%curv_op, %grad, %lambda; method=eigh)
          %update                  = update_tail(%direction.newton, params)
        state: step, update_tail.opt_state, slot %lambda
    """)


def test_golden_egn_mse_cholesky():
    assert_plan_text(cp.compile_plan(P.egn(loss="mse"), name="egn_mse"), """
        plan egn_mse: 1 phase, period 1
        phase 0 @every(1) [linearize_model]
          %loss, %model_lin = linearize_model(params, batch, rng)
          %lambda           = constant_damping() -> carried
          %direction.newton = row_space(%model_lin, %lambda)
          %update           = update_tail(%direction.newton, params)
        state: step, update_tail.opt_state, slot %lambda
    """)


def test_golden_egn_ce_cg():
    assert_plan_text(cp.compile_plan(P.egn(loss="ce", solver="cg"), name="egn_ce_cg"), """
        plan egn_ce_cg: 1 phase, period 1
        phase 0 @every(1) [linearize_model]
          %loss, %model_lin = linearize_model(params, batch, rng)
          %lambda           = constant_damping() -> carried
          %direction.newton = row_space(%model_lin, %lambda; loss=ce, solver=cg)
          %update           = update_tail(%direction.newton, params)
        state: step, update_tail.opt_state, slot %lambda
    """)


def test_golden_adahessian():
    assert_plan_text(cp.compile_plan(P.adahessian(), name="adahessian"), """
        plan adahessian: 1 phase, period 1
        phase 0 @every(1) [linearize_grad]
          %grad, %hvp_op.hessian, %loss = linearize_grad(params, batch)
          %curv_op                      = hessian(%hvp_op.hessian)
          %diag.curvature               = hutchinson_diag(%curv_op, rng)
          %diag.curvature_1             = spatial_average(%diag.curvature)
          %precond.diag                 = diag_ema(%diag.curvature_1; estimate=((est,hutchinson),(probes,1),(spatial,mean)), mode=adahessian) -> carried
          %direction.diag               = diagonal_direction(%grad, %precond.diag)
          %update                       = update_tail(%direction.diag, params; clip_norm=1.0, learning_rate=0.15, source=diag)
        state: step, diag_ema.v, diag_ema.count, diagonal_direction.m, diagonal_direction.count, update_tail.opt_state, slot %precond.diag
    """)


def test_golden_sophia_h():
    assert_plan_text(cp.compile_plan(P.sophia_h(), name="sophia_h"), """
        plan sophia_h: 2 phases, period 10
        phase 0 @every(10) [linearize_grad]
          %grad, %hvp_op.hessian, %loss = linearize_grad(params, batch)
          %curv_op                      = hessian(%hvp_op.hessian)
          %diag.curvature               = hutchinson_diag(%curv_op, rng)
          %precond.diag                 = diag_ema(%diag.curvature) -> carried
          %direction.diag               = diagonal_direction(%grad, %precond.diag; beta1=0.965, mode=sophia)
          %update                       = update_tail(%direction.diag, params; source=diag, weight_decay=0.2)
        phase 1 otherwise [value_and_grad]
          %grad, %loss    = value_and_grad(params, batch)
          %direction.diag = diagonal_direction(%grad, carried %precond.diag; beta1=0.965, mode=sophia)
          %update         = update_tail(%direction.diag, params; source=diag, weight_decay=0.2)
        state: step, diag_ema.v, diag_ema.count, diagonal_direction.m, diagonal_direction.count, update_tail.opt_state, slot %precond.diag
    """)


def test_golden_sophia_g():
    assert_plan_text(cp.compile_plan(P.sophia_g(), name="sophia_g"), """
        plan sophia_g: 2 phases, period 10
        phase 0 @every(10) [linearize_model]
          %fisher_op.sampled, %grad, %loss = linearize_model(params, batch, rng)
          %diag.curvature                  = gnb_diag(%fisher_op.sampled, rng)
          %precond.diag                    = diag_ema(%diag.curvature; estimate=((est,gnb),(probes,1))) -> carried
          %direction.diag                  = diagonal_direction(%grad, %precond.diag; beta1=0.965, gamma=0.05, mode=sophia)
          %update                          = update_tail(%direction.diag, params; source=diag, weight_decay=0.2)
        phase 1 otherwise [value_and_grad]
          %grad, %loss    = value_and_grad(params, batch)
          %direction.diag = diagonal_direction(%grad, carried %precond.diag; beta1=0.965, gamma=0.05, mode=sophia)
          %update         = update_tail(%direction.diag, params; source=diag, weight_decay=0.2)
        state: step, diag_ema.v, diag_ema.count, diagonal_direction.m, diagonal_direction.count, update_tail.opt_state, slot %precond.diag
    """)


def test_sophia_linearizes_only_on_refresh_steps():
    plan = cp.compile_plan(P.sophia_h(hessian_every=10))
    providers = [[op.op for op in plan.phases[plan.phase_of(t)].ops if op.role == "provider"]
                 for t in range(20)]
    assert [t for t, p in enumerate(providers) if p == ["linearize_grad"]] == [0, 10]
    assert all(p == ["value_and_grad"] for t, p in enumerate(providers) if t % 10)


# -- training -------------------------------------------------------------------------------------------
def narrow_mlp(d_in, d_out, key, hidden=8):
    k1, k2 = jax.random.split(key)
    return {"layer_0": {"w": jax.random.normal(k1, (d_in, hidden)) / np.sqrt(d_in), "b": jnp.zeros(hidden)},
            "layer_1": {"w": jax.random.normal(k2, (hidden, d_out)) / np.sqrt(hidden), "b": jnp.zeros(d_out)}}


PRESETS = {  # name -> (modules for a loss kind, narrow model?, steps, required loss ratio)
    "newton_direct": (lambda kind: P.newton_direct(lam=1.0), True, 8, 0.7),
    "ggn_direct": (lambda kind: P.ggn_direct(loss=kind, lam=1.0), True, 8, 0.7),
    "egn_cholesky": (lambda kind: P.egn(loss=kind, lam=1.0), False, 6, 0.7),
    "egn_cg": (lambda kind: P.egn(loss=kind, solver="cg", lam=1.0), False, 6, 0.7),
    "adahessian": (lambda kind: P.adahessian(learning_rate=0.05), False, 10, 0.9),
    "sophia_h": (lambda kind: P.sophia_h(learning_rate=0.01, hessian_every=5), False, 10, 0.9),
    "sophia_g": (lambda kind: P.sophia_g(learning_rate=0.01, hessian_every=5), False, 10, 0.9),
}


@pytest.mark.parametrize("workload", ["w1", "w4"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_trains(preset, workload):
    make, narrow, steps, ratio = PRESETS[preset]
    w = get_workload(workload)
    x, y = w.train
    n = 32 if workload == "w1" else 64  # W1 CE rows are B·10 for the row-space solvers
    batch = (jnp.asarray(x[:n]), jnp.asarray(y[:n]))
    key = jax.random.key(0)
    params = narrow_mlp(x.shape[1], 10 if workload == "w1" else 1, key) if narrow else w.init(key)
    opt = cp.Optimizer(make(w.loss_kind), **w.optimizer_kwargs())
    state = opt.init(params)
    l0 = float(w.loss_fn(params, batch))
    for t in range(steps):
        params, state, info = opt.step(params, state, batch, rng=jax.random.key(t))
        assert not bool(info.skipped)
    l1 = float(w.loss_fn(params, batch))
    assert l1 < ratio * l0, (l0, l1)
    assert opt.trace_counts == [1] * len(opt.plan.programs)  # each program compiled once


# -- exact updates on a separable quadratic (Hutchinson is exact for a diagonal Hessian) --------------------
def numpy_diag_method(a, b, x, steps, *, mode, lr, beta1, beta2, every=1, gamma=0.01, eps=1e-8, wd=0.0):
    """docs/math.md §5 diagonal lane in plain numpy for f(x) = ½ Σ a_i x_i² − b·x (Hessian diag(a))."""
    m = np.zeros_like(x)
    v = np.zeros_like(x)
    k = 0
    for t in range(steps):
        g = a * x - b
        m = beta1 * m + (1 - beta1) * g
        mhat = m / (1 - beta1 ** (t + 1))
        if t % every == 0:
            d = np.abs(a) if mode == "adahessian" else a  # AdaHessian: |z ⊙ Hz| (spatial average of a vector)
            v = beta2 * v + (1 - beta2) * (d**2 if mode == "adahessian" else d)
            k += 1
        vhat = v / (1 - beta2**k)
        if mode == "adahessian":
            s = mhat / (np.sqrt(np.maximum(vhat, 0)) + eps)
        else:
            s = np.clip(mhat / np.maximum(gamma * vhat, eps), -1, 1)
        x = x - lr * (s + wd * x)
    return x


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("preset", ["adahessian", "sophia_h"])
def test_diagonal_presets_match_numpy_reference(preset):
    a = np.array([2.0, -0.5, 1e-3, 4.0, 0.3])  # a negative and a tiny curvature (Sophia's clip / eps paths)
    b = np.array([1.0, 0.2, -0.3, 0.5, 0.0])
    x0 = np.array([0.5, -1.0, 2.0, 0.1, -0.4])
    if preset == "adahessian":
        mods = P.adahessian(learning_rate=0.1, beta2=0.999, clip_norm=None)
        ref = numpy_diag_method(a, b, x0, 7, mode="adahessian", lr=0.1, beta1=0.9, beta2=0.999)
    else:
        mods = P.sophia_h(learning_rate=0.1, hessian_every=3, gamma=0.5)
        ref = numpy_diag_method(a, b, x0, 7, mode="sophia", lr=0.1, beta1=0.965, beta2=0.99, every=3,
                                gamma=0.5, wd=0.2)
    opt = cp.Optimizer(mods, loss_fn=lambda x, bt: 0.5 * jnp.sum(bt[0] * x * x) - bt[1] @ x)
    x = jnp.asarray(x0)
    state = opt.init(x)
    for t in range(7):
        x, state, _ = opt.step(x, state, (jnp.asarray(a), jnp.asarray(b)), rng=jax.random.key(t))
    np.testing.assert_allclose(np.asarray(x), ref, rtol=1e-6, atol=1e-9)
