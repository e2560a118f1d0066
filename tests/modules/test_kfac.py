"""K-FAC modules against explicit references: factors from per-example loops (float64), the direction from a
materialized (A ⊗ Γ + γ I)⁻¹ / (Â ⊗ Γ̂)⁻¹ solve in numpy, refresh failure handling, the plan text, and W1
training through the public `Optimizer`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvplan as cp
from curvplan.ir import quantities as q
from curvplan.lowering import Objective
from curvplan.lowering._objective import PROVIDER_IMPLS
from curvplan.modules import Context
from curvplan.modules.preconditioners._kfac import (
    KFACDirection,
    KFACFactors,
    KFACInverse,
    kfac,
    kfac_eigbasis,
    kfac_inverses,
)
from curvplan.testing import assert_plan_text


def ctx(params, name="m"):
    return Context(jnp.zeros((), jnp.int32), None, params, None, None, name)


def mlp_problem(seed=0, n=6):
    k = jax.random.split(jax.random.key(seed), 4)
    params = {"l0": {"w": jax.random.normal(k[0], (3, 4)), "b": jax.random.normal(k[1], (4,))},
              "l1": {"w": jax.random.normal(k[2], (4, 2))}}  # l1 has no bias

    def model(p, x):
        return jnp.tanh(x @ p["l0"]["w"] + p["l0"]["b"]) @ p["l1"]["w"]

    x = jax.random.normal(k[3], (n, 3))
    y = jnp.arange(n) % 2
    return params, Objective(model_fn=model, loss_kind="ce"), (x, y)


def reference_factors(params, batch):
    """A = mean ā āᵀ and Γ = mean δδᵀ with δ = ∂ℓ_b/∂s_b of each example's own loss, one example at a time."""
    x, y = batch
    acc = {"l0": [np.zeros((4, 4)), np.zeros((4, 4))], "l1": [np.zeros((4, 4)), np.zeros((2, 2))]}
    for xb, yb in zip(np.asarray(x), np.asarray(y)):
        def loss_of(s0, s1_pert):
            h = jnp.tanh(s0)
            logits = h @ params["l1"]["w"] + s1_pert
            return -jax.nn.log_softmax(logits)[yb]

        s0 = jnp.asarray(xb) @ params["l0"]["w"] + params["l0"]["b"]
        d0, d1 = jax.grad(loss_of, argnums=(0, 1))(s0, jnp.zeros(2))
        a0 = np.append(xb, 1.0)  # bias: homogeneous coordinate
        a1 = np.tanh(np.asarray(s0))  # no bias
        for name, a, d in (("l0", a0, d0), ("l1", a1, d1)):
            acc[name][0] += np.outer(a, a) / len(x)
            acc[name][1] += np.outer(d, d) / len(x)
    return acc


