"""Adaptive Schatten-p geometry (docs/math.md §7.6): the criterion against brute force on constructed spectra,
the regimes it must pick, the criterion module on hand-built activations, and the four corner cases (SGD, Muon,
Adam, MuAdam) against optax / a numpy reference. float64 throughout."""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import optax_trajectory

import curvplan as cp
from curvplan.ir import fresh
from curvplan.ir import quantities as q
from curvplan.lowering import _objective
from curvplan.modules import Context, Module, UpdateTail
from curvplan.modules._base import Inputs
from curvplan.modules.geometry import (
    SchattenCriterion,
    SchattenDirection,
    _maps,
    best_inv_p,
    leaf_keys,
    log_criterion,
)
from curvplan.modules.geometry._adaptive import DEFAULT_GRID, criterion_inv_ps
from curvplan.testing import assert_plan_text

pytestmark = pytest.mark.usefixtures("x64")


# -- brute force ---------------------------------------------------------------------------------------------
def np_schatten(s, r):
    return s.max() if math.isinf(r) else (s**r).sum() ** (1 / r)


def brute_J(sg, sa, p):
    """J(p) = ‖G‖_{S_{1+1/p}} / ‖A‖_{S_{2(p+1)/(p−1)}} from the definition (p = 1: k = ∞; p = ∞: k = 2)."""
    q_ = 1 + (0 if math.isinf(p) else 1 / p)
    k = math.inf if p == 1 else (2.0 if math.isinf(p) else 2 * (p + 1) / (p - 1))
    return np_schatten(sg, q_) / np_schatten(sa, k)


GRID = list(DEFAULT_GRID) + [math.inf]


def test_criterion_values_and_argmax_match_brute_force():
    rs = np.random.RandomState(0)
    for trial in range(40):
        sg = np.exp(rs.randn(rs.randint(2, 12)) * rs.uniform(0.1, 3))
        sa = np.exp(rs.randn(rs.randint(2, 12)) * rs.uniform(0.1, 3)) * 10 ** rs.uniform(-3, 3)
        js = [brute_J(sg, sa, p) for p in GRID]
        for p, j in zip(GRID, js):
            ip = 0.0 if math.isinf(p) else 1 / p
            np.testing.assert_allclose(
                float(jnp.exp(log_criterion(jnp.asarray(sg), jnp.asarray(sa), ip))), j, rtol=1e-10
            )
        p_star = GRID[int(np.argmax(js))]
        got = float(best_inv_p(jnp.asarray(sg), jnp.asarray(sa), criterion_inv_ps()))
        assert got == (0.0 if math.isinf(p_star) else 1 / p_star), (trial, got, p_star)
        # J is scale invariant in A (the 1/n of the surrogate does not matter)
        assert float(best_inv_p(jnp.asarray(sg), jnp.asarray(sa * 1e3), criterion_inv_ps())) == got


def test_limits_are_the_stable_rank_vs_nuclear_rank_test():
    flat, spike = np.ones(10), np.array([1.0] + [1e-2] * 9)
    one = np.array([1.0] + [0.0] * 9)
    # J(1) = ‖G‖_F/‖A‖_op and J(∞) = ‖G‖_*/‖A‖_F
    np.testing.assert_allclose(
        float(jnp.exp(log_criterion(jnp.asarray(flat), jnp.asarray(spike), 1.0))),
        np.linalg.norm(flat) / spike.max(),
    )
    np.testing.assert_allclose(
        float(jnp.exp(log_criterion(jnp.asarray(flat), jnp.asarray(spike), 0.0))),
        flat.sum() / np.linalg.norm(spike),
    )
    inv_ps = criterion_inv_ps()
    # high nuclear rank of G (flat spectrum) and stable rank of A ≈ 1 (one dominant direction): Muon (p = ∞)
    assert float(best_inv_p(jnp.asarray(flat), jnp.asarray(spike), inv_ps)) == 0.0
    # G of rank 1 and isotropic A (stable rank 10): SGD (p = 1)
    assert float(best_inv_p(jnp.asarray(one), jnp.asarray(flat), inv_ps)) == 1.0


