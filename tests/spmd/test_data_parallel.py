"""Every family on 8 devices computes what it computes on one: 20 sharded steps against 20 single-device steps,
with the batch split 8 ways (data parallel) and split 4 ways with the weights split 2 ways (a second axis).

In float64 (see conftest) the two runs differ only in the order of their sums; Newton-CG, SOAP and the exact
Schatten map amplify that rounding most, to ~1e-7 of a parameter leaf's norm, so the tolerance is 1e-6 in that
norm. A placement error (a mean over one device's rows, a block refreshed from another's statistics) moves
the parameters by far more.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import curvplan as cp
from tests.spmd import models

STEPS = 20
TOL = 1e-6  # relative, in the norm of each parameter leaf
RNG = jax.random.key(0)  # the probes of the Hutchinson families
FAMILIES = models.families()
MESHES = {
    "data8": ((8,), ("data",), None),
    "data4_model2": ((4, 2), ("data", "model"), PartitionSpec(None, "model")),
}


def single_device(name):
    modules, objective = FAMILIES[name]
    opt = cp.Optimizer(modules, **objective)
    params = models.params()
    state = opt.init(params)
    for b in models.batches(STEPS):
        params, state, _ = opt.step(params, state, b, RNG)
    return params


@pytest.fixture(scope="module")
def reference():
    cache = {}
    return lambda name: cache.setdefault(name, single_device(name))


def sharded(name, mesh_key, axis_type):
    shape, axes, weight_spec = MESHES[mesh_key]
    mesh = jax.make_mesh(shape, axes, axis_types=(axis_type,) * len(axes))
    modules, objective = FAMILIES[name]
    opt = cp.Optimizer(modules, mesh=mesh, **objective)
    spec = weight_spec or PartitionSpec()
    params = {k: jax.device_put(v, NamedSharding(mesh, spec if v.ndim == 2 else PartitionSpec()))
              for k, v in models.params().items()}
    state = opt.init(params)
    for b in models.batches(STEPS):
        params, state, info = opt.step(params, state, opt.shard_batch(b), RNG)
        assert not bool(info.skipped)
    return opt, params, state


@pytest.mark.parametrize("mesh_key", list(MESHES))
@pytest.mark.parametrize("name", list(FAMILIES))
def test_twenty_sharded_steps_equal_single_device(name, mesh_key, reference):
    axis_type = AxisType.Explicit if mesh_key == "data8" else AxisType.Auto  # both of JAX's sharding modes
    opt, params, state = sharded(name, mesh_key, axis_type)
    want = reference(name)
    for k in want:
        got, ref = np.asarray(params[k]), np.asarray(want[k])
        err = np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12)
        assert err <= TOL, f"{name} on {mesh_key}: {k} differs by {err:.2e} (relative, norm)"
    if MESHES[mesh_key][2] is not None:  # the weights stay split as they were given
        assert params["w0"].sharding.spec == MESHES[mesh_key][2]