@pytest.mark.usefixtures("x64")
def test_factors_equal_per_example_definitions_and_ema():
    params, obj, batch = mlp_problem()
    batch2 = mlp_problem(seed=1)[2]
    mod = KFACFactors(ema=0.9)
    state = mod.init(params, ctx(params))
    outs = []
    for b in (batch, batch2):
        vals = PROVIDER_IMPLS["layer_io"](obj, params, b, None)
        out, state = mod.apply({"acts": vals[q.activations()], "cots": vals[q.out_cotangents()]}, state, ctx(params))
        outs.append(out["factors"])
    r1, r2 = reference_factors(params, batch), reference_factors(params, batch2)
    for key, name in (("['l0']['w']", "l0"), ("['l1']['w']", "l1")):
        np.testing.assert_allclose(outs[0][key][0], r1[name][0], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(outs[0][key][1], r1[name][1], rtol=1e-10, atol=1e-12)
        for i in (0, 1):  # weighted moving average: (0.9 x1 + x2) / (0.9 + 1)
            np.testing.assert_allclose(outs[1][key][i], (0.9 * r1[name][i] + r2[name][i]) / 1.9, rtol=1e-10, atol=1e-12)
    assert outs[0]["['l0']['w']"][0].shape == (4, 4) and outs[0]["['l1']['w']"][0].shape == (4, 4)


@pytest.mark.usefixtures("x64")
def test_sampled_label_cotangents_follow_their_definition_and_average_to_the_fisher():
    """With a fixed key, the sampled-label Γ of the output layer is (1/N) Σ e_n e_nᵀ for e_n = p_n − onehot(ŷ_n)
    drawn exactly as the provider draws; over many keys it averages to the Fisher factor
    (1/N) Σ (diag p_n − p_n p_nᵀ), within 5 standard errors of the mean measured over the draws."""
    params, obj, batch = mlp_problem(n=8)
    x, _ = batch
    logits = obj.model_fn(params, x)
    p = np.asarray(jax.nn.softmax(logits))
    key = "['l1']['w']"

    def gamma_of(rng):
        vals = PROVIDER_IMPLS["layer_io_sampled"](obj, params, batch, rng)
        d = np.asarray(vals[q.out_cotangents(labels="sampled")][key])
        return d.T @ d * len(x)  # Γ = (1/N) Σ (N δ)(N δ)ᵀ

    rng = jax.random.key(7)
    ys = np.asarray(jax.random.categorical(jax.random.fold_in(rng, 0x5A3), logits, axis=-1))
    e = p - np.eye(2)[ys]
    np.testing.assert_allclose(gamma_of(rng), e.T @ e / len(x), rtol=1e-10, atol=1e-12)
    draws = np.stack([gamma_of(jax.random.key(s)) for s in range(300)])
    fisher = sum(np.diag(pn) - np.outer(pn, pn) for pn in p) / len(x)
    se = draws.std(axis=0) / np.sqrt(len(draws))
    assert np.all(np.abs(draws.mean(axis=0) - fisher) <= 5 * se + 1e-12), (draws.mean(axis=0), fisher, se)
    # true-label outputs are unchanged by the extra draw
    base = PROVIDER_IMPLS["layer_io"](obj, params, batch, None)
    vals = PROVIDER_IMPLS["layer_io_sampled"](obj, params, batch, rng)
    np.testing.assert_allclose(vals[q.grad()]["l0"]["w"], base[q.grad()]["l0"]["w"], rtol=1e-12)


def test_sampled_label_kfac_plan_and_errors():
    plan = cp.compile_plan(kfac(labels="sampled"))
    assert "layer_io_sampled" in str(plan) and "%out_cotangents.sampled" in str(plan)
    params, obj, batch = mlp_problem()
    with pytest.raises(cp.LoweringError, match="rng"):
        PROVIDER_IMPLS["layer_io_sampled"](obj, params, batch, None)
    with pytest.raises(cp.LoweringError, match="model outputs"):
        PROVIDER_IMPLS["layer_io_sampled"](Objective(loss_fn=obj.loss), params, batch, jax.random.key(0))


def random_spd(rs, n, shift=0.1):
    m = rs.randn(n, n)
    return m @ m.T / n + shift * np.eye(n)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("mode", ["exact", "pi"])
def test_direction_equals_materialized_kronecker_solve(mode):
    params, obj, batch = mlp_problem()
    vals = PROVIDER_IMPLS["layer_io"](obj, params, batch, None)
    acts = vals[q.activations()]
    rs = np.random.RandomState(0)
    factors = {"['l0']['w']": (random_spd(rs, 4), random_spd(rs, 4)),
               "['l1']['w']": (random_spd(rs, 4), random_spd(rs, 2))}
    gamma = 0.05
    inv = KFACInverse(pi_damping=gamma if mode == "pi" else None)  # "pi": stores the damped inverses
    carried_q = kfac_inverses(gamma) if mode == "pi" else kfac_eigbasis()
    bases, inv_state, _ = inv.apply({"factors": {k: tuple(map(jnp.asarray, v)) for k, v in factors.items()},
                                     "basis": inv.init_carried("basis", params, ctx(params))},
                                    inv.init(params, ctx(params)), ctx(params))
    assert int(inv_state.failures) == 0
    direc = KFACDirection(damping=gamma, damping_mode=mode)
    assert carried_q in [u.quantity for u in direc.uses()]
    g = jax.tree.map(lambda x: jax.random.normal(jax.random.key(3), x.shape, x.dtype), params)
    out, _, _ = direc.apply({"grad": g, "basis": bases["basis"], "acts": acts}, direc.init(params, ctx(params)),
                            ctx(params))
    u = out["direction"]

    def solve(A, G, grad_m):
        if mode == "exact":
            M = np.kron(A, G) + gamma * np.eye(A.shape[0] * G.shape[0])
        else:  # π-adjusted Tikhonov damping (docs/math.md §6.1)
            pi = np.sqrt((np.trace(A) / A.shape[0]) / (np.trace(G) / G.shape[0]))
            M = np.kron(A + pi * np.sqrt(gamma) * np.eye(len(A)), G + np.sqrt(gamma) / pi * np.eye(len(G)))
        return np.linalg.solve(M, grad_m.ravel()).reshape(grad_m.shape)  # row-major vec: (A⊗G)vec X = vec(A X G)

    aug = np.vstack([np.asarray(g["l0"]["w"]), np.asarray(g["l0"]["b"])[None]])
    ref0 = solve(*factors["['l0']['w']"], aug)
    np.testing.assert_allclose(u["l0"]["w"], ref0[:3], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(u["l0"]["b"], ref0[3], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(u["l1"]["w"], solve(*factors["['l1']['w']"], np.asarray(g["l1"]["w"])),
                               rtol=1e-9, atol=1e-12)


@pytest.mark.usefixtures("x64")
def test_failed_refresh_keeps_previous_bases_and_fallback_for_unhandled():
    params, obj, batch = mlp_problem()
    inv = KFACInverse()
    state = inv.init(params, ctx(params))
    good = {"['l0']['w']": (jnp.eye(4) * 2.0, jnp.eye(4) * 3.0), "['l1']['w']": (jnp.eye(4), jnp.eye(2))}
    out1, state, _ = inv.apply({"factors": good, "basis": inv.init_carried("basis", params, ctx(params))},
                               state, ctx(params))
    bad = dict(good, **{"['l1']['w']": (jnp.full((4, 4), jnp.nan), jnp.eye(2))})
    out2, state, info = inv.apply({"factors": bad, "basis": out1["basis"]}, state, ctx(params))
    assert int(state.failures) == 1 and int(info["kfac_inverse_failures"]) == 1
    jax.tree.map(np.testing.assert_array_equal, out2["basis"], out1["basis"])

    # a parameter used twice is not a layer: identity fallback, counted in telemetry
    shared = {"w": jnp.eye(3) * 0.5, "u": jnp.ones((3, 2))}
    loss = lambda p, b: jnp.sum((b @ p["w"] @ p["w"] @ p["u"]) ** 2)  # noqa: E731
    vals = PROVIDER_IMPLS["layer_io"](Objective(loss_fn=loss), shared, jnp.ones((2, 3)), None)
    assert "['w']" in vals[q.activations()].report.skipped
    direc = KFACDirection(damping_mode="exact")
    c = ctx(shared)
    out, _, info = direc.apply({"grad": vals[q.grad()], "basis": inv.init_carried("basis", shared, c),
                                "acts": vals[q.activations()]}, direc.init(shared, c), c)
    np.testing.assert_array_equal(out["direction"]["w"], vals[q.grad()]["w"])
    np.testing.assert_array_equal(out["direction"]["u"], 0.0)  # no refresh yet: covered layers wait
    assert int(info["kfac_layers"]) == 1 and int(info["kfac_fallback_leaves"]) == 1


@pytest.mark.usefixtures("x64")
def test_diagonal_fallback_is_the_bias_corrected_squared_gradient_average():
    """``fallback="diagonal"`` gives a leaf discovery could not handle g / (v̂ + γ), v̂ the bias-corrected
    EMA of g² (numpy, two steps); the identity fallback keeps no EMA (its ``v`` is ``()``)."""
    shared = {"w": jnp.eye(3) * 0.5, "u": jnp.ones((3, 2))}
    loss = lambda p, b: jnp.sum((b @ p["w"] @ p["w"] @ p["u"]) ** 2)  # noqa: E731
    vals = PROVIDER_IMPLS["layer_io"](Objective(loss_fn=loss), shared, jnp.ones((2, 3)), None)
    c = ctx(shared)
    basis = KFACInverse().init_carried("basis", shared, c)
    direc = KFACDirection(damping_mode="exact", damping=0.01, fallback="diagonal", fallback_ema=0.9)
    state = direc.init(shared, c)
    rs = np.random.RandomState(1)
    grads = [{k: jnp.asarray(rs.randn(*x.shape)) for k, x in shared.items()} for _ in range(2)]
    for g in grads:
        out, state, _ = direc.apply({"grad": g, "basis": basis, "acts": vals[q.activations()]}, state, c)
    g1, g2 = (np.asarray(g["w"]) for g in grads)
    v = 0.9 * (0.1 * g1 ** 2) + 0.1 * g2 ** 2
    np.testing.assert_allclose(out["direction"]["w"], g2 / (v / (1 - 0.9 ** 2) + 0.01), rtol=1e-12)
    assert int(state.count) == 2
    assert KFACDirection().init(shared, c).v == () and KFACDirection().state_names() == ("v", "count")


def test_plan_text_shows_inverse_refresh_every_k():
    assert_plan_text(cp.compile_plan(kfac(learning_rate=0.1, damping=0.1, inverse_every=5), name="kfac"), """
        plan kfac: 2 phases, period 5
        phase 0 @every(5) [layer_io]
          %activations, %grad, %loss, %out_cotangents = layer_io(params, batch)
          %kron.kfac                                  = kfac_factors(%activations, %out_cotangents)
          %inverse.kfac                               = kfac_inverse(%kron.kfac, carried %inverse.kfac; pi_damping=0.1) -> carried
          %direction.kfac                             = kfac_direction(%grad, %inverse.kfac, %activations; damping=0.1)
          %update                                     = update_tail(%direction.kfac, params; learning_rate=0.1, source=kfac)
        phase 1 otherwise [layer_io]
          %activations, %grad, %loss, %out_cotangents = layer_io(params, batch)
          %direction.kfac                             = kfac_direction(%grad, carried %inverse.kfac, %activations; damping=0.1)
          %kron.kfac                                  = kfac_factors(%activations, %out_cotangents)
          %update                                     = update_tail(%direction.kfac, params; learning_rate=0.1, source=kfac)
        state: step, kfac_direction.v, kfac_direction.count, kfac_factors.sums, kfac_factors.weight, kfac_inverse.failures, update_tail.opt_state, slot %inverse.kfac
        programs: 1 for 2 phases (0 1): one per provider pass, the rest under cond
    """)


def test_w1_trains_with_kfac():
    from benchmarks.workloads import get_workload

    w = get_workload("w1")
    params = w.init(jax.random.key(0))
    opt = cp.Optimizer(kfac(learning_rate=0.1, damping=0.1, inverse_every=5), model_fn=w.model_fn, loss=w.loss_kind)
    state = opt.init(params)
    batches = w.batches(0)
    fixed = next(batches)
    first = float(w.loss_fn(params, fixed))
    for _ in range(12):
        params, state, info = opt.step(params, state, next(batches))
        assert int(info.kfac_layers) == 3 and int(info.kfac_fallback_leaves) == 0
    assert float(w.loss_fn(params, fixed)) < 0.6 * first
    assert opt.plan.programs == ((0, 1),) and opt.trace_counts == [1]  # one program, compiled once


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("mode", ["exact", "pi"])
def test_adaptive_direction_uses_the_carried_lambda(mode):
    """KFACDirection(adaptive=True) fed λ through %lambda gives the constant-damping direction with damping=λ."""
    params, obj, batch = mlp_problem()
    vals = PROVIDER_IMPLS["layer_io"](obj, params, batch, None)
    c = ctx(params)
    factors = {k: v for k, v in KFACFactors().apply(
        {"acts": vals[q.activations()], "cots": vals[q.out_cotangents()]},
        KFACFactors().init(params, c), c)[0]["factors"].items()}

    def refreshed(inv):
        return inv.apply({"factors": factors, "basis": inv.init_carried("basis", params, c)},
                         inv.init(params, c), c)[0]["basis"]

    common = {"grad": vals[q.grad()], "acts": vals[q.activations()]}
    fixed = KFACDirection(damping=0.037, damping_mode=mode)
    fixed_in = {**common, "basis": refreshed(KFACInverse(pi_damping=0.037 if mode == "pi" else None))}
    adapt = KFACDirection(damping=1.0, damping_mode=mode, adaptive=True)  # always the eigen form
    adapt_in = {**common, "basis": refreshed(KFACInverse()), "lam": jnp.asarray(0.037)}
    want = fixed.apply(fixed_in, fixed.init(params, c), c)[0]["direction"]
    got = adapt.apply(adapt_in, adapt.init(params, c), c)[0]["direction"]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), got, want)
    assert q.lam() in [u.quantity for u in adapt.uses()] and q.lam() not in [u.quantity for u in fixed.uses()]


def test_adaptive_damping_preset_trains_w1_and_adapts_lambda():
    from benchmarks.workloads import get_workload

    w = get_workload("w1")
    mods = kfac(learning_rate=0.1, damping=0.1, inverse_every=5, adapt_damping_every=5)
    opt = cp.Optimizer(mods, model_fn=w.model_fn, loss="ce")
    assert "linearize_model" in str(opt.plan) and "trust_region_damping" in str(opt.plan)
    params = w.init(jax.random.key(0))
    state = opt.init(params)
    full = (jnp.asarray(w.train[0][:512]), jnp.asarray(w.train[1][:512]))
    before = float(w.loss_fn(params, full))
    batches = w.batches(seed=0)
    lams, rhos = [], []
    for t in range(30):
        params, state, info = opt.step(params, state, next(batches), rng=jax.random.key(t))
        assert not bool(info.skipped)
        if t % 5 == 0:
            lams.append(float(info.lambda_next))
            rhos.append(float(info.rho))
    assert float(w.loss_fn(params, full)) < 0.5 * before
    assert all(np.isfinite(rhos)), rhos
    omega = (19 / 20) ** 5  # each adaptation multiplies λ by ω, 1/ω or 1, following ρ
    ratios = np.asarray(lams) / np.asarray([0.1] + lams[:-1])
    assert all(min(abs(r - f) for f in (omega, 1 / omega, 1.0)) < 1e-6 for r in ratios), ratios
    assert any(abs(r - 1.0) > 1e-6 for r in ratios), (lams, rhos)
    assert opt.trace_counts == [1] * len(opt.plan.programs)


def scanned_problem():
    """Three dense+bias blocks scanned over one stacked leaf, then an output layer; and the same model unrolled
    with one leaf per block."""
    k = jax.random.split(jax.random.key(4), 4)
    params = {"blocks": {"w": jax.random.normal(k[0], (3, 4, 4)) * 0.7, "b": jax.random.normal(k[1], (3, 4))},
              "out": {"w": jax.random.normal(k[2], (4, 2))}}

    def model(p, x):
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w["w"] + w["b"]), None), x, p["blocks"])
        return h @ p["out"]["w"]

    def unrolled(p, x):
        for i in range(3):
            x = jnp.tanh(x @ p[f"s{i}"]["w"] + p[f"s{i}"]["b"])
        return x @ p["out"]["w"]

    flat = {f"s{i}": {"w": params["blocks"]["w"][i], "b": params["blocks"]["b"][i]} for i in range(3)}
    flat["out"] = params["out"]
    return params, flat, Objective(model_fn=model, loss_kind="ce"), Objective(model_fn=unrolled, loss_kind="ce"), k[3]


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("mode", ["exact", "pi"])
def test_stacked_layers_equal_the_unrolled_model(mode):
    """K-FAC with ``stacked=("['blocks']",)`` keeps per-slice factors, inverses and directions that equal those of
    the unrolled model (whose per-layer modules the tests above check against their definitions)."""
    params, flat, obj, unrolled_obj, key = scanned_problem()
    gamma = 0.05
    mods = {"stacked": (params, obj, ("['blocks']",)), "unrolled": (flat, unrolled_obj, ())}
    results = {}
    for name, (p, o, stacked) in mods.items():
        c = ctx(p)
        fac = KFACFactors(ema=0.9, stacked=stacked)
        inv = KFACInverse(stacked=stacked, pi_damping=gamma if mode == "pi" else None)
        direc = KFACDirection(damping=gamma, damping_mode=mode, stacked=stacked)
        fstate = fac.init(p, c)
        for s in range(2):
            xs = jax.random.normal(jax.random.fold_in(key, s), (6, 4))
            vals = PROVIDER_IMPLS["layer_io"](o, p, (xs, jnp.arange(6) % 2), None)
            out, fstate = fac.apply({"acts": vals[q.activations()], "cots": vals[q.out_cotangents()]}, fstate, c)
        bases, _, _ = inv.apply({"factors": out["factors"], "basis": inv.init_carried("basis", p, c)},
                                inv.init(p, c), c)
        g = jax.tree.map(lambda x: jnp.cos(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape)), params)
        if name == "unrolled":
            g = {f"s{i}": {"w": g["blocks"]["w"][i], "b": g["blocks"]["b"][i]} for i in range(3)} | {"out": g["out"]}
        d, _, info = direc.apply({"grad": g, "basis": bases["basis"], "acts": vals[q.activations()]},
                                 direc.init(p, c), c)
        assert int(info["kfac_fallback_leaves"]) == 0 and int(info["kfac_layers"]) == 2 + 2 * (name == "unrolled")
        results[name] = out["factors"], d["direction"]
    (sf, sd), (uf, ud) = results["stacked"], results["unrolled"]
    assert sf["['blocks']['w']"][0].shape == (3, 5, 5)
    for i in range(3):
        for j in (0, 1):
            np.testing.assert_allclose(sf["['blocks']['w']"][j][i], uf[f"['s{i}']['w']"][j], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(sd["blocks"]["w"][i], ud[f"s{i}"]["w"], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(sd["blocks"]["b"][i], ud[f"s{i}"]["b"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(sd["out"]["w"], ud["out"]["w"], rtol=1e-9, atol=1e-12)


def test_stacked_kfac_trains_and_names_bad_prefixes():
    params, _, obj, _, key = scanned_problem()
    opt = cp.Optimizer(kfac(learning_rate=0.2, damping=0.1, inverse_every=2, stacked=("['blocks']",)),
                       model_fn=obj.model_fn, loss="ce")
    state = opt.init(params)
    x = jax.random.normal(key, (32, 4))
    batch = (x, (x[:, 0] > 0).astype(jnp.int32))
    first = float(obj.loss(params, batch))
    for _ in range(10):
        params, state, info = opt.step(params, state, batch)
        assert int(info.kfac_layers) == 2 and int(info.kfac_fallback_leaves) == 0
    assert float(obj.loss(params, batch)) < 0.5 * first
    # given an example batch at init, discovery finds the stack itself: no prefixes, the same steps
    p0 = scanned_problem()[0]
    by_prefix = cp.Optimizer(kfac(learning_rate=0.2, damping=0.1, inverse_every=2, stacked=("['blocks']",)),
                             model_fn=obj.model_fn, loss="ce")
    by_use = cp.Optimizer(kfac(learning_rate=0.2, damping=0.1, inverse_every=2), model_fn=obj.model_fn, loss="ce")
    pa, sa, pb, sb = p0, by_prefix.init(p0), p0, by_use.init(p0, batch=batch)
    for _ in range(3):
        pa, sa, _ = by_prefix.step(pa, sa, batch)
        pb, sb, info = by_use.step(pb, sb, batch)
        assert int(info.kfac_layers) == 2 and int(info.kfac_fallback_leaves) == 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), pa, pb)
    with pytest.raises(cp.LoweringError, match="match no parameter leaf"):
        cp.Optimizer(kfac(stacked=("['nope']",)), model_fn=obj.model_fn, loss="ce").init(params)


@pytest.mark.usefixtures("x64")
def test_conv_factors_follow_kfc_from_explicit_patches():
    """KFC (Grosse & Martens 2016): A = mean over examples and locations of the im2col patch outer products
    (patches cut by hand here, rows ordered (in-channel, kh, kw) as the layer's matrix), Γ = (1/N) Σ_n Σ_t
    Ds_{n,t} Ds_{n,t}ᵀ with Ds_{n,t} = ∂ℓ_n/∂s_{n,t} from each example's own loss."""
    k = jax.random.split(jax.random.key(5), 4)
    params = {"conv": jax.random.normal(k[0], (3, 3, 2, 3)) * 0.5, "out": jax.random.normal(k[1], (27, 2)) * 0.3}
    dn = ("NHWC", "HWIO", "NHWC")

    def features(p, x):
        return jax.lax.conv_general_dilated(x, p["conv"], (1, 1), "VALID", dimension_numbers=dn)

    def model(p, x):
        return jax.nn.relu(features(p, x)).reshape(x.shape[0], -1) @ p["out"]

    x = jax.random.normal(k[2], (4, 5, 5, 2))
    y = jnp.array([0, 1, 1, 0])
    obj = Objective(model_fn=model, loss_kind="ce")
    vals = PROVIDER_IMPLS["layer_io"](obj, params, (x, y), None)
    c = ctx(params)
    out, _ = KFACFactors().apply({"acts": vals[q.activations()], "cots": vals[q.out_cotangents()]},
                                 KFACFactors().init(params, c), c)
    A, G = out["factors"]["['conv']"]
    xn = np.asarray(x)
    patches = [xn[n, i:i + 3, j:j + 3, :].transpose(2, 0, 1).ravel() for n in range(4) for i in range(3) for j in range(3)]
    A_ref = sum(np.outer(a, a) for a in patches) / len(patches)
    G_ref = np.zeros((3, 3))
    for n in range(4):
        def own_loss(s, n=n):
            logits = jax.nn.relu(s).reshape(-1) @ params["out"]
            return -jax.nn.log_softmax(logits)[y[n]]
        ds = np.asarray(jax.grad(own_loss)(features(params, x[n:n + 1])[0])).reshape(-1, 3)  # (locations, out)
        G_ref += ds.T @ ds / 4
    np.testing.assert_allclose(A, A_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(G, G_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.usefixtures("x64")
def test_per_head_weights_get_per_head_factors():
    """Per-head weights contracted against per-head inputs (``nhd,hde->nhe``) named in ``stacked``: head h's A is
    the mean of [x_h, 1][x_h, 1]ᵀ over the examples, from the inputs given here."""
    k = jax.random.split(jax.random.key(6), 3)
    params = {"heads": jax.random.normal(k[0], (3, 4, 2)), "out": jax.random.normal(k[1], (6, 2))}

    def model(p, x):
        xh = jnp.stack([x, jnp.tanh(x), x ** 2], axis=1)  # (n, heads, d)
        h = jnp.einsum("nhd,hde->nhe", xh, p["heads"])
        return jnp.tanh(h).reshape(x.shape[0], -1) @ p["out"]

    x = jax.random.normal(k[2], (8, 4))
    obj = Objective(model_fn=model, loss_kind="ce")
    vals = PROVIDER_IMPLS["layer_io"](obj, params, (x, jnp.arange(8) % 2), None)
    mod = KFACFactors(stacked=("['heads']",))
    c = ctx(params)
    out, _ = mod.apply({"acts": vals[q.activations()], "cots": vals[q.out_cotangents()]}, mod.init(params, c), c)
    A, G = out["factors"]["['heads']"]
    assert A.shape == (3, 4, 4) and G.shape == (3, 2, 2)  # no bias: the homogeneous slot is dropped
    for h, xh in enumerate((np.asarray(x), np.tanh(np.asarray(x)), np.asarray(x) ** 2)):
        np.testing.assert_allclose(A[h], xh.T @ xh / len(xh), rtol=1e-10, atol=1e-12)
    opt = cp.Optimizer(kfac(learning_rate=0.1, inverse_every=1, stacked=("['heads']",)), model_fn=model, loss="ce")
    state = opt.init(params)
    _, _, info = opt.step(params, state, (x, jnp.arange(8) % 2))
    assert int(info.kfac_layers) == 2 and int(info.kfac_fallback_leaves) == 0
