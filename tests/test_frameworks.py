"""curvplan inside the frameworks users bring: optimizer state survives their pytree round trips.

Reference: the same transformation driven by hand on a plain dict of the same parameters and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvplan as cp


@pytest.mark.parametrize("preset", ["shampoo", "soap", "muon", "scao_modules"])
def test_flax_nnx_optimizer_keeps_curvplan_state_intact(preset):
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1, self.l2 = nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            return self.l2(jnp.tanh(self.l1(x)))

    x = jax.random.normal(jax.random.key(1), (16, 4))
    y = jnp.arange(16) % 3
    settings = {"shampoo": dict(root_every=2), "soap": dict(precondition_frequency=2),
                "scao_modules": dict(warmup_steps=1, precond_freq=2, blend_steps=2, min_precond_updates=1)}
    make = lambda: cp.as_optax(getattr(cp.presets, preset)(**settings.get(preset, {})))  # noqa: E731

    model = MLP(nnx.Rngs(0))
    plain = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    opt = nnx.Optimizer(model, make(), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        g = nnx.grad(lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean())(model)
        opt.update(model, g)

    def plain_loss(p):  # the same network written out on the plain dict
        h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])
        return optax.softmax_cross_entropy_with_integer_labels(h @ p["l2"]["kernel"] + p["l2"]["bias"], y).mean()

    tx = make()
    state = tx.init(plain)
    plain_step = jax.jit(lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(
        *tx.update(jax.grad(plain_loss)(p), s, p)))
    for _ in range(5):  # past two refreshes, so the rebuilt state is read back at least twice
        step(model, opt)
        plain, state = plain_step(plain, state)
    got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
                 got, plain)
    assert int(state.plan_state.step) == 5


def test_equinox_kfac_names_the_layout_fix_and_covers_every_layer_with_it():
    """eqx.nn.Linear weights are (out, in): with the default allocation K-FAC warns once, naming the leaves and
    ``out_axis=0``; with it, every matrix is covered (no fallback leaf) and training takes the K-FAC steps."""
    import equinox as eqx

    from curvplan.modules.preconditioners._kfac import FallbackWarning

    model = eqx.nn.MLP(4, 3, width_size=8, depth=2, activation=jnp.tanh, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    x, y = jax.random.normal(jax.random.key(1), (16, 4)), jnp.arange(16) % 3

    def model_fn(p, xs):
        return jax.vmap(eqx.combine(p, static))(xs)

    def run(**kw):
        tx = cp.as_optax(cp.presets.kfac(**kw), model_fn=model_fn, loss="ce")
        p, s = params, tx.init(params)
        for _ in range(3):
            g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(model_fn(p, x), y).mean())(p)
            u, s = tx.update(g, s, p, batch=(x, y))
            p = eqx.apply_updates(p, u)
        return s.info

    with pytest.warns(FallbackWarning, match=r"leaves 2 to its fallback.*layers\[0\]\.weight.*pass out_axis=0"):
        info = run()
    assert int(info.kfac_layers) == 1
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        info = run(out_axis=0)
    assert int(info.kfac_layers) == 3 and int(info.kfac_fallback_leaves) == 0
