"""Fault injection through every preset and every driver (`step`, `run`, `as_optax`).

Each preset trains a small classifier for a fixed timeline with one fault per chosen step: a NaN input, a label
out of range, a learning-rate schedule that returns +Inf once, and (for `as_optax`, where the user hands the
gradient in) an Inf gradient. A faulty step must not move the parameters, must leave the floating state bit for
bit as it was (counters move on), must be counted, and the steps after it must train normally. Then every
floating entry of the state is poisoned with a NaN (a corrupted checkpoint, a fault in another program): the
optimizer skips at most two steps, starts the poisoned entries afresh, and trains on with a finite state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvplan as cp

CLASSES, STEPS, LR_FAULT = 3, 8, 5
NAN_INPUT, BAD_LABEL, BAD_GRAD = 1, 3, 2  # BAD_GRAD: as_optax only (the user computes the gradient)
FAULTS = {NAN_INPUT, BAD_LABEL, LR_FAULT}
KEY = jax.random.key(0)


def model_fn(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def loss_fn(p, batch):
    x, y = batch
    logits = model_fn(p, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def params0():
    r = np.random.default_rng(0)
    return {"w1": jnp.asarray(r.normal(size=(4, 6)) / 2, jnp.float32), "b1": jnp.zeros(6, jnp.float32),
            "w2": jnp.asarray(r.normal(size=(6, CLASSES)) / 2, jnp.float32), "b2": jnp.zeros(CLASSES, jnp.float32)}


def batch(t: int):
    r = np.random.default_rng(100 + t)
    x = r.normal(size=(16, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5).astype(np.int32)
    if t == NAN_INPUT:
        x[2, 1] = np.nan
    if t == BAD_LABEL:
        y[5] = CLASSES  # one past the last class
    return jnp.asarray(x), jnp.asarray(y)


def lr(base):
    return lambda count: jnp.where(count == LR_FAULT, jnp.inf, base)


PRESETS = {
    "adahessian": lambda: cp.presets.adahessian(lr(0.1)),
    "adaptive_schatten": lambda: cp.presets.adaptive_schatten(lr(0.02), every=2),
    "egn": lambda: cp.presets.egn(lr(0.5), loss="ce"),
    "gauss_newton_cg": lambda: cp.presets.gauss_newton_cg(lr(0.5), loss="ce"),
    "ggn_direct": lambda: cp.presets.ggn_direct(lr(0.5), loss="ce"),
    "hessian_free": lambda: cp.presets.hessian_free(lr(0.5), loss="ce", rho_every=2, precond_every=2),
    "kfac": lambda: cp.presets.kfac(lr(0.1), inverse_every=2, loss="ce"),
    "levenberg_marquardt": lambda: cp.presets.levenberg_marquardt(lr(0.5), loss="ce"),
    "muadam": lambda: cp.presets.muadam(lr(1e-2)),
    "muon": lambda: cp.presets.muon(lr(1e-2)),
    "newton_cg": lambda: cp.presets.newton_cg(lr(0.5)),
    "newton_direct": lambda: cp.presets.newton_direct(lr(0.5)),
    "scao": lambda: cp.presets.scao_modules(lr(1e-3), warmup_steps=2, precond_freq=2, blend_steps=2,
                                            min_precond_updates=1),
    "scion": lambda: cp.presets.scion(lr(1e-2)),
    "shampoo": lambda: cp.presets.shampoo(lr(1e-2), root_every=2),
    "soap": lambda: cp.presets.soap(lr(1e-2), precondition_frequency=2),
    "sophia_g": lambda: cp.presets.sophia_g(lr(1e-2), hessian_every=2),
    "sophia_h": lambda: cp.presets.sophia_h(lr(1e-2), hessian_every=2),
}


def floats(tree):
    return [np.asarray(a) for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.inexact)]


def assert_kept(before, after, where):
    for i, (x, y) in enumerate(zip(floats(before), floats(after))):
        np.testing.assert_array_equal(x, y, err_msg=f"{where}: floating state entry {i} changed on a skipped step")


def assert_finite_state(state, where):
    # the one entry whose NaN is a value: a gain ratio no valid model gave (`GainRatio.nonfinite_outputs`)
    slots = {k: v for k, v in state.slots.items() if not k.startswith("%rho")}
    for i, x in enumerate(floats((state.modules, slots))):
        assert np.all(np.isfinite(x)), f"{where}: state entry {i} is not finite"


def poison(state):
    """A NaN in the first element of every floating entry (module states and carried slots)."""
    def one(x):
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            return x
        return x.reshape(-1).at[0].set(jnp.nan).reshape(x.shape)
    return state._replace(modules=jax.tree.map(one, state.modules), slots=jax.tree.map(one, state.slots))


def seen_by_the_loss(p, q):
    """Pairs of parameters with the class-mean of the output layer taken out, which the softmax cannot see.

    Every gradient of w2 has rows summing to zero, so SOAP's right gram has the all-ones null vector, and its
    Adam-in-the-basis step divides two rounding-level numbers along it: two programs (step, scan) then move w2
    by different amounts in a direction no loss or prediction depends on."""
    def centred(k, x):
        x = np.asarray(x, np.float64)
        return x - x.mean(axis=-1, keepdims=True) if k in ("w2", "b2") else x
    return {k: (centred(k, p[k]), centred(k, q[k])) for k in p}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_step_and_run_skip_faults_keep_state_and_recover(name):
    opt = cp.Optimizer(PRESETS[name](), loss_fn, model_fn=model_fn, loss="ce")
    p, s = params0(), opt.init(params0())
    first_p, first_s = p, s
    for t in range(STEPS):
        p1, s1, info = opt.step(p, s, batch(t), KEY)
        assert bool(info.skipped) == (t in FAULTS), f"{name}: step {t} skipped={bool(info.skipped)}"
        if t in FAULTS:
            for k in p:
                np.testing.assert_array_equal(np.asarray(p1[k]), np.asarray(p[k]), err_msg=f"{name}: step {t}")
            assert_kept(s.modules, s1.modules, f"{name}, step {t}")
            assert_kept(s.slots, s1.slots, f"{name}, step {t}")
        else:
            assert all(np.all(np.isfinite(np.asarray(v))) for v in p1.values())
        p, s = p1, s1
    assert int(s.skipped) == len(FAULTS) and int(s.step) == STEPS

    # the scanned driver sees the same faults at the same steps and ends where the step driver does
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[batch(t) for t in range(STEPS)])
    rp, rs, infos = opt.run(first_p, first_s, stacked, KEY)
    assert [bool(x) for x in infos.skipped] == [t in FAULTS for t in range(STEPS)]
    for k, (a, b) in seen_by_the_loss(rp, p).items():
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=f"{name}: {k}")

    # poisoned state: started afresh where it is not finite, then training goes on
    s = poison(s)
    skipped_before = int(s.skipped)
    for t in range(STEPS, STEPS + 6):
        p, s, info = opt.step(p, s, batch(t), KEY)
    # (an entry the next step overwrites before anything reads it, like a constant damping's λ, costs no skip)
    assert int(s.skipped) - skipped_before <= 2, f"{name}: {int(s.skipped) - skipped_before} skips"
    assert not bool(info.skipped) and np.isfinite(float(info.loss))
    assert all(np.all(np.isfinite(np.asarray(v))) for v in p.values())
    assert_finite_state(s, name)


@pytest.mark.parametrize("name", sorted(set(PRESETS) - {"egn"}))
def test_as_optax_skips_faults_and_keeps_state(name):
    tx = cp.as_optax(PRESETS[name](), loss_fn, model_fn=model_fn, loss="ce")
    update = jax.jit(lambda g, s, p, b: tx.update(g, s, p, batch=b, rng=KEY))
    p = params0()
    s = tx.init(p)
    # the user computes the gradient here, and an out-of-range label only drops out of its gather (the gradient
    # stays finite): labels are checked where curvplan computes the loss (`step`, `run`), not in this timeline
    faults = (FAULTS - {BAD_LABEL}) | {BAD_GRAD}
    for t in range(STEPS):
        b = batch(t if t != BAD_LABEL else STEPS)
        g = jax.grad(loss_fn)(p, b)
        if t == BAD_GRAD:
            g = {**g, "w1": g["w1"].at[0, 0].set(jnp.inf)}
        u, s1 = update(g, s, p, b)
        assert bool(s1.info.skipped) == (t in faults), f"{name}: step {t}"
        if t in faults:
            assert float(optax.tree.norm(u)) == 0.0
            assert_kept(s.plan_state.modules, s1.plan_state.modules, f"{name}, step {t}")
            assert_kept(s.plan_state.slots, s1.plan_state.slots, f"{name}, step {t}")
        p, s = optax.apply_updates(p, u), s1
    assert int(s.plan_state.skipped) == len(faults)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in p.values())


def test_egn_as_optax_is_refused_rather_than_ignoring_the_gradient():
    with pytest.raises(cp.LoweringError):
        cp.as_optax(PRESETS["egn"](), loss_fn, model_fn=model_fn, loss="ce")


def test_kfac_does_not_take_an_overflowing_batch_into_its_factors():
    """Inputs ×1e20 overflow A = E[aaᵀ] in float32 while the loss stays finite (tanh saturates): the step is not
    applied, the factors are kept, and later refreshes succeed."""
    opt = cp.Optimizer(cp.presets.kfac(0.1, inverse_every=2, loss="ce"), loss_fn, model_fn=model_fn, loss="ce")
    p, s = params0(), opt.init(params0())
    for t in range(6, 9):
        p, s, _ = opt.step(p, s, batch(t), KEY)
    x, y = batch(9)
    p1, s1, info = opt.step(p, s, (x * 1e20, y), KEY)
    assert np.isfinite(float(info.loss)) and bool(info.skipped)
    assert_kept(s.modules, s1.modules, "kfac")
    failures = []  # per step: −1 where no inverse refresh ran
    for t in range(10, 16):
        p1, s1, info = opt.step(p1, s1, batch(t), KEY)
        assert not bool(info.skipped)
        failures.append(int(info.kfac_inverse_failures))
    assert failures.count(0) == 3 and set(failures) == {-1, 0}, failures
    assert_finite_state(s1, "kfac")