# -- the criterion module on hand-built activations ----------------------------------------------------------
def ctx_for(module, params):
    return Context(jnp.zeros((), jnp.int32), None, params, None, None, module.label)


def criterion_inputs(mod, grads, acts, rng, prev):
    return Inputs({"grad": grads, "activations": acts, "rng": rng, "prev_inv_p": prev}, mod.label)


def spectra_inv_p(g, a):
    sg = np.linalg.svd(np.asarray(g), compute_uv=False)
    sa = np.linalg.svd(np.asarray(a), compute_uv=False)
    js = [brute_J(sg, sa, p) for p in GRID]
    p = GRID[int(np.argmax(js))]
    return 0.0 if math.isinf(p) else 1 / p


def test_criterion_module_picks_per_layer_p_from_activations():
    rs = np.random.RandomState(1)
    n = 64
    # layer a: isotropic inputs and a rank-1 gradient -> p = 1; layer b: spiked inputs, flat gradient -> p = ∞
    xa = rs.randn(n, 8)
    xb = np.outer(rs.randn(n), rs.randn(6)) * 10 + 0.01 * rs.randn(n, 6)
    ga = np.outer(rs.randn(8), rs.randn(5))
    gb = np.linalg.qr(rs.randn(6, 6))[0][:, :4]
    grads = {
        "a": {"w": jnp.asarray(ga), "b": jnp.zeros(5)},
        "b": {"w": jnp.asarray(gb)},
        "c": {"w": jnp.ones((3, 2))},
    }
    acts = {"['a']['w']": jnp.asarray(xa), "['b']['w']": jnp.asarray(xb)}  # layer c was not discovered
    mod = SchattenCriterion(init_p=2.0, report_layers=("['a']['w']", "['b']['w']"))
    ctx = ctx_for(mod, grads)
    state = mod.init(grads, ctx)
    prev = mod.init_carried("inv_p", grads, ctx)
    assert set(prev) == {"['a']['w']", "['b']['w']", "['c']['w']"}
    out, state, info = mod.apply(criterion_inputs(mod, grads, acts, None, prev), state, ctx)
    inv = out["inv_p"]
    assert float(inv["['a']['w']"]) == spectra_inv_p(ga, xa) == 1.0
    assert float(inv["['b']['w']"]) == spectra_inv_p(gb, xb) == 0.0
    assert float(inv["['c']['w']"]) == 0.5  # kept at init_p
    assert float(info["p['a']['w']"]) == 1.0 and math.isinf(float(info["p['b']['w']"]))
    assert float(info["p_min"]) == 1.0 and math.isinf(float(info["p_max"]))
    # a second refresh with the same data: the bias-corrected EMA of equal spectra is the same spectrum
    _, state2, _ = mod.apply(criterion_inputs(mod, grads, acts, None, inv), state, ctx)
    np.testing.assert_allclose(
        np.asarray(state2.sg["['a']['w']"]) / (1 - 0.9**2),
        np.linalg.svd(ga, compute_uv=False)[:5],
        rtol=1e-10,
        atol=1e-7 * 9,
    )
    # (σ from eigh of the Gram resolves singular values down to about √eps·σ_max ≈ 1e-8·8.4, hence the atol)
    # a non-finite refresh keeps the previous p and spectra and is counted
    bad = dict(acts, **{"['a']['w']": jnp.full((n, 8), jnp.nan)})
    out3, state3, info3 = mod.apply(
        criterion_inputs(mod, grads, bad, None, {k: jnp.asarray(0.25) for k in inv}), state2, ctx
    )
    assert int(state3.failures) == 1 and int(state3.count) == int(state2.count)
    assert all(float(v) == 0.25 for v in out3["inv_p"].values())
    assert int(info3["criterion_failures"]) == 1


