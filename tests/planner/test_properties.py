"""Property tests of `compile_plan` on random `Toy` compositions (see tests/strategies.py)."""

from __future__ import annotations

import json
import os

import networkx as nx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from strategies import compositions, reference_horizon, reference_live, reference_running

import curvplan as cp
from curvplan.ir import describe_steps
from curvplan.ir.toy import Toy
from curvplan.planner import Plan

# CURVPLAN_PROP_EXAMPLES=5000 for a long bug hunt
PROPS = settings(max_examples=int(os.environ.get("CURVPLAN_PROP_EXAMPLES", 150)), deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])


# Compositions that exposed bugs: explicit examples of the properties below and regression tests at the end.
SGD = Toy(name="sgd", reads=("grad",), makes=("update",))
DEAD_WITH_CADENCE = [SGD, Toy(name="dead", reads=("loss",), makes=("z",), every=3)]  # nothing reads %z
UNION_PAST_A_STOP = [
    Toy(name="P", reads=("loss",), makes=("p",)),
    Toy(name="A", reads=("p",), makes=("y",), is_sink=True, stop=3),
    Toy(name="B", reads=("p",), makes=("z",), is_sink=True, every=2, offset=1),
]
CARRIED_TRIANGLE = [  # A -> B -> C -> A, all carried; B runs on even steps
    Toy(name="A", reads=("grad", "b"), carry=("b",), makes=("a", "update")),
    Toy(name="B", reads=("loss", "c"), carry=("c",), makes=("b",), every=2),
    Toy(name="C", reads=("loss", "a"), carry=("a",), makes=("c",)),
]


def labels(plan: Plan) -> dict[frozenset, str]:
    """Maps a module's outputs (unique in these compositions) to its label in ``plan``."""
    return {frozenset(m.outputs()): m.label for m in plan.modules}


def mask_of(cadences, window: int) -> int:
    out = 0
    for c in cadences:
        out |= c.mask(window)
    return out


# -- invariance and determinism -----------------------------------------------------------------------------
@PROPS
@given(compositions(), st.data())
def test_permuting_the_modules_gives_an_equal_plan(mods, data):
    perm = data.draw(st.permutations(mods))
    a, b = cp.compile_plan(mods), cp.compile_plan(perm)
    assert not cp.diff_plans(a, b), str(cp.diff_plans(a, b))
    assert a == b
    assert a.run == b.run and a.table == b.table


@PROPS
@given(compositions())
def test_compile_is_deterministic(mods):
    a = cp.compile_plan(mods)
    b = cp.compile_plan([Toy(**m.model_dump()) for m in mods])
    assert a == b
    assert str(a) == str(b) and a.fingerprint == b.fingerprint
    assert a.to_dict() == b.to_dict()


@PROPS
@given(compositions(), st.booleans())
@example(DEAD_WITH_CADENCE, True)
def test_to_dict_from_dict_round_trip(mods, optimize):
    plan = cp.compile_plan(mods, optimize=optimize, name="rt")
    assert Plan.from_dict(plan.to_dict()) == plan
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert Plan.from_dict(json.loads(plan.to_json())) == plan


@PROPS
@given(compositions(), st.data())
def test_duplicated_modules_add_no_nodes(mods, data):
    base = cp.compile_plan(mods)
    picks = data.draw(st.lists(st.sampled_from(mods), min_size=1, max_size=4))
    # exact copies merge into their original: the plan is the same
    copies = data.draw(st.permutations(mods + [m.model_copy() for m in picks]))
    same = cp.compile_plan(copies)
    assert same == base
    # copies under another name merge too (keeping the smaller name): same shape, no more values
    renamed = [m.model_copy(update={"name": f"dup{i}"}) for i, m in enumerate(picks)]
    dup = cp.compile_plan(data.draw(st.permutations(mods + renamed)))
    assert [len(ph.ops) for ph in dup.phases] == [len(ph.ops) for ph in base.phases]
    assert len(dup.names) <= len(base.names)
    assert len(dup.modules) == len(base.modules)
    known = {m.label for m in dup.modules} | {d for _, d in dup.merged} | set(dup.removed)
    assert all(r.name in known for r in renamed), (dup.merged, dup.removed)
    assert len(dup.merged) <= len(renamed)


# -- fresh reads ---------------------------------------------------------------------------------------------
@PROPS
@given(compositions())
def test_fresh_reads_are_produced_earlier_in_the_same_phase(mods):
    plan = cp.compile_plan(mods)
    for ph in plan.phases:
        produced: set = set()
        for op in ph.ops:
            if op.role == "module":
                m = plan.module(op.name)
                declared = {u.quantity: u.freshness for u in m.uses()}
                for r in op.reads:
                    if declared[r.quantity] == "fresh" and not r.quantity.is_input:
                        assert r.source == "fresh", f"phase {ph.index}: {op.name} reads {r.quantity.name} " \
                                                    f"from {r.source}, but declared it fresh"
            for r in op.reads:
                if r.source == "fresh":
                    assert r.node in produced, f"phase {ph.index}: {op.name} reads {r.node.name} too early"
            assert not (set(op.outputs) & produced), f"phase {ph.index}: {op.name} recomputes a value"
            produced.update(op.outputs)


