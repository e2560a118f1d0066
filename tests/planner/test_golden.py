"""Golden plan texts of hand-written `Toy` compositions shaped like real optimizers.

Regenerate with ``CURVPLAN_ACCEPT=1 pytest tests/planner/test_golden.py``, then read every changed text: a
golden that copies a wrong plan is worse than none.
"""

from __future__ import annotations

import curvplan as cp
from curvplan.ir import quantities as q
from curvplan.ir.toy import Toy
from curvplan.testing import assert_plan_text


def sophia() -> list[Toy]:
    """Sophia-H: a Hutchinson diagonal every 10 steps (it follows its EMA), the direction every step."""
    return [
        Toy(name="hutchinson", reads=("hvp_op.hessian", "rng"), makes=("diag.hessian",), attrs=(("probes", 1),)),
        Toy(name="diag_ema", reads=("diag.hessian",), makes=("v",), stateful=True, every=10,
            attrs=(("beta", 0.99),)),
        Toy(name="sophia_direction", reads=("grad", "v"), carry=("v",), makes=("update",), stateful=True,
            attrs=(("clip", 1.0), ("gamma", 0.01))),
    ]


def kfac() -> list[Toy]:
    """K-FAC with an SGD burn-in: factors every step from 10, inverses every 5 from 10, read carried.

    The two directions have disjoint cadences but both make an update, so they are told apart by tags
    (two untagged producers of ``update`` are an `AmbiguousProducerError` even when they never run together).
    """
    return [
        Toy(name="kfac_factors", reads=("activations", "out_cotangents"), makes=("kron.kfac",), stateful=True,
            start=10, attrs=(("decay", 0.95),)),
        Toy(name="kfac_inverses", reads=("kron.kfac",), makes=("inv.kfac",), every=5, start=10,
            attrs=(("damping", 0.001),)),
        Toy(name="warmup", reads=("grad",), makes=("update",), tag="warmup", stop=10, attrs=(("lr", 0.1),)),
        Toy(name="kfac_direction", reads=("grad", "inv.kfac"), carry=("inv.kfac",), makes=("update",),
            tag="kfac", start=10),
    ]


def scao() -> list[Toy]:
    """SCAO: Adam until 100, a blend on [100, 150), preconditioned after; factors and eigenbases every 10."""
    return [
        Toy(name="adam", reads=("grad",), makes=("update",), tag="adam", stateful=True, stop=100),
        Toy(name="gram_factors", reads=("grad",), makes=("kron.grad_gram",), stateful=True, every=10,
            attrs=(("beta", 0.95),)),
        Toy(name="eigbasis", reads=("kron.grad_gram",), makes=("eigbasis.grad_gram",), every=10),
        Toy(name="blend", reads=("grad", "eigbasis.grad_gram"), carry=("eigbasis.grad_gram",), makes=("update",),
            tag="blend", stateful=True, start=100, stop=150),
        Toy(name="preconditioned", reads=("grad", "eigbasis.grad_gram"), carry=("eigbasis.grad_gram",),
            makes=("update",), tag="precond", stateful=True, start=150),
    ]


def shared() -> list[Toy]:
    """Two modules read `grad` and `hvp_op.hessian`: the plan computes each once."""
    return [
        Toy(name="newton_cg", reads=("grad", "hvp_op.hessian"), makes=("direction.newton",),
            attrs=(("iters", 10),)),
        Toy(name="hessian_trace", reads=("hvp_op.hessian", "rng"), makes=("trace.hessian",), is_sink=True),
        Toy(name="step", reads=("direction.newton", "grad", "trace.hessian"), makes=("update",)),
    ]


def test_sophia():
    plan = cp.compile_plan(sophia(), name="sophia")
    assert_plan_text(plan, """
        plan sophia: 2 phases, period 10
        phase 0 @every(10) [linearize_grad]
          %grad, %hvp_op.hessian, %loss = linearize_grad(params, batch)
          %diag.hessian                 = toy:hutchinson(%hvp_op.hessian, rng; probes=1)
          %v                            = toy:diag_ema(%diag.hessian; beta=0.99) -> carried
          %update                       = toy:sophia_direction(%grad, %v; clip=1.0, gamma=0.01)
        phase 1 otherwise [value_and_grad]
          %grad, %loss = value_and_grad(params, batch)
          %update      = toy:sophia_direction(%grad, carried %v; clip=1.0, gamma=0.01)
        state: step, diag_ema.s, sophia_direction.s, slot %v
    """)
    assert [plan.phase_of(t) for t in range(21)] == [0] + [1] * 9 + [0] + [1] * 9 + [0]


