"""`Toy`: a configurable declaration-only module for tests, docs and planner experiments.

>>> from curvplan.ir.toy import Toy
>>> t = Toy(name="ema", reads=("diag.hessian",), makes=("v",), stateful=True, every=10)
>>> [u.quantity.name for u in t.uses()], [x.name for x in t.outputs()], t.state_names()
(['%diag.hessian'], ['%v'], ('s',))
"""

from __future__ import annotations

from typing import Literal

from curvplan.ir._module import ModuleSpec, Use
from curvplan.ir._quantity import Quantity


def parse_spec(spec: str) -> Quantity:
    """``"kind"`` or ``"kind.subject"`` -> a quantity."""
    kind, _, subject = spec.partition(".")
    return Quantity(kind, subject or None)


class Toy(ModuleSpec):
    """Reads ``reads`` (fresh, or carried when listed in ``carry``) and makes ``makes``."""

    kind: Literal["toy"] = "toy"
    reads: tuple[str, ...] = ()
    makes: tuple[str, ...] = ()
    carry: tuple[str, ...] = ()
    stateful: bool = False
    is_sink: bool = False
    attrs: tuple[tuple[str, int | float | str], ...] = ()
    """Extra settings, printed as op attributes (e.g. ``(("beta", 0.99),)``)."""

    def consumes(self):
        return {f"in{i}": Use(parse_spec(s), "carried" if s in self.carry else "fresh")
                for i, s in enumerate(self.reads)}

    def produces(self):
        return {f"out{i}": parse_spec(s) for i, s in enumerate(self.makes)}

    def config(self):
        """Only ``attrs`` are printed, to keep toy plans short."""
        return tuple(sorted(self.attrs))

    def state_names(self) -> tuple[str, ...]:
        """A declaration-only module has no ``init`` to read its state from: ``stateful`` says it."""
        return ("s",) if self.stateful else ()

    @property
    def sink(self) -> bool:  # type: ignore[override]
        return self.is_sink
