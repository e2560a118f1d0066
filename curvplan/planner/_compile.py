"""`compile_plan`: modules in, a static `Plan` out. Pure Python: nothing here traces or imports JAX.

The pipeline (docs/architecture.md §5), one function per pass:

1. `_validate`: every item is a `ModuleSpec`; explicit names are unique.
2. `_dedup`: modules with equal configuration are merged (equal quantities are already one object).
3. `_name`: default names (``kind``, ``kind_1``, ...) assigned in structural order.
4. `_resolve`: every consumed quantity gets a producer (input, module or provider rule).
5. `_check_cycles`: fresh dependencies must form a DAG.
6. `_live_modules` / `_propagate`: effective cadences (producers run whenever a fresh consumer runs) and
   liveness, repeated until no module is removed; `_carried_reads_of_new_values` decides once which
   carried reads see this step's value.
7. `_build_phases`: distinct running sets -> phases; per phase the cheapest provider cover and a
   deterministic schedule; carried slots.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import networkx as nx

from curvplan.ir import quantities as qs
from curvplan.ir._cadence import EVERY_STEP, describe_steps, horizon
from curvplan.ir._errors import (
    AmbiguousProducerError,
    CadenceError,
    CycleError,
    DuplicateNameError,
    MissingProducerError,
    PeriodError,
    PlanError,
)
from curvplan.ir._graph import verify_phase
from curvplan.ir._module import ModuleSpec, Use, _values
from curvplan.ir._providers import PROVIDERS, ProviderRule
from curvplan.ir._quantity import Quantity
from curvplan.ir._schedule import Op, Phase, Read
from curvplan.planner._placement import place
from curvplan.planner._plan import Plan

MAX_PERIOD = 100_000
PROVIDER = "<provider>"
INPUT = "<input>"


def compile_plan(
    modules: Sequence[ModuleSpec],
    *,
    optimize: bool = True,
    name: str = "plan",
    given: Iterable[Quantity] = (),
    max_period: int = MAX_PERIOD,
    mesh: Any = None,
    batch_axes: str | Sequence[str] | None = None,
) -> Plan:
    """Plans a composition of modules.

    Args:
        modules: the module declarations (order does not matter).
        optimize: ``False`` builds the unplanned baseline: one program, each module with its own providers,
            cadences as ``lax.cond``. It exists so the benefit of planning can be measured.
        name: shown in the plan's first line.
        given: quantities supplied by the caller every step (``as_optax`` passes ``[grad()]``).
        max_period: refuse plans whose phase table (prefix + period) is longer than this.
        mesh: a ``jax.sharding.Mesh`` (or a mapping axis name -> size) to place the plan on: the batch is split
            over ``batch_axes`` and the block work of ``blockwise`` modules over every axis (see `Placement`).
            The placement is a section of the plan text; the rest of the plan does not depend on it.
        batch_axes: the mesh axes the batch is split over (default ``"data"``, else the first axis).

    Returns:
        A static `Plan`.

    Raises:
        PlanError: a subclass saying what is wrong, in which module / quantity, and how to fix it.

    Examples:
        >>> import curvplan as cp
        >>> from curvplan.ir.toy import Toy
        >>> plan = cp.compile_plan([Toy(name="sgd", reads=("grad",), makes=("update",))], name="sgd")
        >>> print(plan)
        plan sgd: 1 phase, period 1
        phase 0 @every(1) [value_and_grad]
          %grad, %loss = value_and_grad(params, batch)
          %update      = toy:sgd(%grad)
        state: step
    """
    given = tuple(sorted(set(given)))
    mods = _validate(modules)
    mods, merged = _dedup(mods)
    mods = _name(mods)
    producers = _resolve(mods, given)
    _check_cycles(mods, producers)
    live, run, prefix, period = _live_modules(mods, producers, max_period)
    _check_update_every_step(live, run, prefix + 2 * period)
    removed = tuple(sorted(set(mods) - set(live)))
    reads_new = _carried_reads_of_new_values(live, producers)
    if optimize:
        phases, table, slots = _build_phases(live, producers, run, prefix, period, given, reads_new)
    else:
        phases, table, slots = _build_unplanned(live, producers, run, prefix, period, given, reads_new)
    state = ("step",) + tuple(f"{lbl}.{f}" for lbl, m in live.items() for f in m.state_names())
    return Plan(
        name=name,
        optimize=optimize,
        given=given,
        max_period=max_period,
        modules=tuple(live.values()),
        declared=tuple(mods.values()),
        phases=phases,
        prefix=prefix,
        period=period,
        table=table,
        run={lbl: run[lbl] for lbl in live},
        slots=slots,
        state=state,
        merged=merged,
        removed=removed,
        placement=None if mesh is None else place(mesh, batch_axes, [lbl for lbl, m in live.items() if m.blockwise]),
    )


# -- 1-3: validate, dedup, name ---------------------------------------------------------------------------
def _check_declarations(m: ModuleSpec) -> None:
    """`consumes` / `produces` are mappings from the module's own names (identifiers) to uses / quantities."""
    for what, decl, kind in (("consumes", m.consumes(), Use), ("produces", m.produces(), Quantity)):
        bad = None
        if not isinstance(decl, Mapping):
            bad = f"returned a {type(decl).__name__}, not a mapping"
        else:
            bad = next((f"has the entry {k!r}: {v!r}" for k, v in decl.items()
                        if not (isinstance(k, str) and k.isidentifier() and isinstance(v, kind))), None)
        if bad:
            raise PlanError(
                f"module `{m.label}`: {what}() {bad}",
                where=f"module `{m.label}` ({type(m).__name__}.{what})",
                fix=f"return a dict from the module's own names (identifiers) to "
                    f"{'fresh(q) / carried(q)' if kind is Use else 'quantities'}",
            )