def test_sophia_unplanned():
    plan = cp.compile_plan(sophia(), name="sophia", optimize=False)
    assert_plan_text(plan, """
        plan sophia (unplanned): 1 phase, period 10
        phase 0 @every(1) [unplanned]
          %hvp_op.hessian/hutchinson, %loss/hutchinson   = linearize_grad(params, batch)
          %grad/sophia_direction, %loss/sophia_direction = value_and_grad(params, batch)
          %diag.hessian                                  = toy:hutchinson(%hvp_op.hessian/hutchinson, rng; probes=1) if @every(10)
          %v                                             = toy:diag_ema(%diag.hessian; beta=0.99) -> carried if @every(10)
          %update                                        = toy:sophia_direction(%grad/sophia_direction, %v; clip=1.0, gamma=0.01)
        state: step, diag_ema.s, sophia_direction.s, slot %v
    """)


def test_kfac():
    plan = cp.compile_plan(kfac(), name="kfac")
    assert_plan_text(plan, """
        plan kfac: 3 phases, prefix 10, period 5
        phase 0 @until(10) [value_and_grad]
          %grad, %loss   = value_and_grad(params, batch)
          %update:warmup = toy:warmup(%grad; lr=0.1)
        phase 1 @every(5)@from(10) [layer_io]
          %activations, %grad, %loss, %out_cotangents = layer_io(params, batch)
          %kron.kfac                                  = toy:kfac_factors(%activations, %out_cotangents; decay=0.95)
          %inv.kfac                                   = toy:kfac_inverses(%kron.kfac; damping=0.001) -> carried
          %update:kfac                                = toy:kfac_direction(%grad, %inv.kfac)
        phase 2 otherwise [layer_io]
          %activations, %grad, %loss, %out_cotangents = layer_io(params, batch)
          %update:kfac                                = toy:kfac_direction(%grad, carried %inv.kfac)
          %kron.kfac                                  = toy:kfac_factors(%activations, %out_cotangents; decay=0.95)
        state: step, kfac_factors.s, slot %inv.kfac
        programs: 2 for 3 phases (0 | 1 2): one per provider pass, the rest under cond
    """)
    assert [plan.phase_of(t) for t in (0, 9, 10, 11, 14, 15, 16, 1000)] == [0, 0, 1, 2, 2, 1, 2, 1]
    assert plan.running(12) == {"kfac_factors", "kfac_direction"}


