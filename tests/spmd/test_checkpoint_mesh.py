"""A checkpoint of sharded state restores onto a different mesh, placed as that mesh's state is, and training
goes on as if never interrupted."""

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import curvplan as cp
from tests.spmd import models


def shampoo():
    return cp.presets.shampoo(learning_rate=1e-3, root_every=3)


def test_restore_onto_another_mesh_continues_the_run(tmp_path):
    batches = models.batches(8)
    ref = cp.Optimizer(shampoo(), models.loss_fn)
    p_ref = models.params()
    s_ref = ref.init(p_ref)
    for b in batches:
        p_ref, s_ref, _ = ref.step(p_ref, s_ref, b)

    mesh8 = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    opt8 = cp.Optimizer(shampoo(), models.loss_fn, mesh=mesh8)
    params = jax.device_put(models.params(), NamedSharding(mesh8, PartitionSpec("data")))  # FSDP
    state = opt8.init(params)
    for b in batches[:4]:
        params, state, _ = opt8.step(params, state, opt8.shard_batch(b))
    path = tmp_path / "shampoo.npz"
    cp.save(path, state, opt8.plan, params=params)

    mesh42 = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    opt42 = cp.Optimizer(shampoo(), models.loss_fn, mesh=mesh42)
    like_params = {k: jax.device_put(v, NamedSharding(mesh42, PartitionSpec(None, "model") if v.ndim == 2
                                                       else PartitionSpec()))
                   for k, v in models.params(seed=5).items()}
    like = opt42.init(like_params)
    state, params = cp.restore(path, opt42.plan, like, like_params)
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(like)):
        assert got.sharding == want.sharding  # placed for the new mesh, not the old one
    assert params["w0"].sharding.spec == PartitionSpec(None, "model")
    for b in batches[4:]:
        params, state, _ = opt42.step(params, state, opt42.shard_batch(b))
    for k in p_ref:
        err = np.linalg.norm(np.asarray(params[k]) - np.asarray(p_ref[k])) / np.linalg.norm(np.asarray(p_ref[k]))
        assert err <= 1e-6, f"{k} differs by {err:.2e}"