def _check_update_every_step(live: dict[str, ModuleSpec], run: dict[str, int], window: int) -> None:
    """The module that writes the plan's ``%update`` runs on every step: the optimizer returns an update each
    step, and a step without one has nothing to return. ``run`` masks span ``window`` steps."""
    full = (1 << window) - 1
    for lbl, m in live.items():
        upd = [x for x in m.outputs() if x == qs.update()]  # tagged pieces (%update:adam) may take turns
        if upd and run[lbl] != full:
            raise CadenceError(
                f"module `{lbl}` produces {upd[0].name} but runs only on some steps ({m.cadence or 'as its inputs'})",
                where=f"module `{lbl}`, quantity {upd[0].name}",
                fix="remove its cadence (and that of anything it reads fresh); to update less often, accumulate "
                    "gradients with optax.MultiSteps around cp.as_optax(...)",
            )


def _validate(modules: Sequence[ModuleSpec]) -> list[ModuleSpec]:
    if isinstance(modules, ModuleSpec):
        modules = [modules]
    if callable(modules) and not isinstance(modules, (list, tuple)):
        name = getattr(modules, "__name__", type(modules).__name__)
        raise PlanError(
            f"`{name}` was passed uncalled: a preset is a function that returns the module list",
            where=f"compile_plan({name})",
            fix=f"call it: `{name}()` (with its settings, e.g. `{name}(learning_rate=...)`)",
        )
    try:
        modules = list(modules)
    except TypeError:
        raise PlanError(
            f"expected a list of curvplan modules, got a {type(modules).__name__}",
            where="compile_plan(modules)",
            fix="pass module instances, e.g. `cp.presets.newton_cg()` returns a list of them",
        ) from None
    out = []
    seen: dict[str, ModuleSpec] = {}
    for i, m in enumerate(modules):
        if not isinstance(m, ModuleSpec):
            raise PlanError(
                f"item {i} of the module list is a {type(m).__name__}, not a curvplan module",
                where=f"modules[{i}] = {m!r}",
                fix="pass module instances, e.g. `cp.presets.newton_cg()` returns a list of them",
            )
        _check_declarations(m)
        if m.name is not None:
            other = seen.get(m.name)
            if other is not None and other.identity() != m.identity():
                raise DuplicateNameError(
                    f"two different modules are named {m.name!r}",
                    where=f"`{other.kind}(name={m.name!r})` and `{m.kind}(name={m.name!r})`",
                    fix="give each module a unique `name=`",
                )
            seen[m.name] = m
        out.append(m)
    return out