def test_scao():
    """Phases 0 and 2 are single finite progressions (steps 0, 10, ..., 90 and 100, 110, ..., 140); the planner
    currently prints both as ``@pattern(0 of 10, from 150)`` (like phase 3) because `describe_steps` gives up
    on finite runs with a stride above 1 (see test_cadence.py::test_describe_steps_finds_strided_finite_runs).
    """
    plan = cp.compile_plan(scao(), name="scao")
    assert_plan_text(plan, """
        plan scao: 6 phases, prefix 150, period 10
        phase 0 @every(10)@until(91) [value_and_grad]
          %grad, %loss        = value_and_grad(params, batch)
          %update:adam        = toy:adam(%grad)
          %kron.grad_gram     = toy:gram_factors(%grad; beta=0.95)
          %eigbasis.grad_gram = toy:eigbasis(%kron.grad_gram) -> carried
        phase 1 otherwise [value_and_grad]
          %grad, %loss = value_and_grad(params, batch)
          %update:adam = toy:adam(%grad)
        phase 2 @every(10)@from(100)@until(141) [value_and_grad]
          %grad, %loss        = value_and_grad(params, batch)
          %kron.grad_gram     = toy:gram_factors(%grad; beta=0.95)
          %eigbasis.grad_gram = toy:eigbasis(%kron.grad_gram) -> carried
          %update:blend       = toy:blend(%grad, %eigbasis.grad_gram)
        phase 3 @pattern(0 of 10, from 150) [value_and_grad]
          %grad, %loss  = value_and_grad(params, batch)
          %update:blend = toy:blend(%grad, carried %eigbasis.grad_gram)
        phase 4 @every(10)@from(150) [value_and_grad]
          %grad, %loss        = value_and_grad(params, batch)
          %kron.grad_gram     = toy:gram_factors(%grad; beta=0.95)
          %eigbasis.grad_gram = toy:eigbasis(%kron.grad_gram) -> carried
          %update:precond     = toy:preconditioned(%grad, %eigbasis.grad_gram)
        phase 5 @pattern(9 of 10, from 150) [value_and_grad]
          %grad, %loss    = value_and_grad(params, batch)
          %update:precond = toy:preconditioned(%grad, carried %eigbasis.grad_gram)
        state: step, adam.s, blend.s, gram_factors.s, preconditioned.s, slot %eigbasis.grad_gram
        programs: 1 for 6 phases (0 1 2 3 4 5): one per provider pass, the rest under cond
    """)
    assert [plan.phase_of(t) for t in (0, 1, 90, 99, 100, 101, 149, 150, 151, 1000, 1001)] == [
        0, 1, 0, 1, 2, 3, 3, 4, 5, 4, 5]


def test_shared_providers_are_computed_once():
    plan = cp.compile_plan(shared(), name="shared")
    assert_plan_text(plan, """
        plan shared: 1 phase, period 1
        phase 0 @every(1) [linearize_grad]
          %grad, %hvp_op.hessian, %loss = linearize_grad(params, batch)
          %trace.hessian                = toy:hessian_trace(%hvp_op.hessian, rng)
          %direction.newton             = toy:newton_cg(%grad, %hvp_op.hessian; iters=10)
          %update                       = toy:step(%direction.newton, %grad, %trace.hessian)
        state: step
    """)
    (phase,) = plan.phases
    for x in (q.grad(), q.hvp_op("hessian")):
        makers = [op for op in phase.ops if x in op.outputs]
        assert [op.name for op in makers] == ["linearize_grad"], x


def test_shared_providers_unplanned_baseline_has_private_copies():
    plan = cp.compile_plan(shared(), name="shared", optimize=False)
    assert_plan_text(plan, """
        plan shared (unplanned): 1 phase, period 1
        phase 0 @every(1) [unplanned]
          %hvp_op.hessian/hessian_trace, %loss/hessian_trace          = linearize_grad(params, batch)
          %grad/newton_cg, %hvp_op.hessian/newton_cg, %loss/newton_cg = linearize_grad(params, batch)
          %grad/step, %loss/step                                      = value_and_grad(params, batch)
          %trace.hessian                                              = toy:hessian_trace(%hvp_op.hessian/hessian_trace, rng)
          %direction.newton                                           = toy:newton_cg(%grad/newton_cg, %hvp_op.hessian/newton_cg; iters=10)
          %update                                                     = toy:step(%direction.newton, %grad/step, %trace.hessian)
        state: step
    """)
    (phase,) = plan.phases
    assert sum(1 for op in phase.ops if op.role == "provider") == 3


def test_adding_a_stateful_loss_module_to_sophia_diff():
    before = cp.compile_plan(sophia(), name="sophia")
    probe = Toy(name="loss_ema", reads=("loss",), makes=("stat.loss",), stateful=True, every=5)
    after = cp.compile_plan(sophia() + [probe], name="sophia")
    diff = cp.diff_plans(before, after)
    assert diff
    assert diff.added == ("loss_ema: toy @every(5)",)
    assert diff.removed == () and diff.changed == () and diff.cadences == ()
    assert diff.added_quantities == (("%stat.loss", "@every(5)"),)
    assert diff.removed_quantities == ()
    assert diff.phases == (("+", "@every(10,+5) [value_and_grad]"),)
    assert "@@ phase" in str(diff)
    assert "+  %stat.loss" in str(diff)
    assert not cp.diff_plans(before, cp.compile_plan(sophia(), name="sophia"))
    assert str(cp.diff_plans(before, before)) == ""
