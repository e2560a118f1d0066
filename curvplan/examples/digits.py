"""The demo: a planned Gauss-Newton-CG optimizer next to AdamW on the digits MLP (benchmark workload W1).

Run with ``make demo`` or ``python -m curvplan.examples.digits [--steps 200] [--plot plan.svg]``.
Data: scikit-learn's bundled copy of the UCI optical digits (1797 8x8 images; offline).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import curvplan as cp
from curvplan.lowering import ce_loss


def load_digits(seed: int = 0, n_train: int = 1500):
    """Digits as float32 features in [0, 1] and int labels: 1500 train / 297 test, fixed shuffle."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int32)
    perm = np.random.default_rng(seed).permutation(len(x))
    x, y = x[perm], y[perm]
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def init_mlp(key, sizes=(64, 128, 128, 10)):
    """Dense layers as ``{"layer_i": {"w": (in, out), "b": (out,)}}``, LeCun-normal weights."""
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
    return ce_loss(mlp(params, batch[0]), batch[1])


@jax.jit
def evaluate(params, x, y):
    logits = mlp(params, x)
    return ce_loss(logits, y), jnp.mean(jnp.argmax(logits, -1) == y)


def batches(x, y, batch_size, steps, seed):
    rng = np.random.default_rng(seed)
    n = len(x)
    for _ in range(steps):
        idx = rng.choice(n, batch_size, replace=False)
        yield x[idx], y[idx]


def train(name, step_fn, params, state, data, steps, batch_size, log_every, seed=1):
    (xtr, ytr), _ = data
    times = []
    for t, batch in enumerate(batches(xtr, ytr, batch_size, steps, seed)):
        t0 = time.perf_counter()
        params, state, loss = step_fn(params, state, batch, t)
        jax.block_until_ready(params)
        times.append(time.perf_counter() - t0)
        if (t + 1) % log_every == 0 or t == 0:
            print(f"  [{name}] step {t + 1:4d}/{steps}  batch loss {float(loss):.4f}", flush=True)
    warm = sorted(times[5:]) or times  # drop compilation steps
    return params, 1e3 * float(np.median(warm))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--plot", default="plan.svg", help="where to draw the plan ('' to skip)")
    args = ap.parse_args(argv)

    data = load_digits()
    (xtr, ytr), (xte, yte) = data
    print(f"digits: {len(xtr)} train / {len(xte)} test, MLP 64-128-128-10 tanh, batch {args.batch_size}")
    params0 = init_mlp(jax.random.key(0))

    modules = cp.presets.gauss_newton_cg(learning_rate=1.0, loss="ce", lam=1.0, maxiter=10, tol=1e-4)
    plan = cp.compile_plan(modules, name="gauss_newton_cg")
    print("\n" + str(plan) + "\n")
    if args.plot:
        try:
            plan.visualize(args.plot)
            print(f"plan drawn to {args.plot}\n")
        except Exception as e:  # a picture is a bonus, never a reason to fail the demo
            print(f"(could not draw the plan: {e})\n")

    opt = cp.Optimizer(plan, model_fn=mlp, loss="ce")
    key = jax.random.key(1)

    def gn_step(params, state, batch, t):
        params, state, info = opt.step(params, state, batch, jax.random.fold_in(key, t))
        return params, state, info.loss

    adamw = optax.adamw(1e-3, weight_decay=1e-4)

    @jax.jit
    def adam_step_jit(params, state, batch):
        loss, g = jax.value_and_grad(loss_fn)(params, batch)
        updates, state = adamw.update(g, state, params)
        return optax.apply_updates(params, updates), state, loss

    def adam_step(params, state, batch, t):
        return adam_step_jit(params, state, batch)

    results = {}
    for name, step, state in (
        ("gauss_newton_cg", gn_step, opt.init(params0)),
        ("adamw", adam_step, adamw.init(params0)),
    ):
        print(f"training {name} for {args.steps} steps")
        params, ms = train(name, step, params0, state, data, args.steps, args.batch_size, args.log_every)
        tr_loss, tr_acc = evaluate(params, xtr, ytr)
        te_loss, te_acc = evaluate(params, xte, yte)
        results[name] = (float(tr_loss), float(tr_acc), float(te_loss), float(te_acc), ms)

    print("\noptimizer          train loss  train acc  test loss  test acc  ms/step")
    for name, (a, b, c, d, ms) in results.items():
        print(f"{name:<18} {a:10.4f} {b:10.2%} {c:10.4f} {d:9.2%} {ms:8.2f}")
    return results


if __name__ == "__main__":
    cp.enable_compilation_cache()  # the next run loads its programs from ~/.cache/curvplan/jax
    main()
