"""SOAP against a numpy reference (Adam in the exact eigenbasis), optax's Adam in a fixed basis, and the plan
that shares one Gram and one eigendecomposition between Shampoo and SOAP."""

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import random_grads, run_optax, train_losses

import curvplan as cp
from curvplan.ir import fresh
from curvplan.ir import quantities as q
from curvplan.modules import Module, UpdateTail
from curvplan.modules._base import Context, Inputs
from curvplan.modules.preconditioners._grad_gram import Eigbasis, Eigen, GradGram, GramEigbasis, power_qr
from curvplan.modules.preconditioners._shampoo import Shampoo
from curvplan.modules.preconditioners._soap import Soap, soap
from curvplan.testing import assert_plan_text


def _soap_list(method, every, moments, beta=0.9, b1=0.8, b2=0.95, eps=1e-8):
    gram = GradGram(beta=beta, every=1)
    return [gram, GramEigbasis(gram=gram.spec, method=method, every=every),
            Soap(gram=gram.spec, method=method, b1=b1, b2=b2, eps=eps, moments=moments),
            UpdateTail(learning_rate=1.0, source="soap")]


def _eigh_desc(a):
    w, v = np.linalg.eigh(a)
    return v[:, ::-1]


def _reference_soap(grads, refresh, every, beta, b1, b2, eps):
    """§6.3's step order in numpy float64, the directions per step (weight decay 0). The first call only builds
    the factors (1 − beta)·G Gᵀ, (1 − beta)·Gᵀ G and their eigh basis. Step t >= 1: Adam on G̃ = Q_Lᵀ G Q_R
    with m̃, ṽ kept in the basis; then the factors are EMA'd with G and, when t % every == 0, the basis is
    refreshed (``"eigh"``, or ``"power_qr"``: sort the columns by diag(Qᵀ GG Q), descending, permute ṽ
    alike, one power step + QR) and m̃ rotated into it. Vectors get plain Adam, also from step 1."""
    st, out = {}, []
    for t, g in enumerate(grads):
        d = {}
        for k, G in g.items():
            if t == 0:
                st[k] = s = dict(m=np.zeros_like(G), v=np.zeros_like(G))
                if G.ndim == 2:
                    s["L"], s["R"] = (1 - beta) * G @ G.T, (1 - beta) * G.T @ G
                    s["QL"], s["QR"] = _eigh_desc(s["L"]), _eigh_desc(s["R"])
                d[k] = np.zeros_like(G)
                continue
            s, scale = st[k], np.sqrt(1 - b2**t) / (1 - b1**t)
            if G.ndim == 1:
                s["m"] = b1 * s["m"] + (1 - b1) * G
                s["v"] = b2 * s["v"] + (1 - b2) * G**2
                d[k] = scale * s["m"] / (np.sqrt(s["v"]) + eps)
                continue
            QL, QR = s["QL"], s["QR"]
            Gt = QL.T @ G @ QR
            s["m"] = b1 * s["m"] + (1 - b1) * Gt
            s["v"] = b2 * s["v"] + (1 - b2) * Gt**2
            d[k] = scale * QL @ (s["m"] / (np.sqrt(s["v"]) + eps)) @ QR.T
            m = QL @ s["m"] @ QR.T  # back to the parameter basis
            s["L"] = beta * s["L"] + (1 - beta) * G @ G.T
            s["R"] = beta * s["R"] + (1 - beta) * G.T @ G
            if t % every == 0:
                if refresh == "eigh":
                    s["QL"], s["QR"] = _eigh_desc(s["L"]), _eigh_desc(s["R"])
                else:
                    for side, axis in (("L", 0), ("R", 1)):
                        Q, GG = s["Q" + side], s[side]
                        order = np.argsort(-np.einsum("ij,ij->j", Q, GG @ Q))
                        s["v"] = np.take(s["v"], order, axis=axis)
                        s["Q" + side] = np.linalg.qr(GG @ Q[:, order])[0]
            s["m"] = s["QL"].T @ m @ s["QR"]
        out.append(d)
    return out


