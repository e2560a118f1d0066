"""Helpers shared by the module tests: random gradient streams, the optax wrapper driven by given gradients, an
optax trajectory, and a few training steps through `Optimizer`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import curvplan as cp


def ctx_for(params, key=None, batch=None) -> cp.modules.Context:
    """A module's `Context` for calling ``apply`` directly (step 0, one device)."""
    return cp.modules.Context(step=jnp.zeros((), jnp.int32), rng=key, params=params, batch=batch, objective=None,
                              module="m")


def cg_iterations(kappa: float, tol: float) -> int:
    """Iterations after which CG's residual bound ‖r_k‖/‖r_0‖ ≤ 2√κ ((√κ−1)/(√κ+1))^k is below ``tol``.

    Exact CG stops after n steps; floating-point CG behaves like exact CG on a matrix with clusters of
    eigenvalues near the true ones (it loses orthogonality), so n is not enough near rounding, while this bound,
    which depends only on the spectrum's range, still holds. Tests that ask for a tight tolerance use it as
    ``maxiter``."""
    r = np.sqrt(kappa)
    if r <= 1 + 1e-12:
        return 1
    return int(np.ceil(np.log(2 * r / tol) / np.log((r + 1) / (r - 1))))


def never_loss(params, batch):
    """A loss that must not run: the optax wrapper is given the gradient, so no loss is evaluated."""
    raise AssertionError("loss evaluated")


def random_grads(seed: int, shapes: dict, n: int) -> list[dict]:
    """``n`` gradient dicts of float64 normals with the given leaf shapes."""
    rng = np.random.default_rng(seed)
    return [{k: rng.normal(size=s) for k, s in shapes.items()} for _ in range(n)]


def run_optax(modules, params, grads):
    """The updates of ``cp.as_optax(modules)`` fed ``grads`` one by one, and the final state."""
    tx = cp.as_optax(modules, loss_fn=never_loss)
    state = tx.init(params)
    update = jax.jit(tx.update)
    out = []
    for g in grads:
        u, state = update(jax.tree.map(jnp.asarray, g), state, params)
        out.append(u)
    return out, state


def train_losses(opt: cp.Optimizer, w, steps: int, *, batch_size: int | None = None, same_batch: bool = False):
    """Trains ``w``'s model from seed 0 for ``steps``; returns the per-step losses and the last `StepInfo`."""
    params = w.init(jax.random.key(0))
    state = opt.init(params)
    batches = w.batches(0, batch_size=batch_size)
    fixed = next(batches) if same_batch else None
    losses = []
    for _ in range(steps):
        params, state, info = opt.step(params, state, fixed if same_batch else next(batches))
        losses.append(float(info.loss))
    return np.asarray(losses), info


def optax_trajectory(tx, params, loss_fn, batches) -> list:
    """The parameters after each step of the optax transformation ``tx`` on ``loss_fn`` over ``batches``."""

    @jax.jit
    def step(params, state, b):
        u, state = tx.update(jax.grad(loss_fn)(params, b), state, params)
        return optax.apply_updates(params, u), state

    state, out = tx.init(params), []
    for b in batches:
        params, state = step(params, state, b)
        out.append(params)
    return out
