"""Merged programs: phases with one provider pass compile to one program that computes what their specialised
per-phase programs compute, step by step; program counts per preset; and each refresh traced once."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvplan as cp
from curvplan.modules import presets as P


def _tiny():
    """Square 6 x 6 layers and a least-squares loss: every gradient matrix has full rank, so the Gram matrices of
    SOAP / SCAO / Shampoo have distinct eigenvalues and their eigenbases are defined up to sign only (a repeated
    eigenvalue, or the softmax's class-mean direction, would let two programs pick different bases)."""
    def model(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]

    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    params = {"w1": jax.random.normal(k1, (6, 6)) / 2, "b1": jnp.zeros(6), "w2": jax.random.normal(k2, (6, 6)) / 2}
    return model, params, (jax.random.normal(k3, (16, 6)), jax.random.normal(k4, (16, 6)))


# How many programs each preset compiles, and why: phases that evaluate the model the same way share one.
PROGRAMS = {
    "scao": (lambda: P.scao_modules(learning_rate=1e-2, warmup_steps=4, precond_freq=2, blend_steps=4), 1,
             "six phases (warm-up, blend, preconditioned; refresh or not), all on value_and_grad"),
    "kfac": (lambda: P.kfac(learning_rate=0.1, damping=0.1, inverse_every=3, loss="mse"), 1,
             "inverse refresh or not, both on layer_io"),
    "kfac_adaptive": (lambda: P.kfac(adaptive=True, damping=0.1, loss="mse"), 1,
                      "damping adapted every 5 or not, both on layer_io + linearize_model"),
    "soap": (lambda: P.soap(learning_rate=1e-2, precondition_frequency=3), 1, "eigenbasis refresh or not"),
    "shampoo": (lambda: P.shampoo(learning_rate=1e-2, root_every=3), 1, "inverse roots refreshed or not"),
    "hessian_free": (lambda: P.hessian_free(loss="mse", maxiter=4), 1,
                     "damping adapted or not, all on linearize_model"),
    "sophia_h": (lambda: P.sophia_h(), 2, "the refresh step linearizes the gradient (HVPs), the others do not"),
    "sophia_g": (lambda: P.sophia_g(), 2, "the refresh step linearizes the model (GGN products)"),
    "adahessian_like": (lambda: P.adahessian_like(hessian_every=3), 2, "Hessian diagonal every 3: HVPs then"),
    "muon": (lambda: P.muon(0.02), 1, "one phase"),
}


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_program_count_per_preset(name):
    make, expected, why = PROGRAMS[name]
    plan = cp.compile_plan(make())
    assert len(plan.programs) == expected, why
    assert sorted(i for g in plan.programs for i in g) == list(range(len(plan.phases)))
    # the plan text says so exactly when phases were merged
    assert ("programs:" in str(plan)) == (len(plan.programs) < len(plan.phases))
    for g in plan.programs:  # a program's phases share their providers
        assert len({plan.phases[i].providers for i in g}) == 1


@pytest.mark.parametrize("name", ["scao", "kfac", "kfac_adaptive", "soap", "shampoo", "hessian_free", "sophia_h"])
def test_merged_program_computes_what_each_phase_program_does(name):
    """Every step of a window that visits every phase: the program `step` and `run` use against the specialised
    program of that step's phase, fed the same state (so any difference is the program's own)."""
    model, params, batch = _tiny()
    opt = cp.Optimizer(PROGRAMS[name][0](), model_fn=model, loss="mse")
    low, plan = opt.lowered, opt.plan
    state = opt.init(params, jax.random.key(1), batch)
    phase = [jax.jit(lambda p, s, b, r, f=f: f(p, s, b, r, {})) for f in low.phase_fns]
    program = [jax.jit(lambda p, s, b, r, f=f: f(p, s, b, r, {})) for f in low.program_fns]
    steps = plan.prefix + 2 * plan.period + 2
    seen = set()
    for t in range(steps):
        key = jax.random.key(t)
        i = plan.phase_of(t)
        ua, sa, ia = phase[i](params, state, batch, key)
        ub, sb, ib = program[plan.program_of(i)](params, state, batch, key)
        assert int(ib.phase) == i and not bool(ib.skipped)
        for x, y in zip(jax.tree.leaves((ua, sa)), jax.tree.leaves((ub, sb))):
            np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=2e-5, atol=1e-7)
        assert ia.keys() == ib.keys()
        for k in ia.keys():
            np.testing.assert_allclose(np.asarray(ia[k], np.float64), np.asarray(ib[k], np.float64), rtol=2e-5,
                                       atol=1e-7, err_msg=k)
        params, state = optax.apply_updates(params, ua), sa
        seen.add(i)
    assert seen == set(range(len(plan.phases)))


