"""What a plan is made of once scheduled: reads, ops and phases, and the canonical text printer."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from curvplan.ir._quantity import Quantity, _fmt

Source = Literal["input", "fresh", "slot"]


class Read(NamedTuple):
    """One input of an op.

    Attributes:
        quantity: the quantity as the consumer declared it (the key of its ``inputs`` dict).
        source: ``input`` (params/batch/rng/given), ``fresh`` (computed earlier this step) or ``slot``
            (the carried value in the optimizer state, written on an earlier step).
        node: the value actually read (differs from ``quantity`` only for private provider copies).
    """

    quantity: Quantity
    source: Source
    node: Quantity


@dataclass(frozen=True)
class Op:
    """One scheduled call: a provider rule or a user module."""

    name: str
    op: str
    role: Literal["provider", "module"]
    reads: tuple[Read, ...]
    outputs: tuple[Quantity, ...]
    writes: tuple[Quantity, ...] = ()
    attrs: tuple[tuple[str, Any], ...] = ()
    guard: str | None = None
    """Unplanned baseline only: the module whose cadence gates this op under ``lax.cond``."""


@dataclass(frozen=True)
class Phase:
    """A distinct set of running modules, with its providers and schedule."""

    index: int
    header: str
    steps: int
    providers: tuple[str, ...]
    ops: tuple[Op, ...]
    modules: tuple[str, ...] = field(default=())

    def op(self, name: str) -> Op:
        for o in self.ops:
            if o.name == name:
                return o
        raise KeyError(name)


def assign_names(nodes: Iterable[Quantity]) -> dict[Quantity, str]:
    """Printed names for a plan: ``q.name``, with ``_1``, ``_2`` on collisions (in structural order)."""
    by_base: dict[str, list[Quantity]] = {}
    for q in sorted(set(nodes)):
        by_base.setdefault(q.name, []).append(q)
    names = {}
    for base, qs in by_base.items():
        for i, q in enumerate(qs):
            names[q] = base if i == 0 else f"{base}_{i}"
    return names


def format_attrs(attrs: Iterable[tuple[str, Any]]) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in attrs)


def format_op(op: Op, names: dict[Quantity, str]) -> tuple[str, str]:
    """(left, right) halves of an op line, split at ``=`` for alignment."""
    left = ", ".join(names[o] for o in op.outputs) or "_"
    args = []
    for r in op.reads:
        n = names[r.node]
        args.append(f"carried {n}" if r.source == "slot" else n)
    inner = ", ".join(args)
    if op.attrs:
        inner += ("; " if inner else "") + format_attrs(op.attrs)
    callee = op.op if op.name == op.op or op.role == "provider" else f"{op.op}:{op.name}"
    right = f"{callee}({inner})"
    if op.writes:
        if set(op.writes) == set(op.outputs):
            right += " -> carried"
        else:
            right += " -> carried " + ", ".join(names[w] for w in op.writes)
    if op.guard:
        right += f" if {op.guard}"
    return left, right


def format_phase(phase: Phase, names: dict[Quantity, str]) -> list[str]:
    provs = ", ".join(phase.providers) if phase.providers else "-"
    lines = [f"phase {phase.index} {phase.header} [{provs}]"]
    rows = [format_op(op, names) for op in phase.ops]
    width = max((len(a) for a, _ in rows), default=0)
    lines += [f"  {a.ljust(width)} = {b}" for a, b in rows]
    return lines
