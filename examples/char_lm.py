"""A small character language model on the bundled Shakespeare text: AdamW, Muon, SOAP and adaptive Schatten-p.

A two-layer causal transformer (d=64, 4 heads, context 64) predicts the next character. Each optimizer trains
from the same initialisation on the same batches, with a jitted step you write yourself around
`curvplan.as_optax`; the held-out loss is logged against wall-clock time and plotted.

    python examples/char_lm.py                          # 400 steps each, writes docs/char_lm.png
    python examples/char_lm.py --steps 10 --plot ''     # a smoke run

Wall-clock times are per-process and include nothing but the steps (the first, compiling step is excluded).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import ROOT, SHAKESPEARE, parser, progress

import curvplan as cp


def load_text(context: int):
    text = SHAKESPEARE.read_text(encoding="ascii")
    vocab = sorted(set(text))
    table = {c: i for i, c in enumerate(vocab)}
    ids = np.array([table[c] for c in text], np.int32)
    cut = int(0.9 * len(ids))

    def windows(a):
        n = (len(a) - 1) // context
        return a[: n * context].reshape(n, context), a[1: n * context + 1].reshape(n, context)

    return len(vocab), windows(ids[:cut]), windows(ids[cut:])


def init_params(key, vocab, d=64, layers=2, context=64):
    keys = iter(jax.random.split(key, 2 + 4 * layers))
    dense = lambda a, b, s=1.0: jax.random.normal(next(keys), (a, b)) * s / np.sqrt(a)  # noqa: E731
    ln = lambda: {"scale": jnp.ones(d), "bias": jnp.zeros(d)}  # noqa: E731
    params = {"embed": 0.02 * jax.random.normal(next(keys), (vocab, d)),
              "pos": 0.02 * jax.random.normal(next(keys), (context, d)), "ln_f": ln()}
    for i in range(layers):
        params[f"block_{i}"] = {"ln1": ln(), "qkv": dense(d, 3 * d), "proj": dense(d, d, 0.5), "ln2": ln(),
                                "fc1": dense(d, 4 * d), "fc2": dense(4 * d, d, 0.5)}
    return params


def layer_norm(p, x):
    return (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-5) * p["scale"] + p["bias"]


def model(params, x, heads=4):
    B, T = x.shape
    h = params["embed"][x] + params["pos"][:T]
    mask = jnp.tril(jnp.ones((T, T), bool))
    for i in range(sum(k.startswith("block_") for k in params)):
        p, d = params[f"block_{i}"], h.shape[-1]
        q, k, v = (t.reshape(B, T, heads, d // heads) for t in jnp.split(layer_norm(p["ln1"], h) @ p["qkv"], 3, -1))
        att = jax.nn.softmax(jnp.where(mask, jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // heads), -1e9), -1)
        h = h + jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(B, T, d) @ p["proj"]
        h = h + jax.nn.gelu(layer_norm(p["ln2"], h) @ p["fc1"]) @ p["fc2"]
    return layer_norm(params["ln_f"], h) @ params["embed"].T


def loss_fn(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(params, x), y).mean()


def optimizers(steps: int) -> dict[str, optax.GradientTransformation]:
    """Each method at the learning rate the benchmarks use for this workload."""
    # the embedding (tied with the output layer) and the position table take Adam in the matrix methods
    adam_keys = ("['embed']", "['pos']")
    return {
        "adamw": optax.adamw(3e-3, weight_decay=0.0),
        "muon": cp.as_optax(cp.presets.muon(0.02, adam_keys=adam_keys, adam_lr_ratio=0.15)),
        "soap": cp.as_optax(cp.presets.soap(3e-3, precondition_frequency=10, weight_decay=0.0)),
        # the Schatten-p criterion reads layer inputs, so this one evaluates the model: it takes the loss and
        # gets the batch in each update
        "adaptive_schatten": cp.as_optax(cp.presets.adaptive_schatten(0.02, every=max(steps // 4, 1)),
                                         lambda p, batch: loss_fn(p, *batch)),
    }


def main(argv=None) -> dict:
    ap = parser(__doc__, steps=400, batch_size=32)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--methods", default="adamw,muon,soap,adaptive_schatten")
    ap.add_argument("--plot", default=str(ROOT / "docs" / "char_lm.png"), help="'' to skip the plot")
    args = ap.parse_args(argv)

    vocab, (xtr, ytr), (xte, yte) = load_text(args.context)
    xte, yte = jnp.asarray(xte[:128]), jnp.asarray(yte[:128])
    params0 = init_params(jax.random.key(0), vocab, context=args.context)
    order = np.random.default_rng(0).integers(0, len(xtr), (args.steps, args.batch_size))
    held_out = jax.jit(loss_fn)
    results = {}
    for name, tx in optimizers(args.steps).items():
        if name not in args.methods.split(","):
            continue

        tx = optax.with_extra_args_support(tx)

        @jax.jit
        def step(params, state, x, y, tx=tx):
            loss, g = jax.value_and_grad(loss_fn)(params, x, y)
            updates, state = tx.update(g, state, params, batch=(x, y))
            return optax.apply_updates(params, updates), state, loss

        params, state = params0, tx.init(params0)
        curve, elapsed = [(0.0, float(held_out(params, xte, yte)))], 0.0
        for t in progress(range(args.steps), args.steps, name):
            x, y = jnp.asarray(xtr[order[t]]), jnp.asarray(ytr[order[t]])
            t0 = time.perf_counter()
            params, state, loss = jax.block_until_ready(step(params, state, x, y))
            elapsed += time.perf_counter() - t0 if t > 0 else 0.0  # the first step compiles
            if (t + 1) % args.eval_every == 0 or t + 1 == args.steps:
                curve.append((elapsed, float(held_out(params, xte, yte))))
        results[name] = {"curve": curve, "final": curve[-1][1], "ms_per_step": 1e3 * elapsed / max(args.steps - 1, 1)}
        print(f"{name:<18} held-out loss {curve[0][1]:.3f} -> {curve[-1][1]:.3f}   "
              f"{results[name]['ms_per_step']:.1f} ms/step")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name, r in results.items():
            t, l = zip(*r["curve"])
            ax.plot(t, l, label=name, marker=".")
        ax.set(xlabel="wall-clock seconds (steps only)", ylabel="held-out loss (nats / char)",
               title=f"char LM on Shakespeare, {args.steps} steps, batch {args.batch_size}x{args.context}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot written to {args.plot}")
    return results


if __name__ == "__main__":
    cp.enable_compilation_cache()  # the next run loads its programs from ~/.cache/curvplan/jax
    main()
