"""Hypothesis strategies for random valid compositions of `Toy` modules, and a brute-force reference.

`compositions()` draws a list of `Toy` modules whose fresh reads form a DAG over quantity names: a module
reads provider quantities, the input ``rng``, and quantities made by earlier modules (fresh or carried); now
and then it also reads carried a quantity made by itself or a later module (a feedback edge, legal because it
is carried). Exactly one module makes ``update``, and it has no cadence of its own (compile_plan refuses one). Some modules get explicit cadences; cadences that would
make `compile_plan` raise `CadenceError` are dropped by `repair_cadences` (using the reference semantics).

`reference_running` is an independent, per-step implementation of the planner's cadence propagation and
liveness rules (docs/architecture.md §4), written from the module declarations only:

- a module with an explicit cadence is *scheduled* on it; one without is scheduled on every step if it is a
  sink, makes ``update`` (the plan's output, read every step) or nothing reads it fresh, and otherwise
  whenever one of its fresh consumers is scheduled;
- a scheduled module *runs* when it is kept (sink, stateful, makes ``update``, or one of its outputs is read
  carried by any module) or when a module that reads it fresh runs;
- a module that never runs (and that no running module reads fresh) is removed and the rules are evaluated
  again on the rest (period included), until nothing more is removed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from hypothesis import strategies as st

from curvplan.ir import Cadence
from curvplan.ir.toy import Toy

PROVIDER_QUANTITIES = ("loss", "grad", "hvp_op.hessian", "ggn_op.ce", "activations", "outputs")
INPUT_QUANTITIES = ("rng",)
EVERIES = (1, 2, 3, 4, 5, 10)
KINDS = ("x", "direction", "diag", "kron", "stat")


@st.composite
def cadences(draw) -> Cadence:
    """A random cadence: every in `EVERIES`, an offset, a start up to 20 and now and then a stop."""
    every = draw(st.sampled_from(EVERIES))
    offset = draw(st.integers(0, every - 1))
    start = draw(st.integers(0, 20))
    stop = None
    if draw(st.integers(0, 4)) == 0:
        stop = start + offset + draw(st.integers(1, 30))
    return Cadence(every=every, offset=offset, start=start, stop=stop)


@st.composite
def composition_specs(draw, min_modules: int = 1, max_modules: int = 8) -> list[dict]:
    """Random module specs (dicts of `Toy` fields), before cadence repair."""
    n = draw(st.integers(min_modules, max_modules))
    made: list[list[str]] = []
    for i in range(n):
        k = draw(st.integers(1, 2))
        made.append([f"{draw(st.sampled_from(KINDS))}.m{i}q{j}" if j else f"x{i}" for j in range(k)])
    updater = draw(st.integers(0, n - 1))
    made[updater].append("update")
    specs = []
    for i in range(n):
        earlier = [q for j in range(i) for q in made[j] if q != "update"]
        pool = list(PROVIDER_QUANTITIES) + list(INPUT_QUANTITIES) + earlier
        reads = draw(st.lists(st.sampled_from(pool), unique=True, max_size=4))
        carry = [q for q in reads if q in earlier and draw(st.booleans())]
        if draw(st.integers(0, 2)) == 0:  # a carried feedback read: own output or a later module's
            later = [q for j in range(i, n) for q in made[j] if q != "update" and q not in reads]
            if later:
                q = draw(st.sampled_from(later))
                reads.append(q)
                carry.append(q)
        name = draw(st.sampled_from([None, None, f"m{i}", f"toy_{i}"]))
        spec = dict(
            reads=tuple(reads),
            carry=tuple(carry),
            makes=tuple(made[i]),
            stateful=draw(st.integers(0, 3)) == 0,
            is_sink=draw(st.integers(0, 5)) == 0,
        )
        if name is not None:
            spec["name"] = name
        if draw(st.integers(0, 3)) == 0:
            spec["attrs"] = (("beta", draw(st.sampled_from([0.9, 0.99]))),)
        if draw(st.integers(0, 2)) == 0 and "update" not in spec["makes"]:  # %update is made every step
            spec["cadence"] = draw(cadences())
        specs.append(spec)
    return specs


def build(specs: Sequence[dict]) -> list[Toy]:
    return [Toy(**s) for s in specs]


@st.composite
def compositions(draw, min_modules: int = 1, max_modules: int = 8) -> list[Toy]:
    """A random valid composition (compiles without error) of `Toy` modules."""
    specs = draw(composition_specs(min_modules, max_modules))
    return build(repair_cadences(specs))


# -- the reference semantics ---------------------------------------------------------------------------------
def reference_horizon(modules: Sequence[Toy]) -> tuple[int, int]:
    """(prefix, period) of the explicit cadences, computed from their fields."""
    prefix, period = 0, 1
    for m in modules:
        c = m.cadence
        if c is not None:
            prefix = max(prefix, c.stop if c.stop is not None else c.start + c.offset)
            period = period * c.every // math.gcd(period, c.every)
    return prefix, period


def fresh_consumers(modules: Sequence[Toy]) -> list[list[int]]:
    """For each module, the indices of the modules that read one of its outputs fresh."""
    out = []
    for m in modules:
        mine = set(m.outputs())
        out.append([j for j, c in enumerate(modules) if any(u.freshness == "fresh" and u.quantity in mine
                                                           for u in c.uses())])
    return out


def _order(consumers: list[list[int]]) -> list[int]:
    """Module indices, every module after all of its fresh consumers."""
    done: list[int] = []
    seen: set[int] = set()

    def visit(i: int) -> None:
        if i in seen:
            return
        seen.add(i)
        for c in consumers[i]:
            visit(c)
        done.append(i)

    for i in range(len(consumers)):
        visit(i)
    return done


def reference_scheduled(modules: Sequence[Toy], t: int, consumers=None) -> list[bool]:
    consumers = fresh_consumers(modules) if consumers is None else consumers
    sched = [False] * len(modules)
    for i in _order(consumers):
        m = modules[i]
        if m.cadence is not None:
            sched[i] = m.cadence.active(t)
        elif m.sink or any(q.kind == "update" for q in m.outputs()):
            sched[i] = True
        elif consumers[i]:
            sched[i] = any(sched[c] for c in consumers[i])
        else:
            sched[i] = True
    return sched


def kept(modules: Sequence[Toy]) -> list[bool]:
    carried_read = {u.quantity for m in modules for u in m.uses() if u.freshness == "carried"}
    return [
        m.sink or bool(m.state_names()) or any(q.kind == "update" for q in m.outputs())
        or any(q in carried_read for q in m.outputs())
        for m in modules
    ]


def _running_once(modules: Sequence[Toy], t: int) -> list[bool]:
    consumers = fresh_consumers(modules)
    sched = reference_scheduled(modules, t, consumers)
    keep = kept(modules)
    running = [False] * len(modules)
    for i in _order(consumers):
        running[i] = sched[i] and (keep[i] or any(running[c] for c in consumers[i]))
    return running


def reference_live(modules: Sequence[Toy]) -> list[bool]:
    """Which modules run at all: drop the never-running ones, re-evaluate the rest, until nothing changes."""
    live = [True] * len(modules)
    while True:
        idx = [i for i, x in enumerate(live) if x]
        sub = [modules[i] for i in idx]
        prefix, period = reference_horizon(sub)
        ever = [False] * len(sub)
        for t in range(prefix + 2 * period):
            ever = [a or b for a, b in zip(ever, _running_once(sub, t))]
        consumers = fresh_consumers(sub)
        # a producer some running module reads fresh stays (if it never runs, that is a cadence conflict)
        keep = [e or any(ever[c] for c in consumers[j]) for j, e in enumerate(ever)]
        if all(keep):
            return live
        for i, k in zip(idx, keep):
            live[i] = k


def reference_running(modules: Sequence[Toy], t: int) -> list[bool]:
    """Whether each module runs at step ``t`` (see the module docstring); removed modules never run."""
    live = reference_live(modules)
    idx = [i for i, x in enumerate(live) if x]
    running = [False] * len(modules)
    for i, r in zip(idx, _running_once([modules[i] for i in idx], t)):
        running[i] = r
    return running


def repair_cadences(specs: list[dict]) -> list[dict]:
    """Drops explicit cadences of producers whose fresh consumers are scheduled on steps they are not
    (among the modules that run at all: removed modules raise no `CadenceError`)."""
    specs = [dict(s) for s in specs]
    while True:
        every = build(specs)
        idx = [i for i, live in enumerate(reference_live(every)) if live]  # conflicts count among live ones
        modules = [every[i] for i in idx]
        consumers = fresh_consumers(modules)
        prefix, period = reference_horizon(modules)
        bad = None
        for t in range(prefix + 2 * period):
            sched = reference_scheduled(modules, t, consumers)
            bad = next((i for i, m in enumerate(modules) if m.cadence is not None and not sched[i]
                        and any(sched[c] for c in consumers[i])), None)
            if bad is not None:
                break
        if bad is None:
            return specs
        del specs[idx[bad]]["cadence"]

