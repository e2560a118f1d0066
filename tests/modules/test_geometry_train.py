"""Every geometry preset trains W1 (digits MLP) and W3 (char transformer) for a few steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvplan as cp
from benchmarks.workloads import get_workload
from curvplan.modules import presets

PRESETS = {
    "muon": lambda: presets.muon(0.02),
    "scion": lambda: presets.scion(0.05, radius=1.0, head_keys=("layer_2",)),
    "scion_fw": lambda: presets.scion(
        0.05, radius=3.0, head_radius=10.0, head_keys=("layer_2",), constrained=True
    ),
    "adaptive_schatten": lambda: presets.adaptive_schatten(
        0.02, every=5, report_layers=("['layer_1']['w']",)
    ),
    "muadam": lambda: presets.muadam(3e-3),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_w1_trains_with_every_preset(name):
    w = get_workload("w1")
    params = w.init(jax.random.key(0))
    opt = cp.Optimizer(PRESETS[name](), model_fn=w.model_fn, loss="ce")
    state = opt.init(params)
    full = (jnp.asarray(w.train[0][:512]), jnp.asarray(w.train[1][:512]))
    before = float(w.loss_fn(params, full))
    batches = w.batches(seed=0)
    for t in range(12):
        params, state, info = opt.step(params, state, next(batches), rng=jax.random.key(t))
        assert not bool(info.skipped)
    after = float(w.loss_fn(params, full))
    assert np.isfinite(after) and after < 0.8 * before, (name, before, after)
    if name == "adaptive_schatten":
        p = state.slots["%schatten_inv_p"]
        assert set(p) == {f"['layer_{i}']['w']" for i in range(3)}
        assert all(0.0 <= float(v) <= 1.0 for v in p.values())


W3_PRESETS = {
    "muon": lambda: presets.muon(0.02, adam_keys=("embed", "pos")),
    "scion": lambda: presets.scion(2.0**-8, head_keys=(), embed_keys=("embed", "pos")),
    "adaptive_schatten": lambda: presets.adaptive_schatten(0.02, report_layers=("['block_0']['qkv']",)),
    "muadam": lambda: presets.muadam(1e-3),
}


@pytest.mark.parametrize("name", sorted(W3_PRESETS))
def test_w3_trains_with_every_preset(name):
    """Ten steps on the char transformer (the Schatten criterion runs on the first): finite loss, every update
    applied, training loss on a fixed batch lower than at the start. (Before the batched-LAPACK fix in
    `curvplan.modules._linalg`, the Schatten-p presets never finished their first step on 2-core CPUs.)"""
    w = get_workload("w3")
    params = w.init(jax.random.key(0))
    opt = cp.Optimizer(W3_PRESETS[name](), model_fn=w.model_fn, loss="ce")
    state = opt.init(params)
    batches = w.batches(seed=0)
    probe = next(w.batches(seed=1))
    before = float(w.loss_fn(params, probe))
    for t in range(10):
        new, state, info = opt.step(params, state, next(batches), rng=jax.random.key(t))
        assert np.isfinite(float(info.loss)) and not bool(info.skipped)
        assert float(optax.tree.norm(jax.tree.map(jnp.subtract, new, params))) > 0
        params = new
        if name == "adaptive_schatten" and t == 0:
            assert 1.0 <= float(info["p['block_0']['qkv']"])
    assert float(w.loss_fn(params, probe)) < before, name