@PROPS
@given(compositions())
def test_fresh_producers_run_whenever_their_consumers_run(mods):
    plan = cp.compile_plan(mods)
    producer = {q: m.label for m in plan.modules for q in m.outputs()}
    for m in plan.modules:
        for u in m.uses():
            p = producer.get(u.quantity)
            if u.freshness == "fresh" and p is not None:
                assert plan.run[m.label] & ~plan.run[p] == 0, (m.label, u.quantity.name, p)


@PROPS
@given(compositions())
def test_each_phase_is_in_topological_order(mods):
    plan = cp.compile_plan(mods)
    for ph in plan.phases:
        position = {op.name: i for i, op in enumerate(ph.ops)}
        made_by = {q: op.name for op in ph.ops for q in op.outputs}
        g = nx.DiGraph()
        g.add_nodes_from(position)
        for op in ph.ops:
            for r in op.reads:
                if r.source == "fresh":
                    g.add_edge(made_by[r.node], op.name)
        assert nx.is_directed_acyclic_graph(g)
        for u, v in g.edges:
            assert position[u] < position[v], f"phase {ph.index}: {v} is scheduled before {u}"
        assert sorted(op.name for op in ph.ops if op.role == "module") == list(ph.modules)
        assert list(ph.providers) == [op.name for op in ph.ops if op.role == "provider"]


# -- phases against a brute force ----------------------------------------------------------------------------
@PROPS
@given(compositions())
def test_phases_match_a_brute_force_propagation(mods):
    plan = cp.compile_plan(mods)
    prefix, period = reference_horizon([m for m, live in zip(mods, reference_live(mods)) if live])
    assert (plan.prefix, plan.period) == (prefix, period)
    by_outputs = labels(plan)
    names = [by_outputs.get(frozenset(m.outputs()), f"<not in plan: {m.label}>") for m in mods]
    seen = set()
    for t in range(prefix + 3 * period):
        ref = frozenset(n for n, r in zip(names, reference_running(mods, t)) if r)
        assert plan.running(t) == ref, f"step {t}: plan {sorted(plan.running(t))}, reference {sorted(ref)}"
        assert plan.phases[plan.phase_of(t)].modules == tuple(sorted(ref)), f"step {t}"
        seen.add(ref)
    assert len(plan.phases) == len(seen)


@PROPS
@given(compositions())
@example(UNION_PAST_A_STOP)
def test_phase_headers_and_effective_cadences_describe_their_steps(mods):
    plan = cp.compile_plan(mods)
    window = plan.prefix + 2 * plan.period
    for lbl, run in plan.run.items():
        terms = describe_steps(run, plan.prefix, plan.period, max_terms=10**6)
        assert mask_of(terms, window) == run, f"{lbl}: {terms} does not describe its steps"
    for ph in plan.phases:
        terms = describe_steps(plan.phase_mask(ph.index), plan.prefix, plan.period, max_terms=10**6)
        assert mask_of(terms, window) == plan.phase_mask(ph.index), f"phase {ph.index}: {terms}"


# -- the unplanned baseline ----------------------------------------------------------------------------------
@PROPS
@given(compositions())
def test_unplanned_baseline_runs_modules_on_the_same_steps(mods):
    plan = cp.compile_plan(mods)
    base = cp.compile_plan(mods, optimize=False)
    assert base.run == plan.run
    assert len(base.phases) == 1
    ops = base.phases[0].ops
    assert sorted(op.name for op in ops if op.role == "module") == sorted(plan.run)
    assert {m.label for m in base.modules} == set(plan.run)
    for op in ops:  # each module's guard is its effective cadence (none when it runs every step)
        if op.role == "module":
            every_step = plan.run[op.name] == (1 << (plan.prefix + 2 * plan.period)) - 1
            assert op.guard == (None if every_step else plan.cadence_of(op.name))


# -- regressions found by the properties above ---------------------------------------------------------------
def test_effective_cadence_of_a_union_that_outlives_a_stop():
    """`P` feeds `A` (@until(3)) and `B` (@every(2,+1)): it runs on 0, 1, 2, 3, 5, 7, ... not @until(4)."""
    mods = UNION_PAST_A_STOP
    plan = cp.compile_plan(mods)
    assert [t for t in range(12) if plan.runs("P", t)] == [0, 1, 2, 3, 5, 7, 9, 11]
    terms = describe_steps(plan.run["P"], plan.prefix, plan.period)
    assert terms is not None and mask_of(terms, plan.prefix + 2 * plan.period) == plan.run["P"], terms
    guard = cp.compile_plan(mods, optimize=False).phases[0].op("P").guard
    assert guard == plan.cadence_of("P") != "@until(4)", (
        f"the unplanned baseline guards P with {guard}: it would skip P at step 5, where B reads %p fresh"
    )


def test_removed_modules_do_not_change_the_period():
    plan = cp.compile_plan(DEAD_WITH_CADENCE)
    assert plan.removed == ("dead",)
    assert plan == cp.compile_plan([SGD])


