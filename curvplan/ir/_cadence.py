"""Cadences: when a module runs.

``Cadence(every=k, offset=o, start=s, stop=e)`` is active at step t when ``s <= t < e`` and
``(t - s - o) % k == 0``. Cadences are normalised so that two cadences with the same active steps are equal
and print the same way:

>>> Cadence(every=10, offset=5)
@every(10,+5)
>>> Cadence(every=10, start=5) == Cadence(every=10, offset=5)
True
>>> Cadence(start=100), Cadence(stop=100), Cadence(stop=1), Cadence(start=7, stop=8)
(@from(100), @until(100), @once, @at(7))
>>> Cadence(every=5, start=10).active(15), Cadence(every=5, start=10).active(16)
(True, False)
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Cadence(BaseModel):
    """When a module runs. See the module docstring for the semantics and printed forms."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    every: int = Field(1, ge=1)
    offset: int = Field(0, ge=0)
    start: int = Field(0, ge=0)
    stop: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _normalise(self) -> Cadence:
        if self.offset >= self.every:
            raise ValueError(f"offset={self.offset} must be smaller than every={self.every}")
        first = self.start + self.offset
        if self.stop is not None:
            if self.stop <= self.start:
                raise ValueError(f"start={self.start} must be smaller than stop={self.stop}")
            if first >= self.stop:
                raise ValueError(f"this cadence is never active: first step {first} >= stop={self.stop}")
        every, offset, start, stop = self.every, self.offset, self.start, self.stop
        if first < every:
            start, offset = 0, first
        else:
            start, offset = first, 0
        if stop is not None:
            last = first + (stop - 1 - first) // every * every
            stop = last + 1
            if last == first:  # a single step
                every, offset, start = 1, 0, first
        object.__setattr__(self, "every", every)
        object.__setattr__(self, "offset", offset)
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "stop", stop)
        return self

    @property
    def first(self) -> int:
        return self.start + self.offset

    def active(self, t: int) -> bool:
        """Whether the cadence runs at step ``t``."""
        if t < self.start or (self.stop is not None and t >= self.stop):
            return False
        return (t - self.start - self.offset) % self.every == 0

    def mask(self, length: int) -> int:
        """Active steps in ``[0, length)`` as a bitmask (bit t set when active at t)."""
        first = self.first
        end = length if self.stop is None else min(length, self.stop)
        if first >= end:
            return 0
        n = (end - 1 - first) // self.every + 1
        k = self.every
        ones = ((1 << (k * n)) - 1) // ((1 << k) - 1)  # bits 0, k, 2k, ... (n of them)
        return ones << first

    def __str__(self) -> str:
        k, o, s, e = self.every, self.offset, self.start, self.stop
        if e is not None and e == self.first + 1:
            return "@once" if self.first == 0 else f"@at({self.first})"
        parts = []
        if k > 1 or (s == 0 and e is None):
            parts.append(f"@every({k},+{o})" if o else f"@every({k})")
        if s > 0:
            parts.append(f"@from({s})")
        if e is not None:
            parts.append(f"@until({e})")
        return "".join(parts)

    __repr__ = __str__

    def __hash__(self) -> int:
        return hash((self.every, self.offset, self.start, self.stop))


EVERY_STEP = Cadence()


def horizon(cadences: Iterable[Cadence]) -> tuple[int, int]:
    """``(prefix, period)``: after ``prefix`` steps, all the cadences together repeat every ``period`` steps."""
    prefix, period = 0, 1
    for c in cadences:
        prefix = max(prefix, c.start + c.offset if c.stop is None else c.stop)
        period = math.lcm(period, c.every)
    return prefix, period


def describe_steps(mask: int, prefix: int, period: int, max_terms: int = 3) -> list[Cadence] | None:
    """Writes a step pattern as a union of cadences, or None if that needs more than ``max_terms``.

    ``mask`` holds the steps in ``[0, prefix + 2 * period)``; beyond ``prefix`` it must repeat with ``period``.
    """
    window = prefix + 2 * period
    if mask == 0:
        return []
    divisors = [d for d in range(1, period + 1) if period % d == 0]
    todo = mask & ((1 << (prefix + period)) - 1)
    terms: list[Cadence] = []
    while todo:
        s = (todo & -todo).bit_length() - 1
        best: Cadence | None = None
        for k in divisors:  # densest infinite progression contained in the pattern
            c = Cadence(every=k, start=s)
            cm = c.mask(window)
            if cm & ~mask == 0:
                best = c
                break
        if best is None:  # a finite run, longest first
            best_cover = 0
            for k in range(1, prefix + period):
                n = 0
                while s + (n + 1) * k < window and (mask >> (s + (n + 1) * k)) & 1:
                    n += 1
                c = Cadence(every=k, start=s, stop=s + n * k + 1)
                cover = (c.mask(window) & todo).bit_count()
                if cover > best_cover:
                    best, best_cover = c, cover
        terms.append(best)
        covered = best.mask(window)
        if best.stop is not None and prefix > 0:
            covered &= (1 << prefix) - 1  # a finite run settles prefix steps only; periodic ones stay to do
        todo &= ~covered
        if len(terms) > max_terms:
            return None
    return sorted(terms, key=lambda c: (c.first, c.every))
