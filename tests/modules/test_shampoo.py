"""Shampoo and the shared gradient-Gram modules, against numpy (eigh-based roots, explicit sums of G Gᵀ)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import never_loss, random_grads, run_optax, train_losses

import curvplan as cp
from curvplan.modules import UpdateTail
from curvplan.modules._base import Context, Inputs
from curvplan.modules.preconditioners._grad_gram import (
    Eigbasis,
    Eigen,
    GradGram,
    GramEigbasis,
    GramFactors,
    eigh_desc,
    gram_layout,
    layout_report,
)
from curvplan.modules.preconditioners._shampoo import Shampoo, inverse_root, shampoo


def np_root(a, p=4.0, eps=1e-6):
    """(A + eps·λmax I)^(-1/p) by numpy eigh (eigenvalues clipped at 0)."""
    w, v = np.linalg.eigh(0.5 * (a + a.T))
    w = np.maximum(w, 0)
    return (v * (w + eps * w.max()) ** (-1.0 / p)) @ v.T






def _shampoo_list(graft, block_size=None, max_dim=4096, every=1, start=0):
    gram = GradGram(beta=None, block_size=block_size, max_dim=max_dim, every=1)
    return [gram, GramEigbasis(gram=gram.spec, every=every, start=start),
            Shampoo(gram=gram.spec, graft=graft, epsilon=1e-6), UpdateTail(learning_rate=1.0, source="shampoo")]


def _ctx(params):
    return Context(jnp.zeros((), jnp.int32), None, params, None, None, "m")


def test_fallback_leaves_are_reported():
    params = {"big": jnp.zeros((8, 300)), "m": jnp.zeros((4, 3)), "v": jnp.zeros(5), "conv": jnp.zeros((3, 3, 2, 4))}
    spec = GradGram(max_dim=100, block_size=10).spec
    assert layout_report(params, spec) == {
        "['big']": "diagonal", "['conv']": "kron 2 blocks (10x4, 8x4)", "['m']": "kron 1 block (4x3)",
        "['v']": "diagonal"}
    tx = cp.as_optax(shampoo(max_dim=100, block_size=10, root_every=1), loss_fn=never_loss)
    state = tx.init(params)
    _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    assert int(state.info.shampoo_fallback_leaves) == 2


def test_w1_trains_with_shampoo():
    from benchmarks.workloads import get_workload

    w = get_workload("w1")
    opt = cp.Optimizer(shampoo(learning_rate=0.02, root_every=5, graft="adam"), **w.optimizer_kwargs())
    losses, _ = train_losses(opt, w, 15)
    assert np.all(np.isfinite(losses)) and np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])
    assert opt.trace_counts == [1] * len(opt.plan.programs)

@pytest.mark.parametrize("family", ["shampoo", "soap", "scao"])
def test_planned_equals_unplanned_and_plans_round_trip(x64, family):
    """The phase programs agree with the unplanned baseline (one program, cadences as lax.cond) for 7 steps.

    Square layers with a batch larger than their sides, so every Gram has full rank: with a degenerate (e.g.
    zero) eigenvalue the eigenvectors inside that eigenspace are arbitrary, and SOAP's elementwise Adam is not
    invariant to rotations inside it, so two differently rounded programs could legitimately differ. In
    float64: in float32 SOAP maps the rounding noise of G̃ (~1e-7·‖G‖) through m̃/(√ṽ + 1e-8) to O(1) entries."""
    from curvplan.modules.preconditioners._scao import scao_modules
    from curvplan.modules.preconditioners._soap import soap

    mods = {"shampoo": lambda: shampoo(root_every=2, start_preconditioning_step=3),
            "soap": lambda: soap(precondition_frequency=2),
            "scao": lambda: scao_modules(warmup_steps=2, precond_freq=2, blend_steps=2, min_precond_updates=1,
                                         k_min=2)}[family]()
    plan = cp.compile_plan(mods)
    assert str(cp.Plan.from_dict(plan.to_dict())) == str(plan)

    def model(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {"w1": jax.random.normal(k1, (6, 6)) / 3, "b1": jnp.zeros(6), "w2": jax.random.normal(k2, (6, 6)) / 3}
    x = jax.random.normal(k3, (32, 6))
    batch = (x, jnp.argmax(x, axis=1))
    a = cp.Optimizer(plan, model_fn=model, loss="ce")
    b = cp.Optimizer(cp.compile_plan(mods, optimize=False), model_fn=model, loss="ce")
    pa = pb = params
    sa, sb = a.init(params), b.init(params)
    for _ in range(7):
        pa, sa, _ = a.step(pa, sa, batch)
        pb, sb, _ = b.step(pb, sb, batch)
    for k in params:
        np.testing.assert_allclose(pa[k], pb[k], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("p", [4.0, 2.0])
def test_inverse_root_matches_numpy_eigh(x64, p):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 3))
    a = x @ x.T  # rank 3: three zero eigenvalues, so the relative floor matters
    e = Eigen(*eigh_desc(jnp.asarray(a)), jnp.arange(6))
    np.testing.assert_allclose(inverse_root(e, p, 1e-6), np_root(a, p, 1e-6), rtol=1e-7, atol=1e-7)


def test_epsilon_zero_float32_roots_of_rank_deficient_factors_succeed():
    """ε = 0 in float32, batches of one example: every factor of the first 3 steps is rank-deficient (rank t+1).
    The floor max(ε, u)·λ_max with u = float32's machine epsilon keeps each root finite; each update matches
    −L̃^(-1/4) G R̃^(-1/4) of the same rule computed by numpy in float64 from the same gradients."""
    u32 = float(np.finfo(np.float32).eps)
    gram = GradGram(beta=None, every=1)
    mods = [gram, GramEigbasis(gram=gram.spec, every=1, start=0), Shampoo(gram=gram.spec, graft="none", epsilon=0.0),
            UpdateTail(learning_rate=1.0, source="shampoo")]
    tx = cp.as_optax(mods, loss_fn=never_loss)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {"w1": jax.random.normal(k1, (8, 12)) / 3, "b1": jnp.zeros(12), "w2": jax.random.normal(k2, (12, 4)) / 3}
    xs, ys = jax.random.normal(k3, (3, 1, 8)), jnp.array([[0], [2], [1]])

    def loss(p, x, y):
        logits = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]
        return jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(logits, y[:, None], 1)[:, 0])

    state, update = tx.init(params), jax.jit(tx.update)
    L, R, errs = {}, {}, []
    for t in range(3):
        g = jax.grad(loss)(params, xs[t], ys[t])
        u, state = update(g, state, params)
        assert int(state.info.shampoo_root_failures) == 0
        for k in ("w1", "w2"):
            G = np.asarray(g[k], np.float64)
            L[k], R[k] = L.get(k, 0) + G @ G.T, R.get(k, 0) + G.T @ G
            assert np.linalg.matrix_rank(L[k]) == t + 1
            P = np_root(L[k], 4.0, u32) @ G @ np_root(R[k], 4.0, u32)
            errs.append(np.linalg.norm(np.asarray(u[k], np.float64) + P) / np.linalg.norm(P))
        params = jax.tree.map(lambda p, d: p + 0.1 * d, params, u)
    assert max(errs) < 1e-3, errs


@pytest.mark.parametrize("graft", ["none", "adagrad"])
def test_shampoo_direction_matches_dense_reference(x64, graft):
    """Roots refreshed every step: update = −L̃^(-1/4) G R̃^(-1/4) with L = Σ G Gᵀ, R = Σ Gᵀ G (numpy), grafted
    to the AdaGrad direction's norm; the bias (a vector) takes the graft direction (or g without grafting)."""
    shapes = {"w": (5, 3), "b": (3,)}
    grads = random_grads(1, shapes, 3)
    params = {k: jnp.zeros(s) for k, s in shapes.items()}
    updates, _ = run_optax(_shampoo_list(graft), params, grads)
    L, R = np.zeros((5, 5)), np.zeros((3, 3))
    acc = {k: np.zeros(s) for k, s in shapes.items()}
    for g, u in zip(grads, updates):
        G = g["w"]
        L, R = L + G @ G.T, R + G.T @ G
        P = np_root(L) @ G @ np_root(R)
        acc = {k: acc[k] + g[k] ** 2 for k in acc}
        D = {k: g[k] / (np.sqrt(acc[k]) + 1e-10) for k in acc}
        if graft == "adagrad":
            P = P * np.linalg.norm(D["w"]) / np.linalg.norm(P)
            want_b = D["b"]
        else:
            want_b = g["b"]
        np.testing.assert_allclose(u["w"], -P, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(u["b"], -want_b, rtol=1e-9)


def test_blocking_preconditions_each_block_with_its_own_factors(x64):
    shapes = {"w": (5, 3)}
    grads = random_grads(2, shapes, 2)
    assert gram_layout((5, 3), 2, 4096) == ((0, 2, 0, 2), (0, 2, 2, 3), (2, 4, 0, 2), (2, 4, 2, 3),
                                            (4, 5, 0, 2), (4, 5, 2, 3))
    updates, _ = run_optax(_shampoo_list("none", block_size=2), {"w": jnp.zeros((5, 3))}, grads)
    acc = {}
    for g, u in zip(grads, updates):
        want = np.zeros((5, 3))
        for r0, r1, c0, c1 in gram_layout((5, 3), 2, 4096):
            G = g["w"][r0:r1, c0:c1]
            L, R = acc.get((r0, c0), (0, 0))
            L, R = L + G @ G.T, R + G.T @ G
            acc[(r0, c0)] = (L, R)
            want[r0:r1, c0:c1] = np_root(L) @ G @ np_root(R)
        np.testing.assert_allclose(u["w"], -want, rtol=1e-6, atol=1e-9)


def test_roots_refresh_on_cadence_and_graft_only_before_start(x64):
    """Roots every 2 steps from step 3: steps 0-2 use the SGD graft (= g); steps 3, 4 use the roots of the
    factors at step 3; step 5 refreshes again."""
    shapes = {"w": (4, 3)}
    grads = random_grads(3, shapes, 6)
    mods = _shampoo_list("none", every=2, start=3)
    plan = cp.compile_plan(mods)
    assert plan.prefix == 3 and [plan.running(t) >= {"gram_eigbasis"} for t in range(7)] == [
        False, False, False, True, False, True, False]
    updates, state = run_optax(mods, {"w": jnp.zeros((4, 3))}, grads)
    L, R = np.zeros((4, 4)), np.zeros((3, 3))
    roots = None
    for t, (g, u) in enumerate(zip(grads, updates)):
        G = g["w"]
        L, R = L + G @ G.T, R + G.T @ G
        if t in (3, 5):
            roots = (np_root(L), np_root(R))
        want = G if roots is None else roots[0] @ G @ roots[1]
        np.testing.assert_allclose(u["w"], -want, rtol=1e-6, atol=1e-9)


def test_failed_refresh_keeps_previous_basis_and_root_and_counts(x64):
    params = {"w": jnp.zeros((3, 2))}
    gram = GradGram(beta=None, every=1)
    eig = GramEigbasis(gram=gram.spec)
    ctx = _ctx(params)
    g = {"w": jnp.asarray(np.random.default_rng(4).normal(size=(3, 2)))}
    _, gstate = gram.apply(Inputs({"grad": g}, "grad_gram"), gram.init(params, ctx), ctx)
    prev = eig.init_carried("basis", params, ctx)
    out, estate, _ = eig.apply(Inputs({"factors": gstate, "basis": prev}, "gram_eigbasis"), eig.init(params, ctx),
                               ctx)
    good: Eigbasis = out["basis"]
    assert int(good.count) == 1 and int(estate.failures) == 0
    # a non-finite factor: the basis of that block is kept, the failure counted
    bad_factors = GramFactors((((gstate.factors[0][0][0] * jnp.nan, gstate.factors[0][0][1]),),), gstate.count)
    out2, estate2, info = eig.apply(Inputs({"factors": bad_factors, "basis": good}, "gram_eigbasis"), estate, ctx)
    kept = out2["basis"]
    assert int(estate2.failures) == 1 and int(info["eig_failures"]) == 1
    np.testing.assert_array_equal(kept.bases[0][0][0].Q, good.bases[0][0][0].Q)
    # Shampoo: a basis whose root is not finite (negative exponent of a NaN) keeps the previous root
    sh = Shampoo(gram=gram.spec, graft="none")
    s0 = sh.init(params, ctx)
    _, s1, _ = sh.apply(Inputs({"grad": g, "basis": good}, "shampoo"), s0, ctx)
    nan_basis = jax.tree.map(lambda x: x * jnp.nan if x.dtype.kind == "f" else x, good)
    nan_basis = Eigbasis(nan_basis.bases, good.count + 1)
    _, s2, info = sh.apply(Inputs({"grad": g, "basis": nan_basis}, "shampoo"), s1, _ctx(params))
    assert int(s2.failures) == 1 and int(info["shampoo_root_failures"]) == 1
    np.testing.assert_array_equal(s2.roots[0][0][0], s1.roots[0][0][0])
