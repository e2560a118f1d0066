"""An equinox model trained with your own ``eqx.filter_jit`` step through `curvplan.as_optax`.

The optimizer is curvplan's SOAP after gradient clipping in an ``optax.chain``, with its learning rate under
``optax.inject_hyperparams`` and set from a schedule. The parameters are the model's arrays
(``eqx.filter(model, eqx.is_array)``), as equinox's own optax examples do.

    python examples/equinox_mlp.py            # 300 steps on the bundled digits
    python examples/equinox_mlp.py --steps 20
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from common import load_digits, minibatches, parser, progress

import curvplan as cp


def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(jax.vmap(model)(x), y).mean()


def main(argv=None) -> dict:
    args = parser(__doc__, steps=300, batch_size=128).parse_args(argv)

    (xtr, ytr), (xte, yte) = load_digits()
    model = eqx.nn.MLP(64, 10, width_size=128, depth=2, activation=jnp.tanh, key=jax.random.key(0))
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, max(args.steps // 10, 1), args.steps)
    soap = optax.inject_hyperparams(lambda learning_rate: cp.as_optax(cp.presets.soap(learning_rate)))
    tx = optax.chain(optax.clip_by_global_norm(1.0), soap(learning_rate=schedule))
    opt_state = tx.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def train_step(model, opt_state, x, y):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    losses = []
    for x, y in progress(minibatches(xtr, ytr, args.batch_size, args.steps), args.steps, "equinox soap"):
        model, opt_state, loss = train_step(model, opt_state, jnp.asarray(x), jnp.asarray(y))
        losses.append(float(loss))
    test_loss = float(loss_fn(model, jnp.asarray(xte), jnp.asarray(yte)))
    test_acc = float(jnp.mean(jnp.argmax(jax.vmap(model)(jnp.asarray(xte)), -1) == jnp.asarray(yte)))
    print(f"equinox + curvplan soap: first loss {losses[0]:.3f}, last {losses[-1]:.3f}, "
          f"test loss {test_loss:.3f}, test accuracy {test_acc:.1%}")
    return {"losses": losses, "test_loss": test_loss, "test_acc": test_acc}


if __name__ == "__main__":
    cp.enable_compilation_cache()  # the next run loads its programs from ~/.cache/curvplan/jax
    main()