def _dedup(mods: list[ModuleSpec]) -> tuple[list[ModuleSpec], tuple[tuple[str, str], ...]]:
    """Merges modules whose configuration is equal (ignoring names); keeps the smallest explicit name."""
    groups: dict[tuple, list[ModuleSpec]] = {}
    for m in mods:
        groups.setdefault(m.identity(), []).append(m)
    out, merged = [], []
    for ms in groups.values():
        named = sorted({m.name for m in ms if m.name is not None})
        keep = next(m for m in ms if m.name == named[0]) if named else ms[0]
        out.append(keep)
        merged += [(keep.label, n) for n in named[1:]]
    return out, tuple(sorted(merged))


def _name(mods: list[ModuleSpec]) -> dict[str, ModuleSpec]:
    explicit = {m.name for m in mods if m.name is not None}
    unnamed = sorted((m for m in mods if m.name is None), key=lambda m: repr(m.identity()))
    for m in unnamed:
        label, i = m.kind, 0
        while label in explicit:
            i += 1
            label = f"{m.kind}_{i}"
        explicit.add(label)
        mods[mods.index(m)] = m.model_copy(update={"name": label})
    return {m.label: m for m in sorted(mods, key=lambda m: m.label)}


# -- 4-5: resolve producers, cycles ----------------------------------------------------------------------
def _resolve(mods: dict[str, ModuleSpec], given: tuple[Quantity, ...]) -> dict[Quantity, str]:
    """Maps each consumed quantity to a module label, `PROVIDER` or `INPUT`."""
    made: dict[Quantity, list[str]] = {}
    for lbl, m in mods.items():
        for q in m.outputs():
            made.setdefault(q, []).append(lbl)
    producers: dict[Quantity, str] = {}
    for q, lbls in made.items():
        if len(lbls) > 1:
            raise AmbiguousProducerError(
                f"{q.name} is produced by {len(lbls)} modules: " + ", ".join(f"`{x}`" for x in lbls),
                where=f"quantity {q!r}, modules " + ", ".join(f"`{x}`" for x in lbls),
                fix=f"give one producer `tag='...'` and let consumers choose with "
                f"`take=(({q.name.lstrip('%')!r}, '<tag>'),)`, or remove one of them",
            )
        producers[q] = lbls[0]
    provided = set().union(*(r.provides for r in PROVIDERS.values()))
    for lbl, m in mods.items():
        for q, _ in m.uses():
            if q in producers:
                continue
            if q.is_input or q in given:
                producers[q] = INPUT
            elif q in provided:
                producers[q] = PROVIDER
            else:
                near = sorted({p.name for p in list(made) + list(provided) if p.kind == q.kind})
                hint = f" (produced here: {', '.join(near)})" if near else ""
                raise MissingProducerError(
                    f"nothing produces {q.name} ({q!r}), which module `{lbl}` consumes{hint}",
                    where=f"module `{lbl}` ({m.kind}), quantity {q.name}",
                    fix="add a module that produces it, register a provider rule for it "
                    "(`curvplan.ir.register_provider`), or change what the module consumes",
                )
    for lbl, m in mods.items():
        for q, fr in m.uses():
            if fr == "carried" and producers[q] == PROVIDER:
                raise PlanError(
                    f"module `{lbl}` consumes the provider quantity {q.name} as carried",
                    where=f"module `{lbl}`, quantity {q.name}",
                    fix="consume it fresh, or add a module that stores it (an EMA with beta=0)",
                )
    return producers


def _fresh_graph(mods: dict[str, ModuleSpec], producers: dict[Quantity, str]) -> nx.DiGraph:
    """Module-level graph with an edge producer -> consumer for every fresh use."""
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    for lbl, m in mods.items():
        for q, fr in m.uses():
            p = producers[q]
            if fr == "fresh" and p in mods:
                g.add_edge(p, lbl, quantity=q)
    return g


