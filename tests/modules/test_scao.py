"""SCAO: rank selection against its definition, the preconditioned gradient against numpy, the warm-up against
optax's Adam, phases in the plan (each compiled once), and training on W1 / a W3 smoke run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import train_losses

import curvplan as cp
from curvplan import scao
from curvplan.modules._base import Context, Inputs
from curvplan.modules.preconditioners._grad_gram import GradGram, GramEigbasis
from curvplan.modules.preconditioners._scao import (
    ScaoAdam,
    ScaoBlend,
    ScaoPrecondition,
    ScaoSpectrum,
    rank_bounds,
    scao_modules,
    select_rank,
    spectral_rank,
)


def rank_by_definition(s, eps):
    """min r such that the r largest values hold >= (1 - eps) of the total (plain Python loop)."""
    s = sorted((float(x) for x in s), reverse=True)
    total = sum(s)
    acc = 0.0
    for r, x in enumerate(s, start=1):
        acc += x
        if acc >= (1 - eps) * total:
            return r
    return len(s)


SPECTRA = [
    [10.0, 5.0, 3.0, 1.0, 1.0, 0.5, 0.0, 0.0],
    [1.0] * 6 + [0.0] * 4,           # flat top-6: k = ceil((1-eps)·6)
    [100.0] + [1e-3] * 9,            # one dominant direction
    list(2.0 ** -np.arange(12)),     # geometric decay
    [3.0, 3.0, 3.0],                 # no gap: needs all
]


def _ctx(params, step=0):
    return Context(jnp.asarray(step, jnp.int32), None, params, None, None, "m")


def np_eigh_desc(a):
    w, v = np.linalg.eigh(0.5 * (a + a.T))
    return np.maximum(w[::-1], 0), v[:, ::-1]


def _tiny():
    def model(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {"w1": jax.random.normal(k1, (6, 10)) / 3, "b1": jnp.zeros(10), "w2": jax.random.normal(k2, (10, 3)) / 3}
    x = jax.random.normal(k3, (16, 6))
    return model, params, (x, (x[:, 0] > 0).astype(jnp.int32))


def test_rank_bounds():
    assert rank_bounds(64, 128, 8, 128) == (8, 32)   # min side 64 > 16: min(k_max, 64 // 2)
    assert rank_bounds(128, 10, 8, 128) == (8, 8)    # min side 10 <= 16: k_min
    assert rank_bounds(5, 3, 8, 128) == (3, 3)       # capped at the smaller side
    assert rank_bounds(300, 200, 8, 64) == (8, 64)


def test_blend_weight_is_linear_from_zero():
    blend = ScaoBlend(begin=10, steps=4)
    assert str(blend.cadence) == "@from(10)@until(14)"
    g, p = {"w": jnp.zeros(2)}, {"w": jnp.ones(2)}
    for t, b in [(10, 0.0), (11, 0.25), (13, 0.75)]:
        out, _ = blend.apply(Inputs({"grad": g, "preconditioned": p}, "scao_blend"), (), _ctx(g, t))
        np.testing.assert_allclose(out["direction"]["w"], b)


def test_phases_are_visible_and_each_compiles_once():
    mods = scao_modules(learning_rate=1e-2, warmup_steps=4, precond_freq=2, blend_steps=4, min_precond_updates=1,
                        k_min=2)
    plan = cp.compile_plan(mods, name="scao")
    assert [ph.header for ph in plan.phases] == [
        "@every(2)@until(3)", "@every(2,+1)@until(4)",                 # Adam warm-up (refresh / not)
        "@every(2)@from(4)@until(7)", "@every(2)@from(5)@until(8)",    # blend
        "@every(2)@from(8)", "@every(2)@from(9)"]                      # preconditioned
    blend = plan.phases[plan.phase_of(5)]
    assert [op.name for op in blend.ops if op.role == "module"] == [
        "scao_precondition", "scao_blend", "scao_adam", "update_tail"]
    model, params, batch = _tiny()
    opt = cp.Optimizer(plan, model_fn=model, loss="ce")
    state = opt.init(params)
    for t in range(12):
        params, state, info = opt.step(params, state, batch)
        assert int(info.phase) == plan.phase_of(t) and np.isfinite(float(info.loss))
    assert plan.programs == (tuple(range(6)),) and opt.trace_counts == [1]  # one program for six phases


def test_w1_trains_with_scao():
    from benchmarks.workloads import get_workload

    w = get_workload("w1")
    params = w.init(jax.random.key(0))
    # preconditioned from step 0 (all phases are exercised on the tiny model above); 2 phases to compile
    tx = scao(learning_rate=1e-2, weight_decay=0.0, warmup_steps=0, precond_freq=5, blend_steps=0,
              min_precond_updates=1)
    state = tx.init(params)

    @jax.jit
    def step(params, state, batch):
        loss, g = jax.value_and_grad(w.loss_fn)(params, batch)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state, loss

    batches = w.batches(0)
    losses = []
    for _ in range(20):
        params, state, loss = step(params, state, next(batches))
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])


def test_w3_smoke_scao_preconditioned_from_the_first_step():
    """W3 (char transformer): two steps with everything every step (one phase), finite and decreasing."""
    from benchmarks.workloads import get_workload

    w = get_workload("w3")
    mods = scao_modules(learning_rate=1e-3, warmup_steps=0, precond_freq=1, blend_steps=0, min_precond_updates=1)
    opt = cp.Optimizer(mods, **w.optimizer_kwargs())
    assert len(opt.plan.phases) == 1
    losses, info = train_losses(opt, w, 3, batch_size=8, same_batch=True)
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert float(info.scao_mean_rank) >= 8

@pytest.mark.parametrize("eps", [0.01, 0.05, 0.2, 0.5])
def test_spectral_rank_matches_the_definition_on_constructed_spectra(x64, eps):
    rng = np.random.default_rng(0)
    spectra = SPECTRA + [sorted(rng.exponential(size=n) ** 3, reverse=True) for n in (5, 16, 40)]
    for s in spectra:
        assert int(spectral_rank(jnp.asarray(s), eps)) == rank_by_definition(s, eps), (s, eps)


def test_select_rank_clamps_takes_the_smaller_side_and_bounds_the_change(x64):
    flat = lambda r, n=20: jnp.asarray([1.0] * r + [0.0] * (n - r))  # noqa: E731  rank r for eps < 1/r
    eps, lo, hi = 0.01, 2, 8
    assert int(select_rank(flat(6), flat(7), 5, eps, lo, hi)) == 6          # min of the sides
    assert int(select_rank(flat(12), flat(11), 6, eps, lo, hi)) == 8        # clamped to hi
    assert int(select_rank(flat(1), flat(1), 2, eps, lo, hi)) == 2          # clamped to lo
    assert int(select_rank(flat(8), flat(8), 2, eps, lo, hi)) == 6          # at most +4 per refresh
    assert int(select_rank(flat(2), flat(3), 7, eps, lo, hi)) == 6          # at most -1 per refresh
    assert int(select_rank(jnp.zeros(20), flat(8), 5, eps, lo, hi)) == 4    # no mass: lo, then -1


@pytest.mark.parametrize("clip", [None, 0.1])
def test_preconditioned_gradient_matches_dense_reference(x64, clip):
    """Factors from 3 gradients (EMA ρ=0.9 from 1e-4·I), bias-corrected, Tikhonov-regularized, eigh by numpy,
    rank by the definition (first refresh: from k_min, at most +4), then the §6.4 formula and clip (the bias
    takes the diagonal path and its clip)."""
    rho, eps_sparse, k_min, k_max = 0.9, 0.1, 2, 8
    shapes = {"w": (20, 12), "b": (12,)}
    rng = np.random.default_rng(1)
    # a decaying spectrum so that the rank is neither k_min nor k_max
    grads = [{"w": rng.normal(size=(20, 12)) * (0.6 ** np.arange(12)), "b": rng.normal(size=12)} for _ in range(4)]
    params = {k: jnp.zeros(s) for k, s in shapes.items()}
    ctx = _ctx(params)
    gram = GradGram(beta=rho, init_scale=1e-4)
    eig = GramEigbasis(gram=gram.spec)
    spec = ScaoSpectrum(gram=gram.spec, epsilon_sparse=eps_sparse, k_min=k_min, k_max=k_max)
    pre = ScaoPrecondition(gram=gram.spec, clip=clip)
    gstate = gram.init(params, ctx)
    for g in grads[:3]:
        _, gstate = gram.apply(Inputs({"grad": jax.tree.map(jnp.asarray, g)}, "grad_gram"), gstate, ctx)
    basis, _, _ = eig.apply(Inputs({"factors": gstate, "basis": eig.init_carried("basis", params, ctx)},
                                   "gram_eigbasis"), eig.init(params, ctx), ctx)
    basis = basis["basis"]
    sp, rank_state, _ = spec.apply(Inputs({"factors": gstate, "basis": basis}, "scao_spectrum"),
                                   spec.init(params, ctx), ctx)
    sp = sp["spectrum"]
    G = grads[3]
    out, _ = pre.apply(Inputs({"grad": jax.tree.map(jnp.asarray, G), "basis": basis, "spectrum": sp},
                              "scao_precondition"), (), ctx)
    got = out["direction"]

    # numpy reference
    L, R, d = 1e-4 * np.eye(20), 1e-4 * np.eye(12), np.zeros(12)
    for g in grads[:3]:
        L = rho * L + (1 - rho) * g["w"] @ g["w"].T
        R = rho * R + (1 - rho) * g["w"].T @ g["w"]
        d = rho * d + (1 - rho) * g["b"] ** 2
    bc = 1 - rho**3

    def side(F):
        Fb = F / bc
        lam, V = np_eigh_desc(Fb + max(1e-8, 1e-4 * np.trace(Fb) / len(Fb)) * np.eye(len(Fb)))
        return lam, V

    (sl, Vl), (sr, Vr) = side(L), side(R)
    lo, hi = rank_bounds(20, 12, k_min, k_max)
    r = min(min(max(rank_by_definition(sl, eps_sparse), lo), hi), min(max(rank_by_definition(sr, eps_sparse), lo), hi))
    r = min(max(r, lo - 1), lo + 4)
    assert int(rank_state.ranks[1][0]) == r and lo < r < hi  # per-leaf state in leaf order: ("b", "w")
    Ul, Ur, al, ar = Vl[:, :r], Vr[:, :r], sl[:r], sr[:r]
    P = Ul.T @ G["w"] @ Ur
    want = G["w"] + Ul @ ((np.outer(al**-0.25, ar**-0.25) - 1) * P) @ Ur.T
    nu = np.linalg.norm(np.outer(al**-0.5, ar**-0.5) * P)
    if clip is not None:
        assert nu > clip  # the clip is active in this case
        want = want * clip / nu
    np.testing.assert_allclose(got["w"], want, rtol=1e-6, atol=1e-9)
    want_b = G["b"] / ((d / bc) ** 0.25 + 1e-8)
    nu_b = np.sqrt(np.sum(G["b"] ** 2 / (np.sqrt(d) + 1e-8)))  # on the uncorrected d
    if clip is not None:
        assert nu_b > clip
        want_b = want_b * clip / nu_b
    np.testing.assert_allclose(got["b"], want_b, rtol=1e-9)


def test_warmup_and_first_blend_step_are_optax_adam(x64):
    """Until the blend weight leaves 0 (steps 0..warmup), SCAO is AdamW; here optax.adam with wd=0."""
    warm = 5
    tx = scao(learning_rate=0.1, weight_decay=0.0, warmup_steps=warm, precond_freq=2, blend_steps=3,
              min_precond_updates=1, k_min=1)
    ref = optax.adam(0.1, b1=0.9, b2=0.999, eps=1e-8)
    params = {"w": jnp.zeros((6, 4)), "b": jnp.zeros(4)}
    s, r = tx.init(params), ref.init(params)
    update = jax.jit(tx.update)
    rng = np.random.default_rng(2)
    for t in range(warm + 2):
        g = {"w": jnp.asarray(rng.normal(size=(6, 4))), "b": jnp.asarray(rng.normal(size=4))}
        u, s = update(g, s, params)
        v, r = ref.update(g, r, params)
        if t <= warm:
            for k in params:
                np.testing.assert_allclose(u[k], v[k], rtol=1e-9, atol=1e-12, err_msg=f"step {t}")
        else:
            assert not np.allclose(u["w"], v["w"], rtol=1e-6)


def _adam_step(mod, g, params, step=0, rng=None):
    ctx = Context(jnp.asarray(step, jnp.int32), rng, params, None, None, "scao_adam")
    inputs = Inputs({"grad": g, "preconditioned": g, "rng": rng}, "scao_adam")
    out, state = mod.apply(inputs, mod.init(params, ctx), ctx)
    return out["direction"], state


def test_opt_in_gradient_mask_keeps_entries_above_the_quantile():
    rng = np.random.default_rng(5)
    g = {"w": jnp.asarray(rng.normal(size=(7, 9)), jnp.float32)}
    mod = ScaoAdam(grad_mask=0.7, precondition_from=10, blend_until=10)
    _, state = _adam_step(mod, g, g)
    e = 0.01 * np.abs(np.asarray(g["w"]))               # EMA_0.99(|g|) after one step
    keep = e >= np.quantile(e, 0.7)
    np.testing.assert_allclose(state.m["w"], 0.1 * np.where(keep, g["w"], 0), rtol=1e-6)
    assert keep.sum() == 19  # linear-interpolated 0.7-quantile of 63 values sits at position 43.4: 19 above it


def test_opt_in_gradient_noise_has_the_scheduled_scale():
    """m after one step is 0.1·(g + noise); the sample std of n=20000 normals has SE σ/√(2n): allow 5 SE."""
    n, sigma, t = 20000, 0.5, 10
    g = {"w": jnp.zeros(n)}
    mod = ScaoAdam(grad_noise=sigma, precondition_from=100, blend_until=100)
    _, state = _adam_step(mod, g, g, step=t, rng=jax.random.key(3))
    noise = np.asarray(state.m["w"]) / 0.1
    want = sigma * 0.998**t
    assert abs(noise.std() - want) < 5 * want / np.sqrt(2 * n) and abs(noise.mean()) < 5 * want / np.sqrt(n)


def test_opt_in_lars_trust_ratio():
    rng = np.random.default_rng(6)
    params = {"w": jnp.asarray(rng.normal(size=(4, 5))), "b": jnp.zeros(5)}
    g = {"w": jnp.asarray(rng.normal(size=(4, 5))), "b": jnp.asarray(rng.normal(size=5))}
    mod = ScaoAdam(lars=0.01, lars_weight_decay=0.1, precondition_from=10, blend_until=10)
    out, _ = _adam_step(mod, g, params)
    u = {k: np.asarray(g[k]) / (np.abs(np.asarray(g[k])) + 1e-8) for k in g}   # Adam's first step
    pn = np.linalg.norm(params["w"])
    trust = 0.01 * pn / (np.linalg.norm(u["w"]) + 0.1 * pn + 1e-8)
    np.testing.assert_allclose(out["w"], trust * u["w"], rtol=1e-5)
    np.testing.assert_allclose(out["b"], u["b"], rtol=1e-5)       # ‖p‖ = 0: unscaled


def np_scao_leaf_updates(grads, lr, warmup, freq, blend, min_updates, tau, rho=0.999, b1=0.9, b2=0.999,
                         eps=1e-8):
    """Updates of one diagonal-path leaf (weight decay 0) from its gradients g_0, g_1, ..., in float64.

    Diagonal statistic d ← ρd + (1−ρ)g² on steps 0, freq, 2·freq, ... (c updates so far, bc = 1 − ρ^c);
    from t₀ = max(warmup, freq·(min_updates − 1)): G_pre = g / ((d/bc)^¼ + 1e-8), natural-gradient norm
    ν = (Σ g² / (d^½ + 1e-8))^½ on the raw d, G_pre ← (τ/ν)·G_pre if ν > τ; g_eff = b·G_pre + (1 − b)·g with
    b = (t − t₀)/blend for t < t₀ + blend, G_pre after; Adam (global-step bias correction) on g_eff.
    Returns the updates and ν per step (None before t₀)."""
    t0 = max(warmup, freq * (min_updates - 1))
    d = m = v = np.zeros_like(grads[0])
    c, ups, nus = 0, [], []
    for t, g in enumerate(grads):
        if t % freq == 0:
            d, c = rho * d + (1 - rho) * g**2, c + 1
        nu = None
        if t < t0:
            geff = g
        else:
            pre = g / ((d / (1 - rho**c)) ** 0.25 + 1e-8)
            nu = np.sqrt(np.sum(g**2 / (np.sqrt(d) + 1e-8)))
            if nu > tau:
                pre = pre * tau / nu
            b = (t - t0) / blend if t < t0 + blend else 1.0
            geff = b * pre + (1 - b) * g
        m, v = b1 * m + (1 - b1) * geff, b2 * v + (1 - b2) * geff**2
        mhat, vhat = m / (1 - b1 ** (t + 1)), v / (1 - b2 ** (t + 1))
        ups.append(-lr * mhat / (np.sqrt(vhat) + eps))
        nus.append(nu)
    return ups, nus


def test_bias_updates_are_clipped_by_the_diagonal_natural_gradient_norm(x64):
    """A bias (diagonal path) trained into the preconditioned phase with a binding τ: its updates match the
    float64 re-derivation above at every step, the clip included."""
    lr, warmup, freq, blend, min_updates, tau = 0.05, 4, 2, 3, 2, 0.05
    model, params, (x, y) = _tiny()
    tx = scao(learning_rate=lr, weight_decay=0.0, warmup_steps=warmup, precond_freq=freq, blend_steps=blend,
              min_precond_updates=min_updates, k_min=2, clip=tau)
    state = tx.init(params)
    update = jax.jit(tx.update)

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(model(p, x), y).mean()

    grads, got = [], []
    for _ in range(12):
        g = jax.grad(loss)(params)
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
        grads.append(np.asarray(g["b1"], np.float64))
        got.append(np.asarray(u["b1"]))
    want, nus = np_scao_leaf_updates(grads, lr, warmup, freq, blend, min_updates, tau)
    t0 = max(warmup, freq * (min_updates - 1))
    assert all(nu > tau for nu in nus[t0:])  # the clip binds on every preconditioned step
    rel = [np.linalg.norm(a - b) / np.linalg.norm(b) for a, b in zip(got, want)]
    assert max(rel) < 1e-7, f"relative error of the bias update per step: {np.round(rel, 3)}"  # blend b is fp32