def test_subsampled_spectrum_keeps_the_power_iteration_anchor():
    rs = np.random.RandomState(2)
    x = rs.randn(300, 40) @ np.diag(np.linspace(1, 3, 40)) + 0.5  # a mean direction: σ_max is separated
    g = {"l": {"w": jnp.asarray(rs.randn(40, 30))}}
    mod = SchattenCriterion(max_dim=16)
    ctx = ctx_for(mod, g)
    prev = mod.init_carried("inv_p", g, ctx)
    out, st, _ = mod.apply(
        criterion_inputs(mod, g, {"['l']['w']": jnp.asarray(x)}, jax.random.key(0), prev), mod.init(g, ctx), ctx
    )
    sa = np.asarray(st.sa["['l']['w']"]) / 0.1
    assert sa.shape == (16,)
    np.testing.assert_allclose(sa[0], np.linalg.svd(x, compute_uv=False)[0], rtol=1e-6)  # exact σ_max anchor
    assert np.all(np.isfinite(sa)) and float(out["inv_p"]["['l']['w']"]) in criterion_inv_ps()


# -- the four corner cases -------------------------------------------------------------------------------------
def problem(seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    params = {
        "l1": {"w": jax.random.normal(k[0], (5, 8)) / 2, "b": jnp.full(8, 0.1)},
        "l2": {"w": jax.random.normal(k[1], (8, 8)) / 3, "b": jnp.zeros(8)},
        "l3": {"w": jax.random.normal(k[2], (8, 3)) / 3},
    }

    def loss_fn(p, batch):
        x, y = batch
        h = jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"])
        h = jnp.tanh(h @ p["l2"]["w"] + p["l2"]["b"])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(h @ p["l3"]["w"], y))

    batches = [
        (
            jax.random.normal(jax.random.fold_in(k[3], i), (16, 5)),
            jax.random.randint(jax.random.fold_in(k[3], 100 + i), (16,), 0, 3),
        )
        for i in range(3)
    ]
    return params, loss_fn, batches


def trajectory_curvplan(modules, params, loss_fn, batches):
    opt = cp.Optimizer(modules, loss_fn=loss_fn)
    state, out = opt.init(params), []
    for b in batches:
        params, state, _ = opt.step(params, state, b)
        out.append(params)
    return out




def close(a, b, tol=1e-9):
    for pa, pb in zip(a, b):
        jax.tree.map(
            lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol), pa, pb
        )


def corner(lr, **kw):
    return [SchattenDirection(**kw), UpdateTail(learning_rate=lr, source="schatten")]


def test_corner_sgd():
    params, loss_fn, batches = problem()
    got = trajectory_curvplan(corner(0.1, fixed_p=1.0, beta=0.0, nesterov=False), params, loss_fn, batches)
    close(got, optax_trajectory(optax.sgd(0.1), params, loss_fn, batches))
    # with momentum: the bias-corrected EMA of the gradient (optax.ema with debias) times −lr
    got = trajectory_curvplan(corner(0.1, fixed_p=1.0, beta=0.9, nesterov=False), params, loss_fn, batches)
    close(
        got,
        optax_trajectory(
            optax.chain(optax.ema(0.9, debias=True), optax.scale(-0.1)), params, loss_fn, batches
        ),
    )


def test_corner_adam():
    params, loss_fn, batches = problem(1)
    got = trajectory_curvplan(
        corner(0.01, fixed_p=1.0, beta=0.9, nesterov=False, precondition="adam"), params, loss_fn, batches
    )
    close(got, optax_trajectory(optax.adam(0.01), params, loss_fn, batches))


def test_corner_muon():
    params, loss_fn, batches = problem(2)
    got = trajectory_curvplan(
        corner(0.02, fixed_p="inf", method="newton_schulz", vectors="adam"), params, loss_fn, batches
    )
    close(got, optax_trajectory(optax.contrib.muon(0.02), params, loss_fn, batches))
    # the exact path is Muon with the exact polar factor
    got = trajectory_curvplan(corner(0.02, fixed_p="inf", vectors="adam"), params, loss_fn, batches)
    close(
        got, trajectory_curvplan(cp.presets.muon(0.02, ns="exact"), params, loss_fn, batches)
    )