def _check_cycles(mods: dict[str, ModuleSpec], producers: dict[Quantity, str]) -> None:
    g = _fresh_graph(mods, producers)
    try:
        cycle = nx.find_cycle(g)
    except nx.NetworkXNoCycle:
        return
    steps = " ".join(f"`{u}` --{g.edges[u, v]['quantity'].name}-->" for u, v in cycle) + f" `{cycle[0][0]}`"
    raise CycleError(
        f"fresh dependencies form a cycle: {steps}",
        where="modules " + ", ".join(f"`{u}`" for u, _ in cycle),
        fix="make one of these uses `carried(...)` so it reads the value from an earlier step",
    )


# -- 6: cadences, liveness, carried reads ---------------------------------------------------------------
def _live_modules(mods, producers, max_period):
    """Drops modules that never run until none is left to drop; returns ``(live, run, prefix, period)``.

    A removed module shapes nothing: neither the period nor its producers' cadences or liveness.
    """
    live = dict(mods)
    while True:
        explicit = [m.cadence for m in live.values() if m.cadence is not None]
        prefix, period = horizon(explicit)
        if prefix + period > max_period:
            slow = sorted((str(m.cadence), lbl) for lbl, m in live.items() if m.cadence is not None)
            raise PeriodError(
                f"the phase table would span {prefix} + {period} steps (limit {max_period})",
                where="cadences " + ", ".join(f"`{lbl}` {c}" for c, lbl in slow),
                fix="use cadence periods that divide each other (e.g. every=10 and every=100, not 97 and 101)",
            )
        window = prefix + 2 * period
        run = _propagate(live, producers, window)
        conflicts = _cadence_conflicts(live, producers, run, window)
        # a producer that a running consumer needs is never dropped: that is a conflict, raised below
        dead = {lbl for lbl, mask in run.items() if mask == 0} - {c[0] for c in conflicts}
        if not dead:
            if conflicts:
                _raise_cadence_conflict(live, run, window, *conflicts[0])
            return live, run, prefix, period
        live = {lbl: m for lbl, m in live.items() if lbl not in dead}


def _cadence_conflicts(mods, producers, run, window) -> list[tuple[str, str, Quantity, int]]:
    """``(producer, consumer, quantity, step)`` where a running consumer reads fresh from an explicitly
    scheduled producer on a step that producer's cadence leaves out."""
    out = []
    for c, m in mods.items():
        for q, fr in m.uses():
            p = producers[q]
            if fr == "fresh" and p in mods and mods[p].cadence is not None:
                extra = run[c] & ~mods[p].cadence.mask(window)
                if extra:
                    out.append((p, c, q, (extra & -extra).bit_length() - 1))
    return sorted(out, key=lambda x: (x[3], x[0], x[1], x[2].sort_key))


def _raise_cadence_conflict(mods, run, window, p, c, q, t):
    cad = mods[p].cadence
    raise CadenceError(
        f"module `{c}` needs {q.name} fresh at step {t}, but its producer `{p}` is scheduled {cad} and does "
        f"not run then",
        where=f"producer `{p}` {cad}, consumer `{c}` ({_describe(run[c], window)}), quantity {q.name}",
        fix=f"remove the cadence of `{p}` (it then follows its consumers), "
        + ("" if qs.update() in mods[c].outputs() else f"make `{c}` run only on {cad}, ")
        + f"or consume {q.name} with `carried(...)`",
    )


