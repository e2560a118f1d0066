"""One process of a data-parallel Shampoo run over several JAX processes on CPU (see test_two_processes.py).

``python _worker.py --port P --process-id I --num-processes N --out F.npz`` joins the run coordinated at
127.0.0.1:P, trains the MLP of `problem` for `STEPS` steps on a batch sharded over one device per process, and
writes the final parameters (``param:<key>``) and the step losses (``losses``) to ``F.npz``. `train` without a
mesh is the single-device reference the test compares against.
"""

import argparse

import numpy as np

STEPS = 5
GLOBAL_BATCH = 16
SIZES = (8, 16, 4)


def problem(seed: int = 0) -> tuple[dict[str, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The initial parameters and the global batch ``(x, y)`` as float32 numpy arrays, the same in every process."""
    rng = np.random.default_rng(seed)
    d_in, d_hidden, d_out = SIZES
    params = {
        "w1": rng.normal(size=(d_in, d_hidden)) / np.sqrt(d_in),
        "b1": 0.1 * rng.normal(size=(d_hidden,)),
        "w2": rng.normal(size=(d_hidden, d_out)) / np.sqrt(d_hidden),
        "b2": 0.1 * rng.normal(size=(d_out,)),
    }
    x = rng.normal(size=(GLOBAL_BATCH, d_in))
    y = np.sin(x[:, :d_out]) + 0.1 * rng.normal(size=(GLOBAL_BATCH, d_out))
    return {k: v.astype(np.float32) for k, v in params.items()}, (x.astype(np.float32), y.astype(np.float32))


def loss_fn(params, batch):
    """Mean squared error of a tanh MLP over the (global) batch."""
    import jax.numpy as jnp

    x, y = batch
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] + params["b2"] - y) ** 2)


def plan():
    """Shampoo with roots every other step. ``epsilon`` (relative to the largest factor eigenvalue) keeps the
    inverse roots of the rank-deficient factors well conditioned, so that float32 rounding in how the gradient
    is summed moves the result by ~1e-7, not 1e-3 as with the default 1e-6."""
    import curvplan as cp

    return cp.presets.shampoo(learning_rate=0.01, root_every=2, epsilon=1e-2)


def train(params, batch, mesh=None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """`STEPS` steps of Shampoo from ``params`` on ``batch`` (jax arrays); returns the final parameters and the
    losses as numpy. With a ``mesh`` the arrays are global (sharded over it), and the optimizer is given it."""
    import curvplan as cp

    opt = cp.Optimizer(plan(), loss_fn, mesh=mesh)
    state = opt.init(params)
    losses = []
    for _ in range(STEPS):
        params, state, info = opt.step(params, state, batch)
        losses.append(info.loss)
    # replicated results: this process's shard holds the whole value
    local = lambda a: np.asarray(a.addressable_shards[0].data)
    return {k: local(v) for k, v in params.items()}, np.array([local(l) for l in losses])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--process-id", type=int, required=True)
    ap.add_argument("--num-processes", type=int, required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}", num_processes=args.num_processes,
                               process_id=args.process_id)
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    devices = jax.devices()
    assert jax.process_count() == args.num_processes, jax.process_count()
    assert len(jax.local_devices()) == 1 and len(devices) == args.num_processes, (jax.local_devices(), devices)
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))

    params_np, batch_np = problem()
    place = lambda a, spec: jax.make_array_from_callback(a.shape, NamedSharding(mesh, spec), lambda idx: a[idx])
    params = {k: place(v, P()) for k, v in params_np.items()}
    batch = tuple(place(a, P("data")) for a in batch_np)
    assert batch[0].addressable_shards[0].data.shape == (GLOBAL_BATCH // args.num_processes, SIZES[0])

    final, losses = train(params, batch, mesh)
    np.savez(args.out, losses=losses, **{f"param:{k}": v for k, v in final.items()})
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
