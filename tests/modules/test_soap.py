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
    assert opt.trace_counts == [1] * len(opt.plan.phases)


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
def test_soap_with_eigh_every_step_is_adam_in_the_exact_eigenbasis(x64, moments):
    """Reference (numpy): GG_L/GG_R EMAs, Q = eigh (descending), m = EMA of G in the parameter basis read as
    Q_Lᵀ m Q_R, v = EMA of (Q_Lᵀ G Q_R)² kept in place, N = Q_L (m̃/(√v+eps)) Q_Rᵀ · √(1−β2ᵗ)/(1−β1ᵗ).
    The bias vector gets plain Adam with the same folded bias correction."""
    shapes = {"w": (4, 4), "u": (3, 5), "b": (4,)}
    grads = random_grads(0, shapes, 5)
    beta, b1, b2, eps = 0.9, 0.8, 0.95, 1e-8
    updates, _ = run_optax(_soap_list("eigh", 1, moments, beta, b1, b2, eps),
                         {k: jnp.zeros(s) for k, s in shapes.items()}, grads)
    st = {k: dict(L=0.0, R=0.0, m=np.zeros(s), v=np.zeros(s)) for k, s in shapes.items()}
    for t, (g, u) in enumerate(zip(grads, updates), start=1):
        scale = np.sqrt(1 - b2**t) / (1 - b1**t)
        for k, G in g.items():
            s = st[k]
            s["m"] = b1 * s["m"] + (1 - b1) * G
            if G.ndim == 1:
                s["v"] = b2 * s["v"] + (1 - b2) * G**2
                want = scale * s["m"] / (np.sqrt(s["v"]) + eps)
            else:
                s["L"] = beta * s["L"] + (1 - beta) * G @ G.T
                s["R"] = beta * s["R"] + (1 - beta) * G.T @ G
                QL, QR = _eigh_desc(s["L"]), _eigh_desc(s["R"])
                Gt, mt = QL.T @ G @ QR, QL.T @ s["m"] @ QR
                s["v"] = b2 * s["v"] + (1 - b2) * Gt**2
                want = scale * QL @ (mt / (np.sqrt(s["v"]) + eps)) @ QR.T
            # atol: at step 1 the (3,5) leaf's R has a 2-dim null space where G̃ is rounding noise (~1e-16),
            # and noise/(√v + eps) with eps=1e-8 is ~1e-8 in either implementation
            np.testing.assert_allclose(u[k], -want, rtol=1e-6, atol=1e-7, err_msg=f"step {t} leaf {k}")


def test_soap_with_a_fixed_basis_is_optax_adam_in_that_basis(x64):
    """Refresh only at step 0: every later step is optax's Adam on Q_Lᵀ G Q_R, mapped back (Q from numpy)."""
    shapes = {"w": (4, 4), "b": (4,)}
    grads = random_grads(1, shapes, 6)
    # eps: at step 0, Q_Lᵀ G_0 Q_R is diagonal (an SVD) and its off-diagonal entries are rounding noise ~1e-16;
    # each side maps them to noise/(|noise| + eps) <= 1e-6 (the atol below). The two eps placements
    # (SOAP: eps/√(1−β2ᵗ) on the bias-corrected scale) differ by < 1e-9/|G̃| relative.
    b1, b2, eps = 0.9, 0.99, 1e-10
    updates, _ = run_optax(_soap_list("eigh", 100, "rotate", 0.9, b1, b2, eps),
                         {k: jnp.zeros(s) for k, s in shapes.items()}, grads)
    G0 = grads[0]["w"]
    QL, QR = _eigh_desc(G0 @ G0.T), _eigh_desc(G0.T @ G0)
    adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
    state = adam.init({"w": np.zeros((4, 4)), "b": np.zeros(4)})
    for g, u in zip(grads, updates):
        rotated = {"w": QL.T @ g["w"] @ QR, "b": g["b"]}
        d, state = adam.update(rotated, state)
        np.testing.assert_allclose(u["w"], -(QL @ np.asarray(d["w"]) @ QR.T), rtol=1e-6, atol=1e-5)
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
    params = {"w": jnp.zeros((3, 3))}
    gram = GradGram(every=1)
    soap_m = Soap(gram=gram.spec, b2=0.5)
    ctx = Context(jnp.zeros((), jnp.int32), None, params, None, None, "soap")
    v0 = jnp.arange(9.0).reshape(3, 3) + 1
    state = soap_m.init(params, ctx)._replace(v=((v0,),))  # one entry per leaf
    perm_l, perm_r = jnp.array([2, 0, 1]), jnp.array([1, 2, 0])
    basis = Eigbasis((((Eigen(jnp.eye(3), jnp.ones(3), perm_l), Eigen(jnp.eye(3), jnp.ones(3), perm_r)),),),
                     jnp.ones((), jnp.int32))
    g = jnp.asarray(np.random.default_rng(3).normal(size=(3, 3)))
    _, new = soap_m.apply(Inputs({"grad": {"w": g}, "basis": basis}, "soap"), state, ctx)
    want = 0.5 * np.asarray(v0)[np.ix_(np.asarray(perm_l), np.asarray(perm_r))] + 0.5 * np.asarray(g) ** 2
    np.testing.assert_allclose(new.v[0][0], want)
    # the same basis again (count unchanged): no second permutation
    _, newer = soap_m.apply(Inputs({"grad": {"w": g}, "basis": basis}, "soap"), new, ctx)
    np.testing.assert_allclose(newer.v[0][0], 0.5 * want + 0.5 * np.asarray(g) ** 2)


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