def _carried_reads_of_new_values(mods, producers) -> set[tuple[str, Quantity]]:
    """The carried reads that see the value computed this step when their producer runs first.

    A carried read of a module in another strongly connected component of the module graph (fresh and
    carried edges) is ordered after its producer and sees the new value; inside a component (a feedback
    loop such as damping -> solver -> damping) it reads the value from before the step. The rule depends
    on neither names nor phases, so every phase and the unplanned baseline agree.
    """
    g = _fresh_graph(mods, producers)
    carried_edges = []
    for lbl, m in mods.items():
        for q, fr in m.uses():
            p = producers[q]
            if fr == "carried" and p in mods and p != lbl:
                carried_edges.append((p, lbl, q))
                g.add_edge(p, lbl)
    component = {n: i for i, comp in enumerate(nx.strongly_connected_components(g)) for n in comp}
    return {(c, q) for p, c, q in carried_edges if component[p] != component[c]}


def _propagate(mods: dict[str, ModuleSpec], producers: dict[Quantity, str], window: int) -> dict[str, int]:
    """Steps (bitmask over ``window``) on which each module runs.

    A module with an explicit cadence runs on it; one without runs every step if it is a sink, makes the
    update (the plan's output, read every step) or nothing reads it fresh, and otherwise whenever a fresh
    consumer runs. A module then only runs where it is live: it is a sink, keeps state,
    has a carried reader, or a running module reads it fresh.
    """
    g = _fresh_graph(mods, producers)
    full = (1 << window) - 1
    active: dict[str, int] = {}
    order = list(reversed(list(nx.lexicographical_topological_sort(g))))  # consumers first
    for lbl in order:
        m = mods[lbl]
        consumers = sorted(g.successors(lbl))
        if m.cadence is not None:
            mask = m.cadence.mask(window)
        elif m.sink or any(q.kind == "update" for q in m.outputs()):
            mask = full
        elif consumers:
            mask = 0
            for c in consumers:
                mask |= active[c]
        else:
            mask = full
        active[lbl] = mask
    carried_read = {q for m in mods.values() for q, fr in m.uses() if fr == "carried"}
    run: dict[str, int] = {}
    for lbl in order:
        m = mods[lbl]
        keep = (
            m.sink
            or any(q.kind == "update" for q in m.outputs())
            or bool(m.state_names())
            or any(q in carried_read for q in m.outputs())
        )
        if keep:
            run[lbl] = active[lbl]
        else:
            needed = 0
            for c in g.successors(lbl):
                needed |= run[c]
            run[lbl] = active[lbl] & needed
    return run


def _describe(mask: int, window: int) -> str:
    steps = [t for t in range(min(window, 64)) if (mask >> t) & 1]
    return "steps " + ", ".join(map(str, steps[:8])) + (", ..." if len(steps) > 8 else "")


# -- 7: phases, providers, schedule ------------------------------------------------------------------------
def _cheapest_cover(needed: frozenset[Quantity], cache: dict) -> tuple[ProviderRule, ...]:
    """The cheapest set of provider rules that covers ``needed`` (ties: fewer rules, then names)."""
    if needed in cache:
        return cache[needed]
    rules = sorted(PROVIDERS.values(), key=lambda r: r.name)
    useful = [r for r in rules if r.provides & needed]
    best: tuple[ProviderRule, ...] | None = None
    best_key = None
    for k in range(1, len(useful) + 1):
        for combo in itertools.combinations(useful, k):
            if needed <= frozenset().union(*(r.provides for r in combo)):
                key = (sum(r.cost for r in combo), k, tuple(r.name for r in combo))
                if best_key is None or key < best_key:
                    best, best_key = combo, key
    if best is None and needed:
        raise MissingProducerError(
            f"no provider rule covers {', '.join(q.name for q in sorted(needed))}",
            where="provider registry",
            fix="register a provider rule for these quantities",
        )
    cache[needed] = best or ()
    return cache[needed]


def _assign(needed: frozenset[Quantity], rules: tuple[ProviderRule, ...]) -> dict[str, tuple[Quantity, ...]]:
    """Each needed quantity comes from the cheapest selected rule that provides it."""
    out: dict[str, list[Quantity]] = {r.name: [] for r in rules}
    for q in sorted(needed):
        r = min((r for r in rules if q in r.provides), key=lambda r: (r.cost, r.name))
        out[r.name].append(q)
    return {k: tuple(v) for k, v in out.items()}


