"""`diff_plans`: what changed between two plans, as data and as a unified diff of their texts."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PlanDiff:
    """The difference between two plans. Falsy when they are equal.

    Attributes:
        added / removed: module names (``name: kind @cadence``) only in ``b`` / only in ``a``.
        changed: ``(name, before, after)`` for modules whose configuration changed.
        cadences: ``(module, before, after)`` for modules whose effective cadence changed.
        added_quantities / removed_quantities: ``(name, cadence)`` of values computed only in ``b`` / ``a``.
        phases: ``("-"|"+", header)`` for phase headers that disappeared / appeared.
        placement: ``(before, after)`` summaries of where the plans run (`Placement.summary`; ``"one device"``
            for a plan without placement) when they differ, else ``()``.
        text: unified diff of the canonical texts, phase headers as hunk context.
    """

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[tuple[str, str, str], ...]
    cadences: tuple[tuple[str, str, str], ...]
    added_quantities: tuple[tuple[str, str], ...]
    removed_quantities: tuple[tuple[str, str], ...]
    phases: tuple[tuple[str, str], ...]
    placement: tuple[str, ...]
    text: str

    def __bool__(self) -> bool:
        return bool(self.text or self.added or self.removed or self.changed or self.cadences or self.placement)

    def __str__(self) -> str:
        return self.text


def _modules(plan: Any) -> dict[str, tuple[str, str]]:
    out = {}
    for m in plan.modules:
        cfg = ", ".join(f"{k}={v}" for k, v in m.config())
        out[m.label] = (f"{m.kind}({cfg})", plan.cadence_of(m.label))
    return out


def _headers(plan: Any) -> list[str]:
    return [ph.header + " [" + ", ".join(ph.providers) + "]" for ph in plan.phases]


def _placement(plan: Any) -> str:
    placement = getattr(plan, "placement", None)
    return "one device" if placement is None else placement.summary


def _unified(a: str, b: str, label_a: str, label_b: str) -> str:
    la, lb = a.splitlines(), b.splitlines()
    if la == lb:
        return ""
    out = [f"--- {label_a}", f"+++ {label_b}"]
    sm = difflib.SequenceMatcher(a=la, b=lb, autojunk=False)
    for group in sm.get_grouped_opcodes(1):
        i1 = group[0][1]
        context = next((la[i] for i in range(i1, -1, -1) if i < len(la) and la[i].startswith("phase ")), "")
        if not context:
            j1 = group[0][3]
            context = next((lb[j] for j in range(j1, -1, -1) if j < len(lb) and lb[j].startswith("phase ")), "")
        out.append(f"@@ {context or la[0] if la else ''} @@".replace("@@  @@", "@@ @@"))
        for tag, a1, a2, b1, b2 in group:
            if tag == "equal":
                out += [" " + x for x in la[a1:a2]]
            else:
                out += ["-" + x for x in la[a1:a2]]
                out += ["+" + x for x in lb[b1:b2]]
    return "\n".join(out)


def diff_plans(a: Any, b: Any) -> PlanDiff:
    """Compares two plans.

    Examples:
        >>> import curvplan as cp
        >>> from curvplan.ir.toy import Toy
        >>> sgd = Toy(name="sgd", reads=("grad",), makes=("update",))
        >>> probe = Toy(name="probe", reads=("loss",), makes=("stat",), is_sink=True, every=5)
        >>> d = cp.diff_plans(cp.compile_plan([sgd]), cp.compile_plan([sgd, probe]))
        >>> bool(d), d.added, d.added_quantities
        (True, ('probe: toy @every(5)',), (('%stat', '@every(5)'),))
    """
    ma, mb = _modules(a), _modules(b)
    added = tuple(f"{n}: {b.module(n).kind} {mb[n][1]}" for n in sorted(set(mb) - set(ma)))
    removed = tuple(f"{n}: {a.module(n).kind} {ma[n][1]}" for n in sorted(set(ma) - set(mb)))
    both = sorted(set(ma) & set(mb))
    changed = tuple((n, ma[n][0], mb[n][0]) for n in both if ma[n][0] != mb[n][0])
    cadences = tuple((n, ma[n][1], mb[n][1]) for n in both if ma[n][1] != mb[n][1])
    qa, qb = a.quantity_cadences(), b.quantity_cadences()
    added_q = tuple((q, qb[q]) for q in sorted(set(qb) - set(qa)))
    removed_q = tuple((q, qa[q]) for q in sorted(set(qa) - set(qb)))
    ha, hb = _headers(a), _headers(b)
    phases = tuple(("-", h) for h in ha if h not in hb) + tuple(("+", h) for h in hb if h not in ha)
    where = (_placement(a), _placement(b))
    text = _unified(str(a), str(b), f"a/{a.name}", f"b/{b.name}")
    return PlanDiff(added, removed, changed, cadences, added_q, removed_q, phases,
                    where if where[0] != where[1] else (), text)
