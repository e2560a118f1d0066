"""The scale suite's model (8 same-shape weight matrices and biases) at width 32 in float64, its data, and the
presets of every family."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import curvplan as cp
from benchmarks import scale
from benchmarks.scale import loss_fn, model_fn  # noqa: F401  (re-exported: the scale suite's model)

WIDTH, BATCH = 32, 64


def params(seed: int = 0, width: int = WIDTH) -> dict:
    return scale.init_params(width, seed, jnp.float64)


def batches(steps: int, seed: int = 1, width: int = WIDTH, batch: int = BATCH) -> list:
    rng = np.random.default_rng(seed)
    teacher = rng.normal(size=(width, width)) / np.sqrt(width)
    out = []
    for _ in range(steps):
        x = rng.normal(size=(batch, width)).astype(np.float64)
        out.append((x, np.tanh(x @ teacher).astype(np.float64)))
    return out


def families() -> dict:
    """Preset per family, with the objective it needs (``loss_fn`` or ``model_fn``/``loss``)."""
    by_loss = {"loss_fn": loss_fn}
    by_model = {"model_fn": model_fn, "loss": "mse"}
    return {
        "newton_cg": (cp.presets.newton_cg(learning_rate=0.5, lam=1e-2, maxiter=5), by_loss),
        "gauss_newton_cg": (cp.presets.gauss_newton_cg(learning_rate=0.5, loss="mse", lam=1e-2, maxiter=5), by_model),
        "sophia_h": (cp.presets.sophia_h(learning_rate=1e-3, hessian_every=5), by_loss),
        "adahessian": (cp.presets.adahessian(learning_rate=1e-3), by_loss),
        "kfac": (cp.presets.kfac(learning_rate=1e-2, loss="mse", inverse_every=5), by_model),
        "shampoo": (cp.presets.shampoo(learning_rate=1e-3, root_every=5), by_loss),
        "soap": (cp.presets.soap(learning_rate=1e-3, precondition_frequency=5), by_loss),
        "scao": (cp.presets.scao_modules(learning_rate=1e-3, warmup_steps=4, precond_freq=4, blend_steps=4,
                                          min_precond_updates=1), by_loss),
        "muon": (cp.presets.muon(learning_rate=1e-2), by_loss),
        "adaptive_schatten": (cp.presets.adaptive_schatten(learning_rate=1e-2, every=5), by_model),
    }
