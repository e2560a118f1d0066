from __future__ import annotations

from typing import Literal

import jax
from pydantic import model_validator

from curvplan.ir import fresh
from curvplan.ir import quantities as q
from curvplan.ir._errors import ConfigError
from curvplan.modules._base import Module


class Combine(Module):
    """A weighted sum of directions: ``%direction.<target> = Σ_i weights[i] · %direction.<sources[i]>``.

    Lets two methods that share quantities (e.g. Shampoo and SOAP on one gradient Gram) drive one update.

    >>> from curvplan.modules import Combine
    >>> [u.quantity.name for u in Combine(sources=("shampoo", "soap")).uses()]
    ['%direction.shampoo', '%direction.soap']
    """

    kind: Literal["combine"] = "combine"
    sources: tuple[str, ...]
    weights: tuple[float, ...] | None = None
    """Default: equal weights summing to one."""
    target: str = "mix"

    @model_validator(mode="after")
    def _check(self):
        if len(self.sources) < 1 or (self.weights is not None and len(self.weights) != len(self.sources)):
            raise ConfigError(f"{len(self.sources)} sources but weights={self.weights}",
                              fix="give one weight per source, or none for equal weights")
        if self.target in self.sources:
            raise ConfigError(f"target {self.target!r} is also a source",
                              fix="name the combined direction differently (target=...)")
        return self

    def consumes(self):  # one input per source, by position (a source may repeat)
        return {f"direction_{i}": fresh(q.direction(s)) for i, s in enumerate(self.sources)}

    def produces(self):
        return {"direction": q.direction(self.target)}

    def apply(self, inputs, state, ctx):
        weights = self.weights or (1.0 / len(self.sources),) * len(self.sources)
        dirs = [inputs[f"direction_{i}"] for i in range(len(self.sources))]
        out = jax.tree.map(lambda *xs: sum(w * x for w, x in zip(weights, xs)), *dirs)
        return {"direction": out}, state
