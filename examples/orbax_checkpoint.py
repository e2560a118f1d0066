"""Save and restore a training state that holds a curvplan optimizer state with orbax, and resume bit for bit.

The training state is a plain dict: the parameters and the state of ``optax.chain(clip, cp.as_optax(kfac))``
(K-FAC's factors, inverses, carried slots and step counter, and the last step's telemetry). Orbax writes it
with ``StandardCheckpointer``, and restores it onto the structure ``jax.eval_shape`` gives for a fresh
state, so the restoring process needs only the code, not the old objects. The run trains N steps straight,
then again with a save after k steps and a restore into new objects, and compares the two bit for bit.

    python examples/orbax_checkpoint.py                 # 40 steps, checkpoint after 17
    python examples/orbax_checkpoint.py --steps 8 --save-at 3
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from common import load_digits, minibatches

import curvplan as cp
from curvplan.examples.digits import init_mlp, mlp


def make_tx():
    kfac = cp.as_optax(cp.presets.kfac(0.1, inverse_every=5), model_fn=mlp, loss="ce")
    return optax.chain(optax.clip_by_global_norm(10.0), kfac)


def make_step(tx):
    @jax.jit
    def step(train_state, x, y):
        params = train_state["params"]
        g = jax.grad(lambda p: cp.lowering.ce_loss(mlp(p, x), y))(params)
        updates, opt_state = tx.update(g, train_state["opt_state"], params, batch=(x, y))
        return {"params": optax.apply_updates(params, updates), "opt_state": opt_state}
    return step


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--save-at", type=int, default=17)
    ap.add_argument("--dir", default="", help="checkpoint folder (default: a temporary one)")
    args = ap.parse_args(argv)
    (xtr, ytr), _ = load_digits()
    batches = [(jnp.asarray(x), jnp.asarray(y)) for x, y in minibatches(xtr, ytr, 128, args.steps)]
    params0 = init_mlp(jax.random.key(0))

    tx = make_tx()
    step = make_step(tx)
    straight = {"params": params0, "opt_state": tx.init(params0)}
    for x, y in batches:
        straight = step(straight, x, y)

    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(args.dir or tmp).resolve() / f"step_{args.save_at}"
        state = {"params": params0, "opt_state": tx.init(params0)}
        for x, y in batches[: args.save_at]:
            state = step(state, x, y)
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(path, state, force=True)
        checkpointer.wait_until_finished()

        # a new "process": new transformation and step function, the state's structure from eval_shape
        tx2 = make_tx()
        abstract = jax.eval_shape(lambda: {"params": params0, "opt_state": tx2.init(params0)})
        resumed = ocp.StandardCheckpointer().restore(path, abstract)
        step2 = make_step(tx2)
        for x, y in batches[args.save_at:]:
            resumed = step2(resumed, x, y)

    a, b = jax.tree.leaves(straight), jax.tree.leaves(resumed)
    identical = len(a) == len(b) and all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(a, b))
    kfac_state = resumed["opt_state"][1]
    print(f"K-FAC state: {len(a)} arrays, step {int(kfac_state.plan_state.step)}, "
          f"last loss {float(kfac_state.info.loss):.4f}")
    print(f"resumed after step {args.save_at} == trained straight through {args.steps} steps: "
          f"{'bit for bit' if identical else 'DIFFERENT'}")
    return {"identical": identical, "leaves": len(a), "step": int(kfac_state.plan_state.step)}


if __name__ == "__main__":
    cp.enable_compilation_cache()  # the next run loads its programs from ~/.cache/curvplan/jax
    main()
