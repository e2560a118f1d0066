"""Mixed precision: every preset trains with bfloat16 parameters, keeps its state in float32 (the one dtype
rule, `curvplan.lowering.state_dtype`), and warns about nothing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvplan as cp
from curvplan.lowering import state_dtype

PRESETS = ["newton_cg", "gauss_newton_cg", "egn", "ggn_direct", "newton_direct", "adahessian", "adahessian_like",
           "sophia_h", "sophia_g", "levenberg_marquardt", "hessian_free", "kfac", "shampoo", "soap", "scao_modules",
           "muon", "scion", "adaptive_schatten", "muadam"]
GGN = {"gauss_newton_cg", "egn", "ggn_direct", "levenberg_marquardt", "hessian_free"}


def test_every_preset_is_listed():
    public = {n for n in dir(cp.presets) if not n.startswith("_") and callable(getattr(cp.presets, n))
              and n.islower() and n not in ("annotations", "hutchinson_estimates")}
    assert public == set(PRESETS)


def mlp(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


def _train(preset: str, dtype, steps: int):
    """``steps`` scanned steps of ``preset`` on a tanh MLP with ``dtype`` parameters and inputs, one batch."""
    k = jax.random.split(jax.random.key(0), 3)
    params = {"w1": (jax.random.normal(k[0], (8, 16)) / 3).astype(dtype), "b1": jnp.zeros(16, dtype),
              "w2": (jax.random.normal(k[1], (16, 4)) / 4).astype(dtype)}
    x, y = jax.random.normal(k[2], (32, 8)).astype(dtype), jnp.arange(32, dtype=jnp.int32) % 4
    opt = cp.Optimizer(getattr(cp.presets, preset)(**({"loss": "ce"} if preset in GGN else {})), model_fn=mlp,
                       loss="ce")
    state = opt.init(params, jax.random.key(1))
    batches = (jnp.broadcast_to(x, (steps,) + x.shape), jnp.broadcast_to(y, (steps,) + y.shape))
    return opt.run(params, state, batches, jax.random.key(2))


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("preset", PRESETS)
def test_bf16_params_float32_state_20_steps(preset):
    p, state, infos = _train(preset, jnp.bfloat16, 20)
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(p))
    floating = [a.dtype for a in jax.tree.leaves(state) if jnp.issubdtype(a.dtype, jnp.floating)]
    assert floating and all(dt == jnp.float32 for dt in floating), sorted({str(d) for d in floating})
    assert int(state.step) == 20 and int(state.skipped) == 0
    assert np.all(np.isfinite(np.asarray(infos.loss)))


def test_state_dtype_rule():
    assert state_dtype(jnp.bfloat16) == jnp.float32 and state_dtype(jnp.float16) == jnp.float32
    assert state_dtype(jnp.float32) == jnp.float32 and state_dtype(jnp.int32) == jnp.int32


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("preset", PRESETS)
def test_float32_params_stay_float32_with_x64_on(preset):
    """x64 on makes Python scalars float64 arrays where they are not weakly typed: no hyperparameter or damping
    λ may promote a float32 model's parameters or state."""
    p, state, infos = _train(preset, jnp.float32, 3)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(p))
    assert int(state.skipped) == 0 and np.all(np.isfinite(np.asarray(infos.loss)))