def _with_free_loss(needed: frozenset[Quantity], rules, given) -> frozenset[Quantity]:
    """The loss comes free with any gradient provider; report it (telemetry) when one runs."""
    loss = Quantity("loss")
    if loss not in given and any(loss in r.provides for r in rules):
        return needed | {loss}
    return needed


def _phase_header(masks: list[int], prefix: int, period: int) -> list[str]:
    described = [describe_steps(m, prefix, period) for m in masks]
    headers = ["" if d is None else " | ".join(map(str, d)) for d in described]
    vague = [i for i, d in enumerate(described) if d is None]
    if vague:
        widest = max(vague, key=lambda i: (masks[i].bit_count(), -i))
        for i in vague:
            n = (masks[i] >> prefix & ((1 << period) - 1)).bit_count()
            headers[i] = "otherwise" if i == widest else f"@pattern({n} of {period}, from {prefix})"
    return headers


def _steps_by_phase(run: dict[str, int], prefix: int, period: int) -> tuple[list[frozenset[str]], tuple[int, ...]]:
    window = prefix + period
    sets: list[frozenset[str]] = []
    index: dict[frozenset[str], int] = {}
    table = []
    for t in range(window):
        s = frozenset(lbl for lbl, mask in run.items() if (mask >> t) & 1)
        if s not in index:
            index[s] = len(sets)
            sets.append(s)
        table.append(index[s])
    return sets, tuple(table)


def _module_op(m: ModuleSpec, reads: list[Read], writes: set[Quantity], guard: str | None = None) -> Op:
    outs = tuple(sorted(m.outputs()))
    return Op(
        name=m.label,
        op=m.kind,
        role="module",
        reads=tuple(reads),
        outputs=outs,
        writes=tuple(q for q in outs if q in writes),
        attrs=m.config(),
        guard=guard,
    )


def _schedule(g: nx.DiGraph) -> list[str]:
    return list(nx.lexicographical_topological_sort(g, key=lambda n: (0 if n.startswith("provider:") else 1, n)))


def _build_phases(mods, producers, run, prefix, period, given, reads_new):
    sets, table = _steps_by_phase(run, prefix, period)
    window = prefix + 2 * period
    carried_read = {q for m in mods.values() for q, fr in m.uses() if fr == "carried"}
    cover_cache: dict = {}
    slots: set[Quantity] = set()
    phases = []
    masks = []
    for i, _ in enumerate(sets):
        mask = 0
        for t in range(window):
            tt = t if t < prefix + period else prefix + (t - prefix) % period
            if table[tt] == i:
                mask |= 1 << t
        masks.append(mask)
    headers = _phase_header(masks, prefix, period)
    for i, running in enumerate(sets):
        needed = frozenset(
            q for lbl in running for q, fr in mods[lbl].uses() if producers[q] == PROVIDER and fr == "fresh"
        )
        rules = _cheapest_cover(needed, cover_cache)
        assigned = _assign(_with_free_loss(needed, rules, given), rules)
        g = nx.DiGraph()
        made_by: dict[Quantity, str] = {}
        for r in rules:
            node = f"provider:{r.name}"
            g.add_node(node)
            for q in assigned[r.name]:
                made_by[q] = node
        for lbl in running:
            g.add_node(f"module:{lbl}")
            for q in mods[lbl].outputs():
                made_by[q] = f"module:{lbl}"
        for lbl in running:
            for q, fr in mods[lbl].uses():
                if fr == "fresh" and q in made_by:
                    g.add_edge(made_by[q], f"module:{lbl}")
        reads_fresh = {(lbl, q) for lbl, q in reads_new if lbl in running and q in made_by}
        for lbl, q in reads_fresh:
            g.add_edge(made_by[q], f"module:{lbl}")
        ops = []
        for node in _schedule(g):
            role, ref = node.split(":", 1)
            if role == "provider":
                rule = PROVIDERS[ref]
                outs = assigned[ref]
                writes = tuple(q for q in outs if q in carried_read)
                slots.update(writes)
                reads = tuple(Read(x, "input", x) for x in rule.inputs)
                ops.append(Op(ref, ref, "provider", reads, outs, writes))
                continue
            m = mods[ref]
            reads = []
            for (d, _), (q, fr) in zip(_values(m.consumes()), m.uses()):
                if producers[q] == INPUT:
                    reads.append(Read(d, "input", q))
                elif fr == "fresh" or (ref, q) in reads_fresh:
                    reads.append(Read(d, "fresh", q))
                else:
                    reads.append(Read(d, "slot", q))
                    slots.add(q)
            writes = {q for q in m.outputs() if q in carried_read}
            slots.update(writes)
            ops.append(_module_op(m, reads, writes))
        phase = Phase(i, headers[i], masks[i].bit_count(), tuple(r.name for r in rules), tuple(ops),
                      tuple(sorted(running)))
        verify_phase(phase, given)
        phases.append(phase)
    return tuple(phases), table, tuple(sorted(slots))


