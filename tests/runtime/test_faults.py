"""Faults that must not corrupt or stall training: a non-finite gradient, loss or update is not applied, the
floating state is kept bit for bit, and counters (the step, a schedule's count) move on."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import curvplan as cp


def _floats(tree):
    return [np.asarray(a) for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.inexact)]


def test_a_schedule_that_returns_inf_once_skips_one_step_only():
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)}
    lr = lambda t: jnp.where(t == 20, jnp.inf, 0.01)  # noqa: E731
    tx = cp.as_optax(cp.presets.muon(lr))
    s = tx.init(params)
    update = jax.jit(tx.update)
    for t in range(30):
        u, s = update(jax.tree.map(lambda x, t=t: jnp.cos(x + t), params), s, params)
        assert bool(s.info.skipped) == (t == 20)
        assert (float(optax.tree.norm(u)) == 0.0) == (t == 20)
    assert int(s.plan_state.skipped) == 1 and int(s.plan_state.step) == 30


def test_an_inf_gradient_leaves_sophia_state_untouched():
    params = {"w": jnp.ones((4, 3)) * 0.1}
    loss = lambda p, b: jnp.sum((b @ p["w"]) ** 2)  # noqa: E731
    tx = cp.as_optax(cp.presets.sophia_h(1e-2, hessian_every=2), loss)
    b, key = jnp.ones((5, 4)), jax.random.key(0)
    s = tx.init(params)
    for _ in range(3):
        _, s = tx.update(jax.grad(loss)(params, b), s, params, batch=b, rng=key)
    before = _floats(s.plan_state)
    bad = jax.tree.map(lambda g: g.at[0, 0].set(jnp.inf), jax.grad(loss)(params, b))
    u, s2 = tx.update(bad, s, params, batch=b, rng=key)
    assert bool(s2.info.skipped) and float(optax.tree.norm(u)) == 0.0
    for x, y in zip(before, _floats(s2.plan_state)):
        np.testing.assert_array_equal(x, y)
    _, s3 = tx.update(jax.grad(loss)(params, b), s2, params, batch=b, rng=key)  # training resumes
    assert not bool(s3.info.skipped) and int(s3.plan_state.skipped) == 1


def test_a_label_out_of_range_is_not_applied():
    params = {"w": jnp.ones((4, 3)) * 0.1}
    opt = cp.Optimizer(cp.presets.gauss_newton_cg(loss="ce"), model_fn=lambda p, x: x @ p["w"], loss="ce")
    x, y = jnp.ones((6, 4)), jnp.array([0, 1, 2, 0, 1, 3])  # 3 classes: label 3 is out of range
    state = opt.init(params)
    p1, state, info = opt.step(params, state, (x, y))
    assert not np.isfinite(float(info.loss)) and bool(info.skipped)
    np.testing.assert_array_equal(np.asarray(p1["w"]), np.asarray(params["w"]))
