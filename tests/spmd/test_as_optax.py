"""`as_optax(..., mesh=)` inside a user's own jitted step: the same numbers as on one device, state placed."""

from __future__ import annotations

import contextlib

import jax
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import curvplan as cp
from tests.spmd import models

STEPS = 10
CASES = {
    "shampoo": (lambda: cp.presets.shampoo(learning_rate=1e-3, root_every=3), {}),
    "kfac": (lambda: cp.presets.kfac(learning_rate=1e-2, loss="mse", inverse_every=3),
             {"model_fn": models.model_fn, "loss": "mse"}),
}


def train(name, mesh=None):
    modules, objective = CASES[name]
    example = models.batches(1)[0]
    tx = cp.as_optax(modules(), models.loss_fn, example_batch=example, mesh=mesh, **objective)
    params = models.params()
    explicit = mesh is not None and mesh.axis_types[0] == AxisType.Explicit
    if mesh is not None and not explicit:  # FSDP: every parameter split over the data axis on its first axis
        params = jax.device_put(params, NamedSharding(mesh, PartitionSpec("data")))
    # (on an explicit mesh the model's own `x @ w + b` would need its gathers spelled out: data parallel only)
    scope = jax.set_mesh(mesh) if explicit else contextlib.nullcontext()

    @jax.jit
    def step(params, state, batch):
        grads = jax.grad(models.loss_fn)(params, batch)
        updates, state = tx.update(grads, state, params, batch=batch)
        return optax.apply_updates(params, updates), state

    with scope:
        state = tx.init(params)
        for b in models.batches(STEPS):
            if mesh is not None:
                b = jax.device_put(b, NamedSharding(mesh, PartitionSpec("data")))
            params, state = step(params, state, b)
    return params, state


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
@pytest.mark.parametrize("name", list(CASES))
def test_as_optax_on_eight_devices_equals_one(name, axis_type):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    want, _ = train(name)
    got, state = train(name, mesh)
    for k in want:
        err = np.linalg.norm(np.asarray(got[k]) - np.asarray(want[k])) / np.linalg.norm(np.asarray(want[k]))
        assert err <= 1e-6, f"{name}: {k} differs by {err:.2e}"
    # the state stays on the plan's shardings: parameter-shaped entries as the parameters, square blocks (one
    # per layer, or K-FAC's stacks of them, A's side with the bias slot included) split over the data axis
    square = [x for x in jax.tree.leaves(state.plan_state)
              if x.ndim >= 2 and x.shape[-1] == x.shape[-2] and x.shape[-1] in (models.WIDTH, models.WIDTH + 1)]
    assert square and all("data" in x.sharding.spec for x in square)