def test_corner_muadam():
    params, loss_fn, batches = problem(3)
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    got = trajectory_curvplan(cp.presets.muadam(lr), params, loss_fn, batches)
    # numpy reference, written from §7.6 (ii) with D = (√v̂ + eps)^(−1/2)
    p = jax.tree.map(np.asarray, params)
    m = jax.tree.map(np.zeros_like, p)
    v = jax.tree.map(np.zeros_like, p)
    for t, (b, p_got) in enumerate(zip(batches, got), start=1):
        g = jax.tree.map(np.asarray, jax.grad(loss_fn)(jax.tree.map(jnp.asarray, p), b))
        m = jax.tree.map(lambda a, x: b1 * a + (1 - b1) * x, m, g)
        v = jax.tree.map(lambda a, x: b2 * a + (1 - b2) * x**2, v, g)

        def step(th, mm, vv, t=t):
            mh, vh = mm / (1 - b1**t), vv / (1 - b2**t)
            d = (np.sqrt(vh) + eps) ** -0.5
            if th.ndim != 2:
                return th - lr * d * d * mh
            u, _, vt = np.linalg.svd(d * mh, full_matrices=False)
            return th - lr * d * (u @ vt) * math.sqrt(max(1.0, th.shape[1] / th.shape[0]))

        p = jax.tree.map(step, p, m, v)
        close([p_got], [p], tol=1e-8)


# -- the full pipeline with activations from layer_io --------------------------------------------------------
def hand_activations(params, x):
    """Layer inputs of the `problem` MLP, by hand (the shared layer-key convention)."""
    h1 = jnp.tanh(x @ params["l1"]["w"] + params["l1"]["b"])
    h2 = jnp.tanh(h1 @ params["l2"]["w"] + params["l2"]["b"])
    return {"['l1']['w']": x, "['l2']['w']": h1, "['l3']['w']": h2}


def _hand_layer_io(obj, params, batch, rng):
    """Stands in for the layer_io provider while it is not implemented."""
    loss, g = jax.value_and_grad(obj.loss)(params, batch)
    return {
        q.loss(): loss,
        q.grad(): g,
        q.activations(): hand_activations(params, batch[0]),
        q.out_cotangents(): {},
    }


@pytest.fixture
def layer_io(monkeypatch):
    params, loss_fn, batches = problem()
    obj = _objective.Objective(loss_fn=loss_fn)
    try:
        _objective.PROVIDER_IMPLS["layer_io"](obj, params, batches[0], None)
    except cp.LoweringError:
        monkeypatch.setitem(_objective.PROVIDER_IMPLS, "layer_io", _hand_layer_io)


def test_adaptive_schatten_end_to_end(layer_io):
    params, loss_fn, batches = problem(4)
    mods = cp.presets.adaptive_schatten(0.02, every=2, report_layers=("['l2']['w']",))
    opt = cp.Optimizer(mods, loss_fn=loss_fn)
    assert opt.plan.phase_of(0) != opt.plan.phase_of(1)
    state, p = opt.init(params), params
    for t, b in enumerate(batches[:3]):
        acts = hand_activations(p, b[0])
        g0 = dict(zip(leaf_keys(p), jax.tree.leaves(jax.grad(loss_fn)(p, b))))
        p, state, info = opt.step(p, state, b, rng=jax.random.key(t))
        if t == 0:
            inv = state.slots["%schatten_inv_p"]
            for k, a in acts.items():
                w = g0[k]
                np.testing.assert_allclose(
                    float(inv[k]), spectra_inv_p(w, a), rtol=1e-7, err_msg=k
                )  # f32 slot
            assert np.isfinite(float(info.p_mean)) or math.isinf(float(info.p_mean))
            assert float(info["p['l2']['w']"]) == (
                math.inf if float(inv["['l2']['w']"]) == 0 else 1 / float(inv["['l2']['w']"])
            )
        else:
            assert t != 1 or math.isnan(float(info.p_min))  # not a criterion step: telemetry absent


class _ActivationReader(Module):
    """A stand-in for K-FAC's factor module: reads %activations fresh every step (a sink, so it is kept)."""

    kind: Literal["activation_reader_test"] = "activation_reader_test"
    sink = True

    def consumes(self):
        return {"acts": fresh(q.activations())}

    def produces(self):
        return {"stub": q.quantity("kfac_stub")}


