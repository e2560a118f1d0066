"""Graph views of a scheduled phase, and the verifier every planner result must pass."""

from __future__ import annotations

from collections.abc import Iterable

import networkx as nx

from curvplan.ir._errors import PlanVerifyError
from curvplan.ir._quantity import Quantity
from curvplan.ir._schedule import Phase


def phase_graph(phase: Phase) -> nx.DiGraph:
    """Bipartite DAG of a phase: op nodes ``("op", name)`` and value nodes ``("q", quantity)``.

    Edges carry ``source`` (``input`` / ``fresh`` / ``slot``) for reads and ``source="write"`` for outputs.
    """
    g = nx.DiGraph()
    for op in phase.ops:
        g.add_node(("op", op.name), op=op)
        for r in op.reads:
            g.add_edge(("q", r.node), ("op", op.name), source=r.source)
        for q in op.outputs:
            g.add_edge(("op", op.name), ("q", q), source="write")
    return g


def verify_phase(phase: Phase, given: Iterable[Quantity] = ()) -> None:
    """Checks the invariants of a scheduled phase; raises `PlanVerifyError` with context on failure.

    - every value is produced by at most one op;
    - every ``fresh`` read is produced by an op scheduled earlier in the same phase;
    - every ``input`` read is params / batch / rng or a given quantity.
    """
    given = set(given)
    produced_at: dict[Quantity, int] = {}
    for i, op in enumerate(phase.ops):
        for r in op.reads:
            if r.source == "fresh" and r.node not in produced_at:
                _fail(phase, i, f"{op.name} reads {r.node.name} fresh but no earlier op in the phase produces it")
            if r.source == "input" and not (r.node.is_input or r.node in given):
                _fail(phase, i, f"{op.name} reads {r.node.name} as an input but it is not one")
        for q in op.outputs:
            if q in produced_at:
                _fail(phase, i, f"{q.name} is produced twice (ops {produced_at[q]} and {i})")
            produced_at[q] = i


def _fail(phase: Phase, at: int, msg: str) -> None:
    lines = []
    for i in range(max(0, at - 3), min(len(phase.ops), at + 4)):
        op = phase.ops[i]
        mark = ">" if i == at else " "
        outs = ", ".join(q.name for q in op.outputs)
        ins = ", ".join(r.node.name for r in op.reads)
        lines.append(f"{mark} {outs} = {op.op}({ins})")
    raise PlanVerifyError(
        msg + f"\nwhile verifying phase {phase.index}:\n" + "\n".join(lines),
        fix="this is a planner bug; please report it with the module list",
    ) from None
