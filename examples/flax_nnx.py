"""A flax nnx model trained with your own jitted step through `curvplan.as_optax`.

The optimizer is curvplan's Muon inside an ``optax.chain`` (gradient clipping first), its learning rate a
warm-up / cosine schedule driven by ``optax.inject_hyperparams``, so the current rate sits in the optimizer
state where a logger can read it. Muon needs nothing but the gradient, so `as_optax` takes no loss.

    python examples/flax_nnx.py            # 300 steps on the bundled digits
    python examples/flax_nnx.py --steps 20
"""

from __future__ import annotations

import jax.numpy as jnp
import optax
from common import load_digits, minibatches, parser, progress
from flax import nnx

import curvplan as cp


class MLP(nnx.Module):
    def __init__(self, sizes, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jnp.tanh(layer(x))
        return self.layers[-1](x)


def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def make_optimizer(steps: int, peak_lr: float = 0.02) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak_lr, max(steps // 10, 1), steps)
    muon = optax.inject_hyperparams(lambda learning_rate: cp.as_optax(cp.presets.muon(learning_rate)))
    return optax.chain(optax.clip_by_global_norm(1.0), muon(learning_rate=schedule))


def main(argv=None) -> dict:
    args = parser(__doc__, steps=300, batch_size=128).parse_args(argv)

    (xtr, ytr), (xte, yte) = load_digits()
    model = MLP((64, 128, 128, 10), nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, make_optimizer(args.steps), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
        optimizer.update(model, grads)
        return loss

    losses = []
    for x, y in progress(minibatches(xtr, ytr, args.batch_size, args.steps), args.steps, "nnx muon"):
        losses.append(float(train_step(model, optimizer, jnp.asarray(x), jnp.asarray(y))))
    lr = float(optimizer.opt_state[1].hyperparams["learning_rate"])
    test_loss = float(loss_fn(model, jnp.asarray(xte), jnp.asarray(yte)))
    test_acc = float(jnp.mean(jnp.argmax(model(jnp.asarray(xte)), -1) == jnp.asarray(yte)))
    print(f"flax nnx + curvplan muon: first loss {losses[0]:.3f}, last {losses[-1]:.3f}, "
          f"test loss {test_loss:.3f}, test accuracy {test_acc:.1%}, final learning rate {lr:.2e}")
    return {"losses": losses, "test_loss": test_loss, "test_acc": test_acc, "final_lr": lr}


if __name__ == "__main__":
    cp.enable_compilation_cache()  # the next run loads its programs from ~/.cache/curvplan/jax
    main()
