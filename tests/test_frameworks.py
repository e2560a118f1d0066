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
    the fixes; with ``out_axis=0``, or with an example batch at init (the layout read off the traced use), every
    matrix is covered (no fallback leaf), and the two give the same steps."""
    import equinox as eqx

    from curvplan.modules.preconditioners._kfac import FallbackWarning

    model = eqx.nn.MLP(4, 3, width_size=8, depth=2, activation=jnp.tanh, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    x, y = jax.random.normal(jax.random.key(1), (16, 4)), jnp.arange(16) % 3

    def model_fn(p, xs):
        return jax.vmap(eqx.combine(p, static))(xs)

    def run(example_batch=None, **kw):
        tx = cp.as_optax(cp.presets.kfac(**kw), model_fn=model_fn, loss="ce", example_batch=example_batch)
        p, s = params, tx.init(params)
        for _ in range(3):
            g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(model_fn(p, x), y).mean())(p)
            u, s = tx.update(g, s, p, batch=(x, y))
            p = eqx.apply_updates(p, u)
        return s.info

    with pytest.warns(FallbackWarning, match=r"leaves 2 to its fallback.*layers\[0\]\.weight.*example batch.*"
                                             r"out_axis=0"):
        info = run()
    assert int(info.kfac_layers) == 1
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        by_axis = run(out_axis=0)
        by_use = run(example_batch=(x, y))  # the layout read off the traced model: no flag
    for info in (by_axis, by_use):
        assert int(info.kfac_layers) == 3 and int(info.kfac_fallback_leaves) == 0
    np.testing.assert_allclose(float(by_use.update_norm), float(by_axis.update_norm), rtol=1e-5)


@pytest.mark.parametrize("preset", ["muon", "soap"])
def test_inject_hyperparams_changes_the_learning_rate_of_a_running_transformation(preset):
    """Setting the injected rate from 0.1 to 0.01 after 3 steps gives the run of the same preset with the
    schedule 0.1 (steps 0-2), 0.01 (from step 3)."""
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), "b": jnp.zeros(3)}
    grads = [jax.tree.map(lambda x, i=i: jnp.cos(3.0 * x + i) + 0.1 * i, params) for i in range(6)]
    make = getattr(cp.presets, preset)
    injected = optax.inject_hyperparams(lambda learning_rate: cp.as_optax(make(learning_rate)))(learning_rate=0.1)
    scheduled = cp.as_optax(make(lambda t: jnp.where(t < 3, 0.1, 0.01)))
    pa, sa, pb, sb = params, injected.init(params), params, scheduled.init(params)
    for t, g in enumerate(grads):
        if t == 3:
            sa.hyperparams["learning_rate"] = jnp.asarray(0.01)
        ua, sa = jax.jit(injected.update)(g, sa, pa)
        ub, sb = jax.jit(scheduled.update)(g, sb, pb)
        pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), pa, pb)
    assert float(sa.hyperparams["learning_rate"]) == pytest.approx(0.01)


def _framework_model(kind: str):
    """(params, model_fn(params, x)) for a 4-8-3 tanh MLP written with flax linen, flax nnx or equinox."""
    key = jax.random.key(0)
    if kind == "linen":
        import flax.linen as nn

        class MLP(nn.Module):
            @nn.compact
            def __call__(self, x):
                return nn.Dense(3)(jnp.tanh(nn.Dense(8)(x)))

        m = MLP()
        return m.init(key, jnp.ones((1, 4)))["params"], lambda p, x: m.apply({"params": p}, x)
    if kind == "nnx":
        from flax import nnx

        class MLP(nnx.Module):
            def __init__(self, rngs):
                self.l1, self.l2 = nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)

            def __call__(self, x):
                return self.l2(jnp.tanh(self.l1(x)))

        graphdef, state = nnx.split(MLP(nnx.Rngs(0)), nnx.Param)
        return nnx.to_pure_dict(state), lambda p, x: nnx.merge(graphdef, nnx.State(p))(x)
    import equinox as eqx

    model = eqx.nn.MLP(4, 3, width_size=8, depth=1, activation=jnp.tanh, key=key)
    params, static = eqx.partition(model, eqx.is_array)
    return params, lambda p, x: jax.vmap(eqx.combine(p, static))(x)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # flax's own notice about nnx.State
@pytest.mark.parametrize("driver", ["as_optax", "Optimizer"])
@pytest.mark.parametrize("preset", ["kfac", "shampoo", "soap", "muon", "sophia_h"])
@pytest.mark.parametrize("framework", ["linen", "nnx", "equinox"])
def test_frameworks_presets_and_drivers(framework, preset, driver):
    """Each framework's model trains with each method through both drivers, and every weight matrix is
    covered where the method covers matrices (K-FAC layers, Kronecker factors)."""
    from curvplan.modules.preconditioners._kfac import FallbackWarning

    params, model_fn = _framework_model(framework)
    x = jax.random.normal(jax.random.key(1), (32, 4))
    y = (x[:, 0] > 0).astype(jnp.int32) + (x[:, 1] > 0).astype(jnp.int32)
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(model_fn(p, x), y).mean()  # noqa: E731
    mods = {"kfac": lambda: cp.presets.kfac(0.2, inverse_every=1), "shampoo": lambda: cp.presets.shampoo(3e-2),
            "soap": lambda: cp.presets.soap(3e-2), "muon": lambda: cp.presets.muon(0.05),
            "sophia_h": lambda: cp.presets.sophia_h(3e-2, hessian_every=1)}[preset]()
    n_matrices = sum(jnp.ndim(a) == 2 for a in jax.tree.leaves(params))
    first = float(loss(params))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        if driver == "as_optax":
            tx = cp.as_optax(mods, model_fn=model_fn, loss="ce", example_batch=(x, y))
            p, s = params, tx.init(params)
            for t in range(4):
                u, s = tx.update(jax.grad(loss)(p), s, p, batch=(x, y), rng=jax.random.key(t))
                p = optax.apply_updates(p, u)
            state, info = s.plan_state, s.info
        else:
            opt = cp.Optimizer(mods, model_fn=model_fn, loss="ce")
            p, state = params, opt.init(params, batch=(x, y))
            for t in range(4):
                p, state, info = opt.step(p, state, (x, y), jax.random.key(t))
    assert float(loss(p)) < first and int(state.skipped) == 0
    if preset == "kfac":
        assert int(info.kfac_layers) == n_matrices and int(info.kfac_fallback_leaves) == 0
    if preset in ("shampoo", "soap"):
        factors = state.modules["grad_gram"].factors
        assert sum(isinstance(f, tuple) for f in factors) == n_matrices  # a Kronecker block per matrix