def _rel(a, b) -> float:
    """‖a − b‖ / ‖b‖ (0 when both are 0)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = np.linalg.norm(a - b)
    return 0.0 if err == 0 else float(err / np.linalg.norm(b))


class _Mix(Module):
    """Test-only: the mean of the Shampoo and SOAP directions."""

    kind: Literal["test_mix_directions"] = "test_mix_directions"

    def consumes(self):
        return {"shampoo": fresh(q.direction("shampoo")), "soap": fresh(q.direction("soap"))}

    def produces(self):
        return {"direction": q.direction("mix")}

    def apply(self, inputs, state, ctx):
        return {"direction": jax.tree.map(lambda x, y: 0.5 * (x + y), inputs.shampoo, inputs.soap)}, state


def _shared():
    gram = GradGram(beta=0.95, every=1)
    return [gram, GramEigbasis(gram=gram.spec, method="eigh", every=5),
            Shampoo(gram=gram.spec, graft="adam"), Soap(gram=gram.spec, method="eigh"), _Mix(),
            UpdateTail(learning_rate=1e-2, source="mix")]


def test_shampoo_and_soap_share_one_gram_and_one_eigendecomposition():
    plan = cp.compile_plan(_shared(), name="shampoo_soap")
    for ph in plan.phases:
        grams = [op for op in ph.ops if any(x.kind == "kron" for x in op.outputs)]
        eigs = [op for op in ph.ops if any(x.kind == "eigbasis" for x in op.outputs)]
        assert len(grams) == 1
        assert len(eigs) == (1 if plan.phase_of(0) == ph.index else 0)
    assert_plan_text(plan, """
        plan shampoo_soap: 2 phases, period 5
        phase 0 @every(5) [value_and_grad]
          %grad, %loss        = value_and_grad(params, batch)
          %kron.grad_gram     = grad_gram(%grad)
          %eigbasis.grad_gram = gram_eigbasis(%kron.grad_gram, carried %eigbasis.grad_gram) -> carried
          %direction.shampoo  = shampoo(%grad, %eigbasis.grad_gram; graft=adam)
          %direction.soap     = soap(%grad, %eigbasis.grad_gram; method=eigh)
          %direction.mix      = test_mix_directions(%direction.shampoo, %direction.soap)
          %update             = update_tail(%direction.mix, params; learning_rate=0.01, source=mix)
        phase 1 otherwise [value_and_grad]
          %grad, %loss       = value_and_grad(params, batch)
          %kron.grad_gram    = grad_gram(%grad)
          %direction.shampoo = shampoo(%grad, carried %eigbasis.grad_gram; graft=adam)
          %direction.soap    = soap(%grad, carried %eigbasis.grad_gram; method=eigh)
          %direction.mix     = test_mix_directions(%direction.shampoo, %direction.soap)
          %update            = update_tail(%direction.mix, params; learning_rate=0.01, source=mix)
        state: step, grad_gram.factors, grad_gram.count, gram_eigbasis.failures, shampoo.roots, shampoo.seen, shampoo.failures, shampoo.graft, shampoo.count, soap.m, soap.v, soap.used, soap.seen, soap.count, update_tail.opt_state, slot %eigbasis.grad_gram
        programs: 1 for 2 phases (0 1): one per provider pass, the rest under cond
    """)
    # against SOAP alone, adding Shampoo (and the mix) adds no Gram and no eigendecomposition
    alone = [m for m in _shared() if not isinstance(m, (Shampoo, _Mix, UpdateTail))]
    diff = cp.diff_plans(cp.compile_plan(alone + [UpdateTail(learning_rate=1e-2, source="soap")]),
                         cp.compile_plan(_shared()))
    assert sorted(name for name, _ in diff.added_quantities) == ["%direction.mix", "%direction.shampoo"]
    assert [a.split(":")[0] for a in diff.added] == ["shampoo", "test_mix_directions"]
    assert not diff.removed_quantities and not diff.cadences


def test_shared_plan_runs():
    shapes = {"w": (4, 3), "b": (3,)}
    updates, _ = run_optax(_shared(), {k: jnp.zeros(s) for k, s in shapes.items()}, random_grads(5, shapes, 6))
    assert all(bool(jnp.all(jnp.isfinite(u[k]))) for u in updates for k in shapes)


def test_w1_trains_with_soap():
    from benchmarks.workloads import get_workload

    w = get_workload("w1")
    opt = cp.Optimizer(soap(learning_rate=1e-2, precondition_frequency=5), **w.optimizer_kwargs())
    losses, _ = train_losses(opt, w, 15)
    assert np.all(np.isfinite(losses)) and np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])
    assert opt.trace_counts == [1] * len(opt.plan.programs)


def test_w3_smoke_shampoo_and_soap_sharing_one_gram():
    """W3 (char transformer): the shared Shampoo + SOAP plan, three steps on one batch, loss decreasing."""
    from benchmarks.workloads import get_workload

    w = get_workload("w3")
    gram = GradGram(beta=0.95, every=1)
    mods = [gram, GramEigbasis(gram=gram.spec, method="eigh", every=2),
            Shampoo(gram=gram.spec, graft="adam"), Soap(gram=gram.spec, method="eigh"), _Mix(),
            UpdateTail(learning_rate=3e-3, source="mix")]
    opt = cp.Optimizer(mods, **w.optimizer_kwargs())
    losses, info = train_losses(opt, w, 3, batch_size=8, same_batch=True)
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert int(info.shampoo_fallback_leaves) == 14 and int(info.eig_failures) == 0

@pytest.mark.parametrize("moments", ["rotate", "keep"])
def test_soap_with_eigh_every_step_is_adam_in_the_previous_steps_eigenbasis(x64, moments):
    """Against `_reference_soap` with an eigh refresh every step: step 0 makes no update, step t works in the
    eigenbasis of the factors of steps 0..t−1. Square leaves: a rectangular leaf's larger Gram has a null space
    after one gradient, where the basis (hence SOAP's direction) is arbitrary and two eigh codes may differ."""
    shapes = {"w": (4, 4), "u": (5, 5), "b": (4,)}
    grads = random_grads(0, shapes, 5)
    beta, b1, b2, eps = 0.9, 0.8, 0.95, 1e-8
    updates, _ = run_optax(_soap_list("eigh", 1, moments, beta, b1, b2, eps),
                           {k: jnp.zeros(s) for k, s in shapes.items()}, grads)
    want = _reference_soap(grads, "eigh", 1, beta, b1, b2, eps)
    for t, (w, u) in enumerate(zip(want, updates)):
        for k in shapes:
            np.testing.assert_allclose(u[k], -w[k], rtol=1e-7, atol=1e-12, err_msg=f"step {t} leaf {k}")


def test_soap_with_a_fixed_basis_is_optax_adam_in_that_basis(x64):
    """Refresh only at step 0, which makes no update: steps 1.. are optax's Adam on Q_Lᵀ G Q_R, mapped back,
    with Q the eigenbasis of G_0's Grams (from numpy)."""
    shapes = {"w": (4, 4), "b": (4,)}
    grads = random_grads(1, shapes, 6)
    # eps: the two placements (SOAP: eps/√(1−β2ᵗ) on the bias-corrected scale) differ by < 1e-9/|G̃| relative
    b1, b2, eps = 0.9, 0.99, 1e-10
    updates, _ = run_optax(_soap_list("eigh", 100, "rotate", 0.9, b1, b2, eps),
                         {k: jnp.zeros(s) for k, s in shapes.items()}, grads)
    for k in shapes:
        np.testing.assert_array_equal(updates[0][k], 0.0)
    G0 = grads[0]["w"]
    QL, QR = _eigh_desc(G0 @ G0.T), _eigh_desc(G0.T @ G0)
    adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
    state = adam.init({"w": np.zeros((4, 4)), "b": np.zeros(4)})
    for g, u in zip(grads[1:], updates[1:]):
        rotated = {"w": QL.T @ g["w"] @ QR, "b": g["b"]}
        d, state = adam.update(rotated, state)
        np.testing.assert_allclose(u["w"], -(QL @ np.asarray(d["w"]) @ QR.T), rtol=1e-7, atol=1e-12)
        np.testing.assert_allclose(u["b"], -np.asarray(d["b"]), rtol=1e-7)


def test_power_qr_sorts_columns_and_recovers_an_exact_basis(x64):
    rng = np.random.default_rng(2)
    V, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    lam = np.array([9.0, 5.0, 3.0, 2.0, 1.0])
    A = (V * lam) @ V.T
    shuffle = np.array([3, 0, 4, 1, 2])
    prev = Eigen(jnp.asarray(V[:, shuffle]), jnp.zeros(5), jnp.arange(5))
    out = power_qr(jnp.asarray(A), prev)
    np.testing.assert_array_equal(out.perm, np.argsort(-lam[shuffle]))
    np.testing.assert_allclose(out.lam, lam, rtol=1e-10)
    np.testing.assert_allclose(np.abs(np.asarray(out.Q).T @ V), np.eye(5), atol=1e-10)
    # from the identity, repeated refreshes converge to numpy's eigenvectors (subspace iteration)
    e = Eigen(jnp.eye(5), jnp.zeros(5), jnp.arange(5))
    for _ in range(100):
        e = power_qr(jnp.asarray(A), e)
    np.testing.assert_allclose(np.abs(np.asarray(e.Q).T @ V), np.eye(5), atol=1e-6)


def test_second_moment_follows_the_basis_permutation(x64):
    """A new basis is adopted after the step: ṽ is first EMA'd in the old basis (identity), then permuted."""
    params = {"w": jnp.zeros((3, 3))}
    gram = GradGram(every=1)
    soap_m = Soap(gram=gram.spec, b2=0.5)
    ctx = Context(jnp.zeros((), jnp.int32), None, params, None, None, "soap")
    v0 = jnp.arange(9.0).reshape(3, 3) + 1
    state = soap_m.init(params, ctx)._replace(v=((v0,),), count=jnp.ones((), jnp.int32))  # past the first call
    perm_l, perm_r = jnp.array([2, 0, 1]), jnp.array([1, 2, 0])
    basis = Eigbasis((((Eigen(jnp.eye(3), jnp.ones(3), perm_l), Eigen(jnp.eye(3), jnp.ones(3), perm_r)),),),
                     jnp.ones((), jnp.int32))
    g = np.random.default_rng(3).normal(size=(3, 3))
    _, new = soap_m.apply(Inputs({"grad": {"w": jnp.asarray(g)}, "basis": basis}, "soap"), state, ctx)
    want = (0.5 * np.asarray(v0) + 0.5 * g**2)[np.ix_(np.asarray(perm_l), np.asarray(perm_r))]
    np.testing.assert_allclose(new.v[0][0], want)
    # the same basis again (count unchanged): no second permutation
    _, newer = soap_m.apply(Inputs({"grad": {"w": jnp.asarray(g)}, "basis": basis}, "soap"), new, ctx)
    np.testing.assert_allclose(newer.v[0][0], 0.5 * want + 0.5 * g**2)
    # the first call adopts its basis (ṽ permuted) without an update
    fresh_state = soap_m.init(params, ctx)._replace(v=((v0,),))
    out, first = soap_m.apply(Inputs({"grad": {"w": jnp.asarray(g)}, "basis": basis}, "soap"), fresh_state, ctx)
    np.testing.assert_allclose(first.v[0][0], np.asarray(v0)[np.ix_(np.asarray(perm_l), np.asarray(perm_r))])
    np.testing.assert_array_equal(out["direction"]["w"], 0.0)


def test_rotate_and_keep_variants_agree_with_power_qr_refreshes(x64):
    """With full orthogonal bases, rotating m̃ into each new basis equals keeping m in the parameter basis."""
    shapes = {"w": (4, 3), "u": (2, 5)}
    grads = random_grads(4, shapes, 7)
    params = {k: jnp.zeros(s) for k, s in shapes.items()}
    a, _ = run_optax(_soap_list("power_qr", 2, "rotate"), params, grads)
    b, _ = run_optax(_soap_list("power_qr", 2, "keep"), params, grads)
    for ua, ub in zip(a, b):
        for k in shapes:
            # atol: the (4,3) leaf's L always has a null direction where G̃ is rounding noise (see above)
            np.testing.assert_allclose(ua[k], ub[k], rtol=1e-8, atol=1e-7)


@pytest.mark.parametrize("moments", ["rotate", "keep"])
def test_power_qr_refreshes_follow_the_reference_order_in_float64_and_float32(x64, moments):
    """Power-QR refreshes every 2 steps: float64 equals `_reference_soap`, and float32 fed the same gradients
    stays within 1e-3 (relative) of float64 at every step. Before the first call only built the basis, step 0
    used the basis of its own gradient, where G̃ is diagonal up to rounding and float32 rounding (~1e-7·‖G‖)
    came out of m̃ / (√ṽ + eps) as entries of size one. Square leaves: see the eigh test above."""
    shapes = {"w": (6, 6), "u": (5, 5), "b": (5,)}
    grads = random_grads(5, shapes, 7)
    mods = _soap_list("power_qr", 2, moments, beta=0.9, b1=0.8, b2=0.95, eps=1e-8)
    u64, _ = run_optax(mods, {k: jnp.zeros(s) for k, s in shapes.items()}, grads)
    g32 = [{k: v.astype(np.float32) for k, v in g.items()} for g in grads]
    u32, _ = run_optax(mods, {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}, g32)
    want = _reference_soap(grads, "power_qr", 2, 0.9, 0.8, 0.95, 1e-8)
    for t, (w, a, b) in enumerate(zip(want, u64, u32)):
        for k in shapes:
            assert b[k].dtype == jnp.float32
            np.testing.assert_allclose(a[k], -w[k], rtol=1e-7, atol=1e-12, err_msg=f"step {t} leaf {k}")
            assert _rel(b[k], a[k]) < 1e-3, (t, k, _rel(b[k], a[k]))


def test_first_step_on_a_digits_mlp_in_float32_matches_float64(x64):
    """The digits MLP 64-32-10, the preset's defaults: the first update is only the tail's weight decay
    −lr·wd·θ (SOAP's first call makes no step), in float32 as in float64. Before, float32 made the (64, 32)
    weight's first update ~5x its float64 value (rounding noise of G̃ amplified by eps = 1e-8).

    Later steps are not compared here: after one gradient the (64, 32) weight's 64×64 Gram has a 32-dim null
    space, where the basis, and so SOAP's direction, is arbitrary (two float64 bases differ there as much)."""
    from curvplan.examples.digits import init_mlp, load_digits

    (x, y), _ = load_digits()
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), init_mlp(jax.random.key(0), (64, 32, 10)))

    def loss(p, xb, yb):
        h = jnp.tanh(xb @ p["layer_0"]["w"] + p["layer_0"]["b"])
        logits = h @ p["layer_1"]["w"] + p["layer_1"]["b"]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], axis=1))

    grad = jax.jit(jax.grad(loss))
    xs, ys = jnp.asarray(x, jnp.float64), jnp.asarray(y)
    grads = [jax.tree.map(np.asarray, grad(params, xs[256 * i:256 * (i + 1)], ys[256 * i:256 * (i + 1)]))
             for i in range(3)]
    lr, wd = 3e-3, 0.01
    u64, _ = run_optax(soap(lr, weight_decay=wd), jax.tree.map(jnp.asarray, params), grads)
    u32, _ = run_optax(soap(lr, weight_decay=wd), jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params),
                       [jax.tree.map(lambda a: a.astype(np.float32), g) for g in grads])
    names = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    rel = {n: _rel(b, a) for n, a, b in zip(names, jax.tree.leaves(u64[0]), jax.tree.leaves(u32[0]))}
    assert max(rel.values()) < 1e-3, rel
    for n, a, p in zip(names, jax.tree.leaves(u64[0]), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, -lr * wd * p, rtol=1e-12, err_msg=n)
