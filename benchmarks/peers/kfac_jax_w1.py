"""kfac-jax 0.0.8 on W1 (digits MLP 64-128-128-10 tanh, CE, batch 256), run in its own venv (jax 0.9.1).

    .venv-kfac/bin/python benchmarks/peers/kfac_jax_w1.py --steps 30 --blocks 1 --inverse-every 5

``--sizes 64,1024,1024,1024,10 --batch 512`` runs the wide MLP (``w1-wide``) instead.

Standalone on purpose (curvplan needs jax 0.10): same data split, model and batch as
``benchmarks.workloads`` W1. Prints one JSON line: seconds per step for each timed block (after a warm-up
that compiles every program), plus versions.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import kfac_jax
import numpy as np
from sklearn.datasets import load_digits


def data(seed=0, n_train=1500):
    """(train, test) as `curvplan.examples.digits.load_digits`: the same fixed shuffle and split."""
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int32)
    perm = np.random.default_rng(seed).permutation(len(x))
    x, y = x[perm], y[perm]
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def batches(x, y, size, seed):
    """Shuffled minibatches as `benchmarks.workloads.Workload.batches`: one permutation per epoch from
    ``default_rng(seed)``, so a seed gives curvplan's batch sequence."""
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(len(x))
        for i in range(0, len(x) - size + 1, size):
            idx = perm[i:i + size]
            yield jnp.asarray(x[idx]), jnp.asarray(y[idx])


def init(key, sizes):
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        params[f"layer_{i}"] = {"w": jax.random.normal(sub, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
    return params


def mlp(params, x):
    n = len(params)
    for i in range(n):
        x = x @ params[f"layer_{i}"]["w"] + params[f"layer_{i}"]["b"]
        if i < n - 1:
            x = jnp.tanh(x)
    return x


def loss_fn(params, batch):
    x, y = batch
    logits = mlp(params, x)
    kfac_jax.register_softmax_cross_entropy_loss(logits, y)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--blocks", type=int, default=1)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--sizes", default="64,128,128,10", help="layer widths of the MLP, comma-separated")
    ap.add_argument("--inverse-every", type=int, default=5)
    ap.add_argument("--ema", type=float, default=0.95)
    ap.add_argument("--damping", type=float, default=0.1)
    ap.add_argument("--learning-rate", type=float, default=0.1)
    ap.add_argument("--estimation-mode", default="fisher_empirical")
    ap.add_argument("--adaptive", action="store_true",
                    help="adaptive learning rate, momentum and damping (kfac-jax's defaults otherwise)")
    ap.add_argument("--curve", type=int, default=0, help="train this many steps and print the held-out curve")
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.sizes = tuple(int(n) for n in args.sizes.split(","))
    if args.curve:
        return curve(args)
    (x, y), _ = data()
    opt = kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(loss_fn), l2_reg=0.0, use_adaptive_learning_rate=False,
        use_adaptive_momentum=False, use_adaptive_damping=False, num_burnin_steps=0,
        inverse_update_period=args.inverse_every, curvature_ema=args.ema, estimation_mode=args.estimation_mode,
        multi_device=False)
    it = batches(x, y, args.batch, 0)
    key = jax.random.key(0) if hasattr(jax.random, "key") else jax.random.PRNGKey(0)
    params = init(key, args.sizes)
    state = opt.init(jax.tree.map(jnp.copy, params), key, next(it))
    lr, damp, mom = jnp.asarray(args.learning_rate), jnp.asarray(args.damping), jnp.asarray(0.0)

    def run(n):
        nonlocal params, state
        jax.block_until_ready(params)
        t0 = time.perf_counter()
        for _ in range(n):
            # step donates params/state: pass copies of nothing else; we own them
            params, state, stats = opt.step(params, state, key, batch=next(it), learning_rate=lr,
                                            momentum=mom, damping=damp)
        jax.block_until_ready(params)
        return time.perf_counter() - t0, float(stats["loss"])

    t0 = time.perf_counter()
    run(args.inverse_every + 2)  # compiles both programs (inverse refresh and plain)
    warm = time.perf_counter() - t0
    n = -(-args.steps // args.inverse_every) * args.inverse_every
    blocks = []
    for _ in range(args.blocks):
        dt, loss = run(n)
        blocks.append(dt / n)
    print(json.dumps({"peer": "kfac-jax", "version": getattr(kfac_jax, "__version__", "0.0.8"),
                      "jax": jax.__version__, "sec_per_step": blocks, "warmup_s": warm, "loss": loss}))


def curve(args):
    """Held-out loss every ``eval_every`` steps from seed ``seed``'s init and batches (as `benchmarks.sweep`)."""
    (x, y), (xt, yt) = data()
    opt = kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(loss_fn), l2_reg=0.0, use_adaptive_learning_rate=args.adaptive,
        use_adaptive_momentum=args.adaptive, use_adaptive_damping=args.adaptive, initial_damping=args.damping,
        num_burnin_steps=0, inverse_update_period=args.inverse_every, curvature_ema=args.ema,
        estimation_mode=args.estimation_mode, multi_device=False)

    def held_out(p):
        logp = jax.nn.log_softmax(mlp(p, jnp.asarray(xt)))
        return float(-jnp.mean(jnp.take_along_axis(logp, jnp.asarray(yt)[:, None], axis=-1)))

    it = batches(x, y, args.batch, args.seed)
    params = init(jax.random.key(args.seed), args.sizes)
    key = jax.random.key(args.seed + 1)
    state = opt.init(jax.tree.map(jnp.copy, params), key, next(batches(x, y, args.batch, args.seed)))
    fixed = {} if args.adaptive else {"learning_rate": jnp.asarray(args.learning_rate),
                                      "momentum": jnp.asarray(0.0), "damping": jnp.asarray(args.damping)}
    points = []
    for t in range(args.curve):
        params, state, stats = opt.step(params, state, jax.random.fold_in(key, t), batch=next(it),
                                        global_step_int=t, **fixed)
        if (t + 1) % args.eval_every == 0:
            points.append((t + 1, held_out(params)))
    print(json.dumps({"peer": "kfac-jax", "version": getattr(kfac_jax, "__version__", "0.0.8"),
                      "jax": jax.__version__, "seed": args.seed, "curve": points}))


if __name__ == "__main__":
    main()