def test_plan_with_another_activation_consumer_shares_one_layer_io():
    mods = cp.presets.adaptive_schatten(every=2) + [_ActivationReader()]
    assert_plan_text(
        cp.compile_plan(mods, name="shared"),
        """
        plan shared: 2 phases, period 2
        phase 0 @every(2) [layer_io]
          %activations, %grad, %loss = layer_io(params, batch)
          %kfac_stub                 = activation_reader_test(%activations)
          %schatten_inv_p            = schatten_criterion(%grad, %activations, rng, carried %schatten_inv_p) -> carried
          %direction.schatten        = schatten_direction(%grad, %schatten_inv_p; vectors=adam)
          %update                    = update_tail(%direction.schatten, params; learning_rate=0.02, source=schatten)
        phase 1 @every(2,+1) [layer_io]
          %activations, %grad, %loss = layer_io(params, batch)
          %kfac_stub                 = activation_reader_test(%activations)
          %direction.schatten        = schatten_direction(%grad, carried %schatten_inv_p; vectors=adam)
          %update                    = update_tail(%direction.schatten, params; learning_rate=0.02, source=schatten)
        state: step, schatten_criterion.sg, schatten_criterion.sa, schatten_criterion.count, schatten_criterion.failures, schatten_direction.count, schatten_direction.m, schatten_direction.v, schatten_direction.adam_m, update_tail.opt_state, slot %schatten_inv_p
        programs: 1 for 2 phases (0 1): one per provider pass, the rest under cond
    """,
    )


# -- configuration bounds ------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.0, 0.5, -2.0])
def test_fixed_p_below_one_is_refused_at_construction(p):
    """Schatten-p needs p ∈ [1, ∞]: p = 0 used to raise a bare ZeroDivisionError at the first step."""
    with pytest.raises(cp.ConfigError, match=r"fixed_p=.* is outside \[1, ∞\]") as e:
        SchattenDirection(fixed_p=p)
    assert "p ≥ 1" in e.value.fix
    for ok in (1.0, 2.5, "inf"):
        SchattenDirection(fixed_p=ok)


def test_criterion_grid_below_one_is_refused_at_construction():
    with pytest.raises(cp.ConfigError, match=r"outside \[1, ∞\]: \[0.5\]"):
        SchattenCriterion(grid=(0.5, 2.0))
    with pytest.raises(cp.ConfigError, match="no candidate p"):
        SchattenCriterion(grid=(), include_inf=False)


@pytest.mark.parametrize("cls", ["SchattenDirection", "MuonDirection", "LMODirection"])
def test_newton_schulz_steps_are_bounded_at_construction(cls):
    """ns_steps = 10⁹ used to build a (10⁹, 3) coefficient table (about 22 GiB); 100 is the most allowed."""
    mod = getattr(cp.modules.geometry, cls)
    with pytest.raises(cp.ConfigError, match="ns_steps") as e:
        mod(ns_steps=10**9)
    assert "less than or equal to 100" in str(e.value)
    assert mod(ns_steps=100).ns_steps == 100


def test_refitted_map_with_fewer_than_five_steps_is_refused_for_fractional_p():
    """Below five steps the per-step exponent p^(-1/steps) of p = ∞ (run as 1024) is under 0.19 and the fitted
    quintic leaves [0, 1]: three steps send the singular values of a Gaussian 64×32 matrix to several times 1
    (numpy's SVD measures them), five keep them below 1, so `SchattenDirection` refuses such a Newton-Schulz
    path."""
    m = jnp.asarray(np.random.default_rng(0).normal(size=(64, 32)), jnp.float32)
    sigma = {k: np.linalg.svd(np.asarray(_maps.schatten_ns(m, jnp.inf, steps=k), np.float64), compute_uv=False)[0]
             for k in (3, 5)}
    assert sigma[3] > 2.0 and sigma[5] <= 1.0 + 1e-3, sigma
    with pytest.raises(cp.ConfigError, match="ns_steps=3"):
        SchattenDirection(method="newton_schulz", ns_steps=3)
    with pytest.raises(cp.ConfigError, match="ns_steps=4"):
        SchattenDirection(method="auto", fixed_p=4.0, ns_steps=4)
    assert SchattenDirection(method="exact", ns_steps=3).ns_steps == 3
    assert SchattenDirection(method="newton_schulz", fixed_p="inf", ns_steps=3).ns_steps == 3  # Muon's map
