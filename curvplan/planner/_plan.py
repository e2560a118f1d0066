"""`Plan`: the static result of `compile_plan`, what lowering consumes and what users print and diff."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from curvplan.ir._cadence import describe_steps
from curvplan.ir._errors import PlanError
from curvplan.ir._module import ModuleSpec, module_from_dict
from curvplan.ir._quantity import Quantity
from curvplan.ir._schedule import Phase, assign_names, format_phase
from curvplan.planner._placement import Placement

PLAN_FORMAT = "curvplan.plan/1"


@dataclass(frozen=True, eq=False)
class Plan:
    """A static, scheduled composition. Build it with `curvplan.compile_plan`.

    Attributes:
        name: shown in the first line of the text form.
        optimize: False for the unplanned baseline.
        given: quantities the caller supplies every step (e.g. the gradient under `as_optax`).
        modules: the running modules, sorted by name (merged duplicates and dead modules dropped).
        phases: one `Phase` per distinct set of running modules, ordered by first step.
        prefix, period: after ``prefix`` steps the phase sequence repeats every ``period`` steps.
        table: the phase index of each step in ``[0, prefix + period)``.
        run: for each module, a bitmask of the steps in ``[0, prefix + 2 * period)`` on which it runs.
        slots: carried quantities kept in the optimizer state.
        state: names of the state entries (``step``, ``module.field``).
        declared: every module after dedup, including removed ones (what `to_dict` stores).
        merged: ``(kept, dropped)`` names of modules merged by dedup.
        removed: modules that never run (nothing reads their outputs).
        placement: where the plan runs on a device mesh (`Placement`), or ``None`` (not placed).
    """

    name: str
    optimize: bool
    given: tuple[Quantity, ...]
    max_period: int
    modules: tuple[ModuleSpec, ...]
    phases: tuple[Phase, ...]
    prefix: int
    period: int
    table: tuple[int, ...]
    run: dict[str, int]
    slots: tuple[Quantity, ...]
    state: tuple[str, ...]
    declared: tuple[ModuleSpec, ...] = ()
    merged: tuple[tuple[str, str], ...] = ()
    removed: tuple[str, ...] = ()
    placement: Placement | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    # -- lookups ------------------------------------------------------------------------------------------
    def phase_of(self, t: int) -> int:
        """The phase index that runs at step ``t`` (a table lookup)."""
        if t < 0:
            raise ValueError(f"step must be >= 0, got {t}")
        if t >= len(self.table):
            t = self.prefix + (t - self.prefix) % self.period
        return self.table[t]

    def reduce_step(self, t: int) -> int:
        """Maps a step to its representative in ``[0, prefix + period)`` (same phase, same cadences)."""
        return t if t < self.prefix + self.period else self.prefix + (t - self.prefix) % self.period

    def runs(self, module: str, t: int) -> bool:
        """Whether ``module`` runs at step ``t``."""
        return bool((self.run[module] >> self.reduce_step(t)) & 1)

    def running(self, t: int) -> frozenset[str]:
        """Names of the modules that run at step ``t``."""
        return frozenset(lbl for lbl in self.run if self.runs(lbl, t))

    def module(self, name: str) -> ModuleSpec:
        for m in self.modules:
            if m.label == name:
                return m
        raise KeyError(f"no module named {name!r} in this plan; modules: {[m.label for m in self.modules]}")

    @cached_property
    def programs(self) -> tuple[tuple[int, ...], ...]:
        """The phases each compiled program runs, one tuple of phase indices per program.

        Phases with the same provider pass (the same model evaluations) differ only in module work, and are
        lowered as one program: what every one of them runs is traced once, the rest runs under ``lax.cond``
        on the phase. Phases that evaluate the model differently (a refresh step that linearizes it) keep a
        program of their own. ``print(plan)`` lists the merge on its ``programs:`` line.
        """
        groups: dict[tuple, list[int]] = {}
        for ph in self.phases:
            groups.setdefault(tuple(op for op in ph.ops if op.role == "provider"), []).append(ph.index)
        return tuple(tuple(g) for g in groups.values())

    def program_of(self, phase: int) -> int:
        """The index in `programs` of the program that runs ``phase``."""
        return next(i for i, g in enumerate(self.programs) if phase in g)

    @property
    def phase_table(self) -> dict[str, Any]:
        """The phase table as data: ``{"prefix", "period", "table"}`` (``table[reduce_step(t)]``)."""
        return {"prefix": self.prefix, "period": self.period, "table": list(self.table)}

    def cadence_of(self, module: str) -> str:
        """The effective cadence of a module, as printed text (``@every(10)``, unions joined by ``|``)."""
        terms = describe_steps(self.run[module], self.prefix, self.period)
        return "@pattern" if terms is None else " | ".join(map(str, terms)) or "@never"

    def phase_mask(self, index: int) -> int:
        """Bitmask of the steps in ``[0, prefix + 2 * period)`` that run phase ``index``."""
        mask = 0
        for t in range(self.prefix + 2 * self.period):
            if self.phase_of(t) == index:
                mask |= 1 << t
        return mask

    def quantity_cadences(self) -> dict[str, str]:
        """Printed name -> cadence (as text) of every value the plan computes."""
        masks: dict[Quantity, int] = {}
        for ph in self.phases:
            pm = self.phase_mask(ph.index)
            for op in ph.ops:
                om = self.run[op.name] & pm if op.role == "module" else pm
                for q in op.outputs:
                    masks[q] = masks.get(q, 0) | om
        out = {}
        for q, mask in masks.items():
            terms = describe_steps(mask, self.prefix, self.period)
            out[self.names[q]] = "@pattern" if terms is None else " | ".join(map(str, terms))
        return out

    @cached_property
    def names(self) -> dict[Quantity, str]:
        """Printed name of every value in the plan."""
        nodes = set(self.slots) | set(self.given)
        for ph in self.phases:
            for op in ph.ops:
                nodes.update(op.outputs)
                nodes.update(r.node for r in op.reads)
        return assign_names(nodes)

    # -- text --------------------------------------------------------------------------------------------
    def __str__(self) -> str:
        if "text" not in self._cache:
            self._cache["text"] = "\n".join([self._format(), *self._program_lines(), *self._placement_lines()])
        return self._cache["text"]

    def _program_lines(self) -> list[str]:
        """``programs:``, only when phases are merged (how the plan is compiled, not what it computes)."""
        if len(self.programs) == len(self.phases):
            return []
        groups = " | ".join(" ".join(map(str, g)) for g in self.programs)
        n = len(self.programs)
        return [f"programs: {n} for {len(self.phases)} phases ({groups}): one per provider pass, the rest under cond"]

    def _placement_lines(self) -> list[str]:
        if self.placement is None:
            return []
        provided = sorted({self.names[x] for ph in self.phases for op in ph.ops if op.role == "provider"
                           for x in op.outputs})
        return self.placement.lines(provided)

    def _format(self) -> str:
        """The text without its placement section: what the plan computes, on any mesh."""
        n = len(self.phases)
        head = f"plan {self.name}{'' if self.optimize else ' (unplanned)'}: {n} phase{'s' if n != 1 else ''}"
        head += f", prefix {self.prefix}" if self.prefix else ""
        head += f", period {self.period}"
        lines = [head]
        if self.given:
            lines.append("given: " + ", ".join(self.names[q] for q in self.given))
        for ph in self.phases:
            lines += format_phase(ph, self.names)
        state = list(self.state) + [f"slot {self.names[q]}" for q in self.slots]
        lines.append("state: " + ", ".join(state))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<Plan {self.name!r}: {len(self.phases)} phases, {len(self.modules)} modules, {self.fingerprint}>"

    @property
    def fingerprint(self) -> str:
        """A short hash of the canonical text without its placement section: equal for plans that compute the
        same thing (on any mesh), stored in checkpoints, so a state restores onto another mesh."""
        return hashlib.sha256(self._format().encode()).hexdigest()[:16]

    def __eq__(self, other: object) -> bool:
        # what the plan runs: its text and its running modules (removed modules do not count)
        return (isinstance(other, Plan) and str(self) == str(other)
                and [m.to_dict() for m in self.modules] == [m.to_dict() for m in other.modules])

    def __hash__(self) -> int:
        return hash(str(self))

    # -- serialisation ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description: the module configs plus the text they compile to."""
        return {
            "format": PLAN_FORMAT,
            "name": self.name,
            "optimize": self.optimize,
            "given": [q.to_dict() for q in self.given],
            "max_period": self.max_period,
            "modules": [m.to_dict() for m in self.declared or self.modules],
            "placement": None if self.placement is None else self.placement.to_dict(),
            "text": str(self),
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        """Recompiles a plan from `to_dict` and checks it prints the same text."""
        from curvplan.planner._compile import compile_plan

        if d.get("format") != PLAN_FORMAT:
            raise PlanError(
                f"unknown plan format {d.get('format')!r}",
                where="Plan.from_dict",
                fix=f"pass a dict made by `Plan.to_dict()` (format {PLAN_FORMAT!r})",
            )
        plan = compile_plan(
            [module_from_dict(m) for m in d["modules"]],
            optimize=d["optimize"],
            name=d["name"],
            given=[Quantity.from_dict(q) for q in d["given"]],
            max_period=d["max_period"],
            mesh=None if not d.get("placement") else {a: n for a, n in d["placement"]["mesh"]},
            batch_axes=None if not d.get("placement") else d["placement"]["batch_axes"],
        )
        if "text" in d and str(plan) != d["text"]:
            raise PlanError(
                "the stored plan text differs from what these modules compile to now",
                where=f"plan {d['name']!r} (stored fingerprint {d.get('fingerprint')})",
                fix="the planner or a module changed since the plan was saved; recompile and re-save it",
            )
        return plan

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    # -- pictures ---------------------------------------------------------------------------------------
    def to_dot(self) -> str:
        """The plan as Graphviz DOT source."""
        from curvplan.ir._visualize import plan_to_dot

        return plan_to_dot(self)

    def visualize(self, path: str | None = None, format: str | None = None) -> str:
        """Draws the plan; returns the DOT source.

        Renders with Graphviz's ``dot`` when installed, otherwise with matplotlib (if installed).

        Args:
            path: file to write (``.svg``, ``.png`` or ``.dot``); ``None`` only returns the DOT source.
            format: overrides the format implied by ``path``'s suffix.
        """
        from curvplan.ir._visualize import render

        return render(self, path, format)