def test_removed_consumers_do_not_set_a_producers_cadence():
    """`C` and `D` never run (nothing reads them), so stateful `P` has no running consumer: every step."""
    mods = [
        SGD,
        Toy(name="P", reads=("loss",), makes=("a",), stateful=True),
        Toy(name="C", reads=("a",), makes=("b",)),
        Toy(name="D", reads=("b",), makes=("c",), every=10),
    ]
    plan = cp.compile_plan(mods)
    assert plan.removed == ("C", "D")
    assert plan == cp.compile_plan(list(plan.modules)) == cp.compile_plan(mods[:2])


def test_a_removed_carried_reader_does_not_keep_its_producer():
    """`C` is removed (nothing reads %b), so nothing reads %a and `P` is dead work."""
    mods = [
        SGD,
        Toy(name="P", reads=("loss",), makes=("a",)),
        Toy(name="C", reads=("a",), carry=("a",), makes=("b",)),
    ]
    plan = cp.compile_plan(mods)
    assert "C" in plan.removed
    assert "P" in plan.removed, str(plan)


@pytest.mark.parametrize("optimize", [True, False])
def test_round_trip_with_removed_modules(optimize):
    plan = cp.compile_plan(DEAD_WITH_CADENCE, optimize=optimize)
    assert Plan.from_dict(plan.to_dict()) == plan


# -- names and the baseline must not change what a carried read sees -----------------------------------------
def phase_views(plan: Plan) -> list[frozenset]:
    """Per phase, what each running module reads: (its outputs, quantity, new value this step or not)."""
    outputs = {m.label: frozenset(m.outputs()) for m in plan.modules}
    return [
        frozenset((outputs[op.name], r.quantity, r.source == "fresh")
                  for op in ph.ops if op.role == "module" for r in op.reads if r.source != "input")
        for ph in plan.phases
    ]


def read_view(plan: Plan, t: int, views: list[frozenset] | None = None) -> frozenset:
    """What each running module reads at step ``t`` (see `phase_views`)."""
    return (views or phase_views(plan))[plan.phase_of(t)]


@PROPS
@given(compositions(), st.permutations(range(12)))
@example(CARRIED_TRIANGLE, [2, 1, 0, *range(3, 12)])
def test_renaming_modules_changes_nothing_but_names(mods, perm):
    renamed = [m.model_copy(update={"name": f"n{perm[i]:02d}"}) for i, m in enumerate(mods)]
    a, b = cp.compile_plan(mods), cp.compile_plan(renamed)
    assert (a.prefix, a.period, len(a.phases)) == (b.prefix, b.period, len(b.phases))
    va, vb = phase_views(a), phase_views(b)
    for t in range(a.prefix + a.period):
        assert read_view(a, t, va) == read_view(b, t, vb), f"step {t}"


@PROPS
@given(compositions())
@example(CARRIED_TRIANGLE)
def test_unplanned_baseline_reads_the_same_values(mods):
    """At every step, each carried read sees the new value in the baseline iff it does in the plan."""
    plan = cp.compile_plan(mods)
    base = cp.compile_plan(mods, optimize=False)
    producer = {q: m.label for m in plan.modules for q in m.outputs()}
    (bph,) = base.phases
    for t in range(plan.prefix + 2 * plan.period):
        ph = plan.phases[plan.phase_of(t)]
        for op in ph.ops:
            if op.role != "module":
                continue
            bop = bph.op(op.name)
            for r, br in zip(op.reads, bop.reads):
                p = producer.get(r.quantity)
                if p is None:
                    continue
                new_in_plan = r.source == "fresh"
                new_in_base = br.source == "fresh" and plan.runs(p, t)
                plan_says, base_says = ("new" if x else "old" for x in (new_in_plan, new_in_base))
                assert new_in_plan == new_in_base, (
                    f"step {t}: {op.name} reads {r.quantity.name} {plan_says} in the plan, "
                    f"{base_says} in the baseline"
                )


def test_carried_read_sees_the_same_value_in_every_phase_and_in_the_baseline():
    """A -> B -> C -> A, all carried; B runs on even steps. On odd steps the plan lets C read the new %a
    (no cycle closes while B is idle), on even steps the old one; the unplanned baseline always reads the old
    one."""
    plan = cp.compile_plan(CARRIED_TRIANGLE)
    base = cp.compile_plan(CARRIED_TRIANGLE, optimize=False)
    sources = {ph.index: ph.op("C").reads[1].source for ph in plan.phases}
    assert len(set(sources.values())) == 1, sources
    assert set(sources.values()) == {base.phases[0].op("C").reads[1].source}


def test_carried_read_resolution_does_not_depend_on_names():
    renamed = [m.model_copy(update={"name": "Z"}) if m.name == "A" else m for m in CARRIED_TRIANGLE]
    a, b = cp.compile_plan(CARRIED_TRIANGLE), cp.compile_plan(renamed)
    for t in range(4):
        assert read_view(a, t) == read_view(b, t), f"step {t}"
