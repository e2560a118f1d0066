"""Muon and the Scion-style LMO step, run through `curvplan.Optimizer`, against optax.contrib.muon and
hand-written references (optax's own Newton-Schulz, numpy SVD)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import ctx_for, optax_trajectory
from optax.contrib import MuonDimensionNumbers
from optax.contrib._muon import orthogonalize_via_newton_schulz

import curvplan as cp
from curvplan.ir._errors import ConfigError
from curvplan.modules import presets
from curvplan.modules._base import Inputs
from curvplan.modules.geometry import LMODirection, MuonDirection


def make_problem(seed=0):
    """A small MLP with 2-D kernels of two equal shapes (so stacking is exercised), biases and a head."""
    k = jax.random.split(jax.random.key(seed), 8)
    params = {
        "embed": {"w": jax.random.normal(k[0], (6, 16)) / 3},
        "h1": {"w": jax.random.normal(k[1], (16, 16)) / 4, "b": jnp.zeros(16)},
        "h2": {"w": jax.random.normal(k[2], (16, 16)) / 4, "b": 0.1 * jnp.ones(16)},
        "head": {"w": jax.random.normal(k[3], (16, 3)) / 4, "b": jnp.zeros(3)},
        "scale": jnp.ones(()),
    }

    def loss_fn(p, batch):
        x, y = batch
        h = jnp.tanh(x @ p["embed"]["w"])
        h = jnp.tanh(h @ p["h1"]["w"] + p["h1"]["b"])
        h = jnp.tanh(h @ p["h2"]["w"] + p["h2"]["b"])
        out = p["scale"] * (h @ p["head"]["w"] + p["head"]["b"])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, y))

    batches = []
    for i in range(4):
        kx, ky = jax.random.split(jax.random.fold_in(k[4], i))
        batches.append((jax.random.normal(kx, (32, 6)), jax.random.randint(ky, (32,), 0, 3)))
    return params, loss_fn, batches




def run_curvplan(modules, params, loss_fn, batches):
    opt = cp.Optimizer(modules, loss_fn=loss_fn)
    state = opt.init(params)
    out = []
    for b in batches:
        params, state, info = opt.step(params, state, b)
        assert not bool(info.skipped)
        out.append(params)
    return out


def assert_trajectories_close(a, b, atol=2e-6):
    for pa, pb in zip(a, b):
        jax.tree.map(
            lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=atol),
            pa,
            pb,
        )


def test_muon_equals_optax_contrib_muon_default_routing():
    params, loss_fn, batches = make_problem()
    ref = optax_trajectory(optax.contrib.muon(0.05), params, loss_fn, batches)
    got = run_curvplan(presets.muon(0.05), params, loss_fn, batches)
    assert_trajectories_close(got, ref)


def test_muon_equals_optax_with_head_and_embedding_on_adam_weight_decay_and_adam_lr():
    params, loss_fn, batches = make_problem(1)

    def dims(p):  # optax's way of sending embed/head to AdamW: None dimension numbers
        return {
            k: jax.tree.map(
                lambda x, k=k: None if k in ("embed", "head") or x.ndim != 2 else MuonDimensionNumbers(), v
            )
            for k, v in p.items()
        }

    tx = optax.contrib.muon(
        0.03,
        weight_decay=0.1,
        adam_weight_decay=0.01,
        adam_learning_rate=0.006,
        muon_weight_dimension_numbers=dims,
    )
    ref = optax_trajectory(tx, params, loss_fn, batches)
    mods = presets.muon(
        0.03, weight_decay=0.1, adam_weight_decay=0.01, adam_lr_ratio=0.2, adam_keys=("['embed']", "['head']")
    )
    got = run_curvplan(mods, params, loss_fn, batches)
    assert_trajectories_close(got, ref)

    def labels(p):
        return {
            k: jax.tree.map(lambda x, k=k: "adam" if k in ("embed", "head") or x.ndim != 2 else "muon", v)
            for k, v in p.items()
        }

    mods = presets.muon(
        0.03, weight_decay=0.1, adam_weight_decay=0.01, adam_lr_ratio=0.2, param_labels=labels
    )
    assert_trajectories_close(run_curvplan(mods, params, loss_fn, batches), ref)


def test_muon_as_optax_matches_too():
    params, loss_fn, batches = make_problem(2)
    ref = optax_trajectory(optax.contrib.muon(0.05), params, loss_fn, batches[:3])
    tx = cp.as_optax(presets.muon(0.05), loss_fn=loss_fn)
    state, p, got = tx.init(params), params, []
    for b in batches[:3]:
        u, state = tx.update(jax.grad(loss_fn)(p, b), state, p, batch=b)
        p = optax.apply_updates(p, u)
        got.append(p)
    assert_trajectories_close(got, ref)


def test_muon_routing_errors_are_config_errors():
    with pytest.raises(ConfigError, match="param_labels"):
        MuonDirection(param_labels=lambda p: jax.tree.map(lambda x: "sgd", p)).route({"w": jnp.ones((2, 2))})
    with pytest.raises(ConfigError, match="2-D"):
        MuonDirection(param_labels=lambda p: jax.tree.map(lambda x: "muon", p)).route({"b": jnp.ones(3)})
    with pytest.raises(ConfigError):
        MuonDirection(beta=1.5)


# -- LMO (Scion) -------------------------------------------------------------------------------------------
def scion_reference_direction(m, radius, head_radius):
    """Per leaf, written from §7.1: hidden/embed spectral (√(fan_out/fan_in)·NS), head sign/fan_in, vectors
    bias-RMS; NS from optax."""

    def spectral(x):
        o = orthogonalize_via_newton_schulz(x, jnp.asarray((3.4445, -4.7750, 2.0315)), 5)
        return np.asarray(o) * math.sqrt(x.shape[1] / x.shape[0]) * radius

    out = {}
    for k, v in m.items():
        if k == "scale":
            out[k] = np.asarray(v) / np.sqrt(np.mean(np.asarray(v) ** 2)) * radius
            continue
        out[k] = {}
        for name, x in v.items():
            x = np.asarray(x)
            if x.ndim == 1:
                out[k][name] = x / np.sqrt(np.mean(x**2)) * radius
            elif k == "head":
                out[k][name] = np.sign(x) / x.shape[0] * head_radius
            else:
                out[k][name] = spectral(jnp.asarray(x))
    return out


@pytest.mark.parametrize("constrained", [False, True])
def test_scion_step_matches_reference(constrained):
    params, loss_fn, batches = make_problem(3)
    params["h1"]["b"] = params["h1"]["b"] + 0.3  # nonzero grads and nonzero θ everywhere
    lr, radius, beta = 0.01, 2.0, 0.5
    mods = presets.scion(
        lr, radius=radius, beta=beta, head_keys=("head",), embed_keys=(), constrained=constrained
    )
    got = run_curvplan(mods, params, loss_fn, batches[:2])
    m, p = jax.tree.map(jnp.zeros_like, params), params
    for b, p_got in zip(batches[:2], got):
        g = jax.grad(loss_fn)(p, b)
        m = jax.tree.map(lambda a, x: beta * a + (1 - beta) * x, m, g)
        d = scion_reference_direction(m, radius, radius * 60)
        if constrained:  # Frank-Wolfe: θ ← (1 − lr) θ − lr·ρ·dir
            p = jax.tree.map(lambda th, dd: (1 - lr) * th - lr * dd, p, d)
        else:
            p = jax.tree.map(lambda th, dd: th - lr * dd, p, d)
        jax.tree.map(
            lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6),
            p_got,
            p,
        )


def test_lmo_direction_exact_spectral_and_rules():
    g = {"a": {"w": jnp.asarray(np.random.RandomState(0).randn(5, 3))}, "emb": jnp.asarray(np.ones((4, 2)))}
    mod = LMODirection(ns="exact", rules=(("emb", "colnorm", 3.0),))
    assert mod.leaf_rule("['a']['w']", (5, 3)) == ("spectral", 1.0)
    assert mod.leaf_rule("['emb']", (4, 2)) == ("colnorm", 3.0)
    out, _ = mod.apply(Inputs({"grad": g}, mod.label), mod.init(g, None), ctx_for(g))
    d = out["direction"]
    u, _, vt = np.linalg.svd(np.asarray(g["a"]["w"]), full_matrices=False)
    np.testing.assert_allclose(np.asarray(d["a"]["w"]), u @ vt * math.sqrt(3 / 5), atol=1e-5)
    # colnorm of an all-ones (4, 2) matrix: each row to norm √fan_out, then / fan_in, times radius 3
    np.testing.assert_allclose(np.asarray(d["emb"]), np.full((4, 2), 3.0 / 4), rtol=1e-6)


def test_equal_shape_matrices_are_orthogonalised_in_one_batched_call():
    """Two (16, 16) matrices cost one stack of NS matmuls: 5 iterations × 3 dot_generals, not 2 × 15."""
    g = {"a": jnp.ones((16, 16)), "b": jnp.eye(16), "c": jnp.ones((16, 3))}
    mod = MuonDirection()
    st = mod.init(g, None)
    jaxpr = jax.make_jaxpr(
        lambda g, s: mod.apply(Inputs({"grad": g, "params": g}, mod.label), s, ctx_for(g))
    )(g, st)
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 2 * 15, len(dots)  # one call for the (16, 16) stack, one for (16, 3)
    assert sum(e.invars[0].aval.shape[0] == 2 for e in dots) == 15  # the (16, 16) pair runs as a stack of 2