def _eigh_calls(hlo: str) -> int:
    """Symmetric eigendecompositions in a lowered program (StableHLO text), however the backend spells them."""
    return len(re.findall(r"syevd|eigh", hlo))


def test_merged_scao_traces_each_refresh_once():
    """SCAO refreshes its eigenbases in three of its six phases. Switching over the specialised programs puts
    three copies of every decomposition in the compiled loop; the merged program has one."""
    model, params, batch = _tiny()
    opt = cp.Optimizer(PROGRAMS["scao"][0](), model_fn=model, loss="mse")
    low, plan = opt.lowered, opt.plan
    state = opt.init(params, jax.random.key(1))
    args = (params, state, batch, jax.random.key(2))

    def text(f):
        return jax.jit(lambda p, s, b, r: f(p, s, b, r, {})).lower(*args).as_text()

    per_phase = [_eigh_calls(text(f)) for f in low.phase_fns]
    refreshing = [i for i, n in enumerate(per_phase) if n]
    assert len(refreshing) == 3 and len(set(per_phase[i] for i in refreshing)) == 1
    assert len(low.program_fns) == 1
    assert _eigh_calls(text(low.program_fns[0])) == per_phase[refreshing[0]]
    # and the driver compiles that one program once, for every phase
    for _ in range(plan.prefix + plan.period):
        params, state, _ = opt.step(params, state, batch)
    assert opt.trace_counts == [1]


def test_fallback_switch_computes_the_same(monkeypatch):
    """Phases whose work cannot be merged (`_merge_ops` gives None) get a switch over their specialised programs."""
    import curvplan.lowering._lower as lower

    real = lower._merge_ops
    monkeypatch.setattr(lower, "_merge_ops", lambda phases: None if len(phases) > 1 else real(phases))
    model, params, batch = _tiny()
    opt = cp.Optimizer(PROGRAMS["kfac"][0](), model_fn=model, loss="mse")
    state = opt.init(params)
    ref = [jax.jit(lambda p, s, b, f=f: f(p, s, b, None, {})) for f in opt.lowered.phase_fns]
    for t in range(4):
        ua, sa, _ = ref[opt.plan.phase_of(t)](params, state, batch)
        new_params, sb, info = opt.step(params, state, batch)
        assert int(info.phase) == opt.plan.phase_of(t)
        for x, y in zip(jax.tree.leaves((optax.apply_updates(params, ua), sa)), jax.tree.leaves((new_params, sb))):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-8)
        params, state = new_params, sb
    assert opt.trace_counts == [1]


def test_a_read_carried_where_its_writer_runs_later_selects_the_carried_value():
    """If one phase reads a carried value fresh and another reads it carried although its writer runs later in
    that phase, the merged read is resolved per phase: fresh where fresh, the stored value where carried."""
    import dataclasses

    import curvplan.lowering._lower as lower

    plan = cp.compile_plan(P.kfac(loss="mse"))
    refresh, other = plan.phases
    inverse = refresh.op("kfac_inverse")
    late = dataclasses.replace(other, ops=(*other.ops, inverse))  # the writer now runs after the reader
    merged = {m.op.name: m for m in lower._merge_ops([refresh, late])}
    assert merged["kfac_direction"].reads[1] == ("select", frozenset({0}))
    merged = {m.op.name: m for m in lower._merge_ops([refresh, other])}  # writer skipped: no select needed
    assert merged["kfac_direction"].reads[1] == ("skipped", frozenset({0}))

    fresh, carried = {"a": jnp.ones(3, jnp.bfloat16)}, {"a": jnp.full(3, 2.0, jnp.float32)}
    for where in (True, False):
        got = lower._fresh_or_carried(fresh, carried, jnp.asarray(where), select=True)["a"]
        assert got.dtype == jnp.float32 and float(got[0]) == (1.0 if where else 2.0)
    # skipped writer, same dtypes: the fresh value is already the carried one
    same = {"a": jnp.ones(3, jnp.float32)}
    assert lower._fresh_or_carried(same, carried, jnp.asarray(False), select=False) is same
    # skipped writer, narrower output: carried phases get the stored float32 value, not a bfloat16 copy
    got = lower._fresh_or_carried({"a": jnp.full(3, 1.001, jnp.bfloat16)}, {"a": jnp.full(3, 1.001)},
                                  jnp.asarray(False), select=False)["a"]
    assert got.dtype == jnp.float32 and float(got[0]) == np.float32(1.001)
