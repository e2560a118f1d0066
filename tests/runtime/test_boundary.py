"""Mistakes a user makes at the boundary of a step raise a `cp.Error` that names the argument, what was expected,
what came and the fix, before anything is differentiated (one test per row of the table in the docs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvplan as cp
from curvplan.lowering import ce_loss


def mlp(p, x):
    return jnp.tanh(x @ p["w1"]) @ p["w2"]


@pytest.fixture(scope="module")
def data():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {"w1": jax.random.normal(k1, (4, 6)) / 2, "w2": jax.random.normal(k2, (6, 3)) / 3}
    x = jax.random.normal(k3, (8, 4))
    y = jnp.arange(8, dtype=jnp.int32) % 3
    return params, x, y


def raises(match: str):
    return pytest.raises(cp.Error, match=f"(?s){match}")


def test_one_hot_labels_with_ce(data):
    params, x, y = data
    opt = cp.Optimizer(cp.presets.gauss_newton_cg(loss="ce"), model_fn=mlp, loss="ce")
    with raises(r"integer class labels, got one-hot float32 targets of shape \(8, 3\).*argmax"):
        opt.step(params, opt.init(params), (x, jax.nn.one_hot(y, 3)))


def test_float_labels_with_ce(data):
    params, x, y = data
    opt = cp.Optimizer(cp.presets.gauss_newton_cg(loss="ce"), model_fn=mlp, loss="ce")
    with raises(r"integer class labels, got float32 targets of shape \(8,\).*astype"):
        opt.step(params, opt.init(params), (x, y.astype(jnp.float32)))


def test_mse_targets_of_the_wrong_shape(data):
    params, x, _ = data
    opt = cp.Optimizer(cp.presets.gauss_newton_cg(loss="mse"), model_fn=mlp, loss="mse")
    with raises(r"one target per output: outputs \(8, 3\), targets \(8,\).*shape \(8, 3\)"):
        opt.step(params, opt.init(params), (x, jnp.zeros(8)))


@pytest.mark.parametrize("preset", ["sophia_h", "newton_cg"])
def test_forgetting_the_batch_in_as_optax(data, preset):
    params, x, y = data
    loss = lambda p, b: ce_loss(mlp(p, b[0]), b[1])  # noqa: E731
    tx = cp.as_optax(getattr(cp.presets, preset)(), loss)
    state = tx.init(params)
    g = jax.grad(loss)(params, (x, y))
    with raises(r"needs .* computed from the model on the batch, but the step got no batch.*batch=batch"):
        tx.update(g, state, params, rng=jax.random.key(0))


def test_model_fn_arguments_swapped(data):
    params, x, y = data
    opt = cp.Optimizer(cp.presets.gauss_newton_cg(loss="ce"), model_fn=lambda x, p: mlp(p, x), loss="ce")
    with raises(r"model_fn\(params, inputs\) failed on the given arguments.*\(params, inputs\), in that order"):
        opt.step(params, opt.init(params), (x, y))


def test_a_per_example_loss(data):
    params, x, y = data
    per_example = lambda p, b: jnp.sum((mlp(p, b[0]) - 1.0) ** 2, axis=-1)  # noqa: E731
    opt = cp.Optimizer(cp.presets.newton_cg(), loss_fn=per_example)
    with raises(r"loss_fn returned an array of shape \(8,\), not a scalar.*mean"):
        opt.step(params, opt.init(params), (x, y))


def test_integer_leaves_in_params(data):
    params, x, y = data
    bad = dict(params, count=jnp.zeros((), jnp.int32))
    opt = cp.Optimizer(cp.presets.newton_cg(), loss_fn=lambda p, b: ce_loss(mlp(p, b[0]), b[1]))
    with raises(r"floating point .* 1 leaves are not: \['count'\]: int32"):
        opt.init(bad)


def test_a_whole_equinox_model_as_params():
    import equinox as eqx

    model = eqx.nn.MLP(4, 3, width_size=8, depth=1, activation=jnp.tanh, key=jax.random.key(0))
    tx = cp.as_optax(cp.presets.muon())
    with raises(r"parameters must be arrays; 2 leaves are not: .activation: PjitFunction.*eqx.partition"):
        tx.init(model)


def test_state_of_another_plan(data):
    params, _, _ = data
    soap, shampoo = cp.as_optax(cp.presets.soap()), cp.as_optax(cp.presets.shampoo())
    with raises(r"built by another plan: it holds the modules \[.*soap.*\], this plan has \[.*shampoo.*init"):
        shampoo.update(params, soap.init(params), params)


def test_state_built_for_other_shapes(data):
    params, _, _ = data
    tx = cp.as_optax(cp.presets.muon())
    other = {"w1": jnp.ones((4, 5)), "w2": jnp.ones((5, 3))}
    with raises(r"state leaf .*\['w1'\].* has shape \(4, 5\), but these parameters need \(4, 6\)"):
        tx.update(params, tx.init(other), params)


def test_optax_state_given_to_optimizer_step(data):
    params, x, y = data
    tx = cp.as_optax(cp.presets.muon())
    opt = cp.Optimizer(cp.presets.muon(), loss_fn=lambda p, b: ce_loss(mlp(p, b[0]), b[1]))
    with raises(r"expected a PlanState, got a OptaxPlanState.*opt.init\(params\)"):
        opt.step(params, tx.init(params), (x, y))
    with raises(r"expected a OptaxPlanState, got a PlanState.*init\(params\)"):
        tx.update(params, opt.init(params), params)


@pytest.mark.parametrize("entry", ["compile_plan", "Optimizer", "as_optax"])
def test_a_preset_passed_uncalled(entry):
    call = {"compile_plan": cp.compile_plan, "Optimizer": lambda m: cp.Optimizer(m, loss_fn=lambda p, b: 0.0),
            "as_optax": cp.as_optax}[entry]
    with raises(r"`kfac` was passed uncalled.*call it: `kfac\(\)`"):
        call(cp.presets.kfac)


def test_correct_inputs_pass_the_checks(data):
    """The checks reject only mistakes: the same calls with the right inputs train."""
    params, x, y = data
    opt = cp.Optimizer(cp.presets.gauss_newton_cg(loss="ce"), model_fn=mlp, loss="ce")
    state = opt.init(params)
    p1, state, info = opt.step(params, state, (x, y))
    assert np.isfinite(float(info.loss)) and not bool(info.skipped)


def test_as_optax_refuses_a_plan_that_ignores_the_given_gradient():
    """egn's row-space solve builds its right-hand side from the batch: a gradient given to update() (clipped,
    accumulated, or NaN) would make no difference, so as_optax refuses the plan and says what to use."""
    with pytest.raises(cp.LoweringError) as info:
        cp.as_optax(cp.presets.egn(loss="ce"), model_fn=lambda p, x: x @ p, loss="ce")
    msg = str(info.value)
    assert "`row_space`" in msg and "%grad" in msg and "cp.Optimizer" in msg
    cp.as_optax(cp.presets.gauss_newton_cg(), model_fn=lambda p, x: x @ p, loss="ce")  # reads %grad: accepted
