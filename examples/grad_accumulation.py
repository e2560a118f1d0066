"""Gradient accumulation with ``optax.MultiSteps`` around a curvplan optimizer.

``MultiSteps(tx, every_k_schedule=k)`` averages the gradients of k micro-batches and calls curvplan's Shampoo
once per k: its Gram factors, roots and step counter advance once per accumulated batch, as if it had seen the
big batch. The run checks that: k micro-batches of size b give the parameters of one batch of size k·b, up to
rounding (the mean of k means is not bitwise the mean of the whole; Adagrad grafting and inverse roots amplify the
difference: 2e-2 of the distance moved after 10 steps in float32, 3e-6 with ``JAX_ENABLE_X64=1``).

    python examples/grad_accumulation.py               # 100 optimizer steps, 4 micro-batches of 32
    python examples/grad_accumulation.py --steps 5
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from common import load_digits, minibatches, progress

import curvplan as cp
from curvplan.examples.digits import init_mlp, loss_fn


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps (each over k micro-batches)")
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--k", type=int, default=4)
    args = ap.parse_args(argv)
    (xtr, ytr), _ = load_digits()
    params0 = init_mlp(jax.random.key(0))
    shampoo = lambda: cp.as_optax(cp.presets.shampoo(1e-3, root_every=5))  # noqa: E731

    accumulated = optax.MultiSteps(shampoo(), every_k_schedule=args.k)
    big = shampoo()

    @jax.jit
    def micro_step(params, state, x, y):
        loss, g = jax.value_and_grad(loss_fn)(params, (x, y))
        updates, state = accumulated.update(g, state, params)
        return optax.apply_updates(params, updates), state, loss

    @jax.jit
    def big_step(params, state, x, y):
        loss, g = jax.value_and_grad(loss_fn)(params, (x, y))
        updates, state = big.update(g, state, params)
        return optax.apply_updates(params, updates), state, loss

    p_acc, s_acc = params0, accumulated.init(params0)
    p_big, s_big = params0, big.init(params0)
    losses = []
    batches = minibatches(xtr, ytr, args.k * args.micro_batch, args.steps)
    for x, y in progress(batches, args.steps, "MultiSteps shampoo"):
        for j in range(args.k):
            sl = slice(j * args.micro_batch, (j + 1) * args.micro_batch)
            p_acc, s_acc, _ = micro_step(p_acc, s_acc, jnp.asarray(x[sl]), jnp.asarray(y[sl]))
        p_big, s_big, loss = big_step(p_big, s_big, jnp.asarray(x), jnp.asarray(y))
        losses.append(float(loss))
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(p_acc), jax.tree.leaves(p_big)))
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(p_big), jax.tree.leaves(params0)))
    inner_steps = int(s_acc.inner_opt_state.plan_state.step)
    print(f"MultiSteps(k={args.k}) x micro-batch {args.micro_batch} vs batch {args.k * args.micro_batch}: "
          f"{inner_steps} Shampoo steps, max |Δparam| = {diff:.2e} ({diff / moved:.1e} of the distance moved); "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return {"max_param_diff": diff, "relative_diff": diff / moved, "inner_steps": inner_steps, "losses": losses}


if __name__ == "__main__":
    cp.enable_compilation_cache()  # the next run loads its programs from ~/.cache/curvplan/jax
    main()
