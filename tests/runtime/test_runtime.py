"""Runtime: compile once per phase, planned == unplanned, optax wrapper, checkpoints, non-finite guard."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import never_loss

import curvplan as cp
from curvplan.ir import quantities as q
from curvplan.lowering import ce_loss


def _mlp(params, x):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return h @ params["w2"] + params["b2"]


def _problem(seed=0, n=32, d=6, h=8, c=3):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k1, (n, d))
    y = jax.random.randint(k2, (n,), 0, c)
    ka, kb = jax.random.split(k3)
    params = {"w1": jax.random.normal(ka, (d, h)) / np.sqrt(d), "b1": jnp.zeros(h),
              "w2": jax.random.normal(kb, (h, c)) / np.sqrt(h), "b2": jnp.zeros(c)}
    return params, (x, y)


def _loss(params, batch):
    return ce_loss(_mlp(params, batch[0]), batch[1])


def _cadenced_modules(every=3):
    """Hutchinson refresh every `every` steps + CG on the GGN every step: two phases."""
    return [
        cp.modules.GGN(loss="ce"),
        cp.modules.Hessian(name="hessian", tag="h"),
        cp.modules.HutchinsonDiag(take=(("curv_op", "h"),)),
        cp.modules.DiagEMA(every=every),
        cp.modules.ConstantDamping(lam=0.5),
        cp.modules.CG(maxiter=5, precondition=True),
        cp.modules.UpdateTail(learning_rate=0.5, momentum=0.9),
    ]


def test_compiles_once_per_phase_and_matches_unplanned_over_20_steps():
    params, batch = _problem()
    mods = _cadenced_modules(every=3)
    planned = cp.compile_plan(mods)
    unplanned = cp.compile_plan(mods, optimize=False)
    assert len(planned.phases) == 2 and len(unplanned.phases) == 1
    a = cp.Optimizer(planned, model_fn=_mlp, loss="ce")
    b = cp.Optimizer(unplanned, model_fn=_mlp, loss="ce")
    pa = pb = params
    sa, sb = a.init(params), b.init(params)
    key = jax.random.key(7)
    for _ in range(20):
        pa, sa, ia = a.step(pa, sa, batch, key)
        pb, sb, ib = b.step(pb, sb, batch, key)
        np.testing.assert_allclose(float(ia.loss), float(ib.loss), rtol=1e-5)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    assert a.trace_counts == [1] * len(planned.programs)
    assert b.trace_counts == [1]
    # a real change happened: the loss went down
    assert float(_loss(pa, batch)) < float(_loss(params, batch))


def test_scan_driver_matches_host_dispatch():
    params, batch = _problem(1)
    opt = cp.Optimizer(cp.compile_plan(_cadenced_modules(every=2)), model_fn=_mlp, loss="ce")
    key = jax.random.key(3)
    p, s = params, opt.init(params)
    for _ in range(5):
        p, s, _ = opt.step(p, s, batch, key)
    stacked = jax.tree.map(lambda a: jnp.stack([a] * 5), batch)
    p2, s2, infos = opt.run(params, opt.init(params), stacked, key)
    for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(p2)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert infos.loss.shape == (5,)
    assert list(np.asarray(infos.phase)) == [opt.plan.phase_of(t) for t in range(5)]
    assert int(s2.step) == 5


def test_as_optax_inside_user_jit_and_chain():
    params, batch = _problem(2)
    tx = optax.chain(optax.clip_by_global_norm(100.0),
                     cp.as_optax(cp.presets.gauss_newton_cg(loss="ce", lam=1.0, maxiter=5), model_fn=_mlp, loss="ce"))
    state = tx.init(params)

    @jax.jit
    def step(params, state, batch):
        g = jax.grad(_loss)(params, batch)
        updates, state = tx.update(g, state, params, batch=batch, unknown_extra=1)
        return optax.apply_updates(params, updates), state

    opt = cp.Optimizer(cp.presets.gauss_newton_cg(loss="ce", lam=1.0, maxiter=5), model_fn=_mlp, loss="ce")
    p, ref, ref_state = params, params, opt.init(params)
    for _ in range(5):
        p, state = step(p, state, batch)
        ref, ref_state, _ = opt.step(ref, ref_state, batch)
    for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(ref)):  # same numbers as the Optimizer path
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    assert float(_loss(p, batch)) < float(_loss(params, batch))
    info = state[1].info
    assert int(info.cg_iters) >= 1 and not bool(info.skipped)


def test_as_optax_reuses_the_users_gradient_flops():
    """A phase that needs only %grad evaluates no forward/backward: its program costs a fraction of one."""
    params, batch = _problem(3, n=256, d=32, h=64, c=10)
    mods = [cp.modules.Hessian(), cp.modules.HutchinsonDiag(), cp.modules.DiagEMA(every=10),
            cp.modules.DiagonalDirection(), cp.modules.UpdateTail(learning_rate=0.1, source="diag")]
    planned = cp.compile_plan(mods, given=[q.grad()])
    assert planned.phases[1].providers == ()  # grad-only phase: no provider at all
    lowered = cp.lower_plan(planned, cp.Objective(loss_fn=_loss))
    state = lowered.init(params)
    g = jax.grad(_loss)(params, batch)

    def flops(i):
        f = jax.jit(lambda p, s, b, gg: lowered.phase_fns[i](p, s, b, jax.random.key(0), {q.grad(): gg}))
        return f.lower(params, state, batch, g).compile().cost_analysis()["flops"]

    grad_flops = jax.jit(jax.grad(_loss)).lower(params, batch).compile().cost_analysis()["flops"]
    assert flops(1) < 0.1 * grad_flops       # no forward/backward in the grad-only phase
    assert flops(0) > grad_flops             # the refresh phase linearizes


def test_non_finite_update_is_skipped_and_state_kept():
    params, batch = _problem(4)
    opt = cp.Optimizer(cp.presets.newton_cg(lam=1.0, maxiter=3), loss_fn=_loss)
    state = opt.init(params)
    p1, s1, info = opt.step(params, state, batch)
    bad = jax.tree.map(lambda x: x.at[0].set(jnp.nan) if x.ndim == 2 else x, p1)
    p2, s2, info2 = opt.step(bad, s1, batch)
    assert bool(info2.skipped) and int(info2.skipped_steps) == 1 and int(s2.skipped) == 1
    for x, y in zip(jax.tree.leaves(s1.modules), jax.tree.leaves(s2.modules)):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(jax.tree.leaves(bad), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(x, y)  # update not applied


def test_checkpoint_bit_exact_resume_and_wrong_plan(tmp_path):
    params, batch = _problem(5)
    plan = cp.compile_plan(_cadenced_modules(every=3))
    opt = cp.Optimizer(plan, model_fn=_mlp, loss="ce")
    key = jax.random.key(0)
    p, s = params, opt.init(params)
    for _ in range(4):
        p, s, _ = opt.step(p, s, batch, key)
    cp.save(tmp_path / "ck.npz", s, plan, params=p)
    ref_p, ref_s = p, s
    for _ in range(4):
        ref_p, ref_s, _ = opt.step(ref_p, ref_s, batch, key)
    s2, p2 = cp.restore(tmp_path / "ck.npz", plan, opt.init(params), params)
    for _ in range(4):
        p2, s2, _ = opt.step(p2, s2, batch, key)
    for x, y in zip(jax.tree.leaves((ref_p, ref_s)), jax.tree.leaves((p2, s2))):
        np.testing.assert_array_equal(x, y)
    other = cp.compile_plan(_cadenced_modules(every=4))
    with pytest.raises(cp.CheckpointError, match="not this plan"):
        cp.restore(tmp_path / "ck.npz", other, opt.init(params))


def test_lowering_errors_are_clear():
    from curvplan.ir.toy import Toy

    with pytest.raises(cp.LoweringError, match="declaration only"):
        cp.Optimizer([Toy(reads=("grad",), makes=("update",))], loss_fn=_loss)
    with pytest.raises(cp.LoweringError, match="produces %update"):
        cp.Optimizer([cp.modules.Hessian(), cp.modules.ConstantDamping(), cp.modules.CG()], loss_fn=_loss)
    with pytest.raises(cp.LoweringError, match="model_fn"):
        params, batch = _problem()
        opt = cp.Optimizer(cp.presets.gauss_newton_cg(loss="ce"), loss_fn=_loss)
        opt.step(params, opt.init(params), batch)
    with pytest.raises(cp.LoweringError, match="(?s)module `hessian` needs %hvp_op.hessian.*no loss or model"):
        cp.Optimizer(cp.presets.newton_cg())
    # under as_optax the gradient is given, so the error names the module that needs more than it
    with pytest.raises(cp.LoweringError, match="(?s)module `hessian` needs %hvp_op.hessian.*given: %grad"):
        cp.as_optax(cp.compile_plan(cp.presets.newton_cg()))
    with pytest.raises(cp.LoweringError, match="(?s)`muon_direction` needs %grad.*cp.as_optax"):
        cp.Optimizer(cp.presets.muon())


@pytest.mark.parametrize("preset", ["muon", "shampoo", "soap"])
def test_gradient_only_plans_are_optax_transformations_without_a_loss(preset):
    """`as_optax(plan)` with no loss: the phases need only the given gradient. The updates equal those of the
    same plan given a loss it never calls (the gradient comes from `update`)."""
    params = {"w": jnp.ones((4, 3)) * 0.1, "b": jnp.zeros(3)}
    grads = [jax.tree.map(lambda x, i=i: jnp.sin(x + i + jnp.arange(x.size).reshape(x.shape)), params)
             for i in range(4)]
    plan = cp.compile_plan(getattr(cp.presets, preset)())
    bare, with_loss = cp.as_optax(plan), cp.as_optax(plan, never_loss)
    sa, sb = bare.init(params), with_loss.init(params)
    for g in grads:
        ua, sa = jax.jit(bare.update)(g, sa, params)
        ub, sb = jax.jit(with_loss.update)(g, sb, params)
        for a, b in zip(jax.tree.leaves(ua), jax.tree.leaves(ub)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(sa.plan_state.step) == len(grads)
    assert float(sa.info.update_norm) > 0