def _build_unplanned(mods, producers, run, prefix, period, given, reads_new):
    """One program: every module with private providers run every step, cadences as guards."""
    window = prefix + 2 * period
    carried_read = {q for m in mods.values() for q, fr in m.uses() if fr == "carried"}
    cover_cache: dict = {}
    slots: set[Quantity] = set()
    g = nx.DiGraph()
    made_by: dict[Quantity, str] = {}
    private: dict[str, dict[Quantity, Quantity]] = {}
    provider_ops: dict[str, Op] = {}
    for lbl, m in mods.items():
        needed = frozenset(q for q, fr in m.uses() if producers[q] == PROVIDER)
        rules = _cheapest_cover(needed, cover_cache)
        private[lbl] = {}
        for r, outs in _assign(_with_free_loss(needed, rules, given), rules).items():
            node = f"provider:{r}/{lbl}"
            inst = tuple(q.with_attrs(instance=lbl) for q in outs)
            private[lbl].update(zip(outs, inst))
            reads = tuple(Read(x, "input", x) for x in PROVIDERS[r].inputs)
            provider_ops[node] = Op(f"{r}/{lbl}", r, "provider", reads, inst)
            g.add_edge(node, f"module:{lbl}")
        g.add_node(f"module:{lbl}")
        for q in m.outputs():
            made_by[q] = f"module:{lbl}"
    for lbl, m in mods.items():
        for q, fr in m.uses():
            if fr == "fresh" and q in made_by:
                g.add_edge(made_by[q], f"module:{lbl}")
    reads_fresh = reads_new
    for lbl, q in reads_fresh:
        g.add_edge(made_by[q], f"module:{lbl}")
    ops = []
    for node in _schedule(g):
        if node in provider_ops:
            ops.append(provider_ops[node])
            continue
        lbl = node.split(":", 1)[1]
        m = mods[lbl]
        reads = []
        for (d, _), (q, fr) in zip(_values(m.consumes()), m.uses()):
            if producers[q] == INPUT:
                reads.append(Read(d, "input", q))
            elif q in private[lbl]:
                reads.append(Read(d, "fresh", private[lbl][q]))
            elif fr == "fresh" or (lbl, q) in reads_fresh:
                reads.append(Read(d, "fresh", q))
            else:
                reads.append(Read(d, "slot", q))
                slots.add(q)
        writes = {q for q in m.outputs() if q in carried_read}
        slots.update(writes)
        mask = run[lbl]
        full = (1 << window) - 1
        guard = None
        if mask != full:
            terms = describe_steps(mask, prefix, period)
            guard = " | ".join(map(str, terms)) if terms is not None else "@pattern"
        ops.append(_module_op(m, reads, writes, guard))
    phase = Phase(0, str(EVERY_STEP), prefix + 2 * period, ("unplanned",), tuple(ops), tuple(sorted(mods)))
    verify_phase(phase, given)
    return (phase,), (0,) * (prefix + period), tuple(sorted(slots))


__all__ = ["compile_plan", "MAX_PERIOD"]
