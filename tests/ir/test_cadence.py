"""Cadences: normalisation, printed forms, masks, validation, horizons and `describe_steps`."""

from __future__ import annotations

import math

import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from curvplan.ir import EVERY_STEP, Cadence, describe_steps, horizon

WINDOW = 400  # > every step a cadence below can start or stop at, plus several periods


@st.composite
def cadences(draw, max_every: int = 12, max_start: int = 40) -> Cadence:
    every = draw(st.integers(1, max_every))
    offset = draw(st.integers(0, every - 1))
    start = draw(st.integers(0, max_start))
    stop = None
    if draw(st.booleans()):
        stop = start + offset + draw(st.integers(1, 60))
    return Cadence(every=every, offset=offset, start=start, stop=stop)


@st.composite
def rewrites(draw, c: Cadence) -> Cadence:
    """Another spelling of the same steps as ``c``."""
    first = c.first
    variants = [dict(every=c.every, start=first)]
    if first < c.every:
        variants.append(dict(every=c.every, offset=first))
    if first >= c.every:  # an earlier start plus an offset
        variants.append(dict(every=c.every, start=first - c.every + 1, offset=c.every - 1))
    v = dict(draw(st.sampled_from(variants)))
    if c.stop is not None:
        v["stop"] = c.stop + draw(st.integers(0, c.every - 1))  # anything up to the next (missing) step
    return Cadence(**v)


def steps(c: Cadence, n: int = WINDOW) -> tuple[int, ...]:
    return tuple(t for t in range(n) if c.active(t))


# -- printed forms and normalisation ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fields, text",
    [
        ({}, "@every(1)"),
        (dict(every=10), "@every(10)"),
        (dict(every=10, offset=5), "@every(10,+5)"),
        (dict(every=10, start=5), "@every(10,+5)"),
        (dict(every=10, start=15), "@every(10)@from(15)"),
        (dict(every=10, start=10), "@every(10)@from(10)"),
        (dict(start=100), "@from(100)"),
        (dict(stop=100), "@until(100)"),
        (dict(stop=1), "@once"),
        (dict(every=10, stop=5), "@once"),
        (dict(start=7, stop=8), "@at(7)"),
        (dict(every=10, offset=7, stop=9), "@at(7)"),
        (dict(every=5, start=10, stop=30), "@every(5)@from(10)@until(26)"),
        (dict(every=2, stop=6), "@every(2)@until(5)"),
        (dict(every=10, offset=5, stop=30), "@every(10,+5)@until(26)"),
        (dict(start=3, stop=9), "@from(3)@until(9)"),
    ],
)
def test_printed_forms(fields, text):
    c = Cadence(**fields)
    assert str(c) == repr(c) == text


def test_equal_step_sets_are_equal_cadences():
    assert Cadence(every=10, start=5) == Cadence(every=10, offset=5)
    assert Cadence(every=2, stop=6) == Cadence(every=2, stop=5)
    assert Cadence(every=10, stop=3) == Cadence(stop=1) == Cadence(every=3, stop=1)
    assert hash(Cadence(every=10, start=5)) == hash(Cadence(every=10, offset=5))
    assert Cadence(every=10, start=5) != Cadence(every=10, start=15)
    assert EVERY_STEP == Cadence() == Cadence(every=1, offset=0, start=0, stop=None)


def test_normalised_fields():
    c = Cadence(every=10, start=25)
    assert (c.every, c.offset, c.start, c.stop, c.first) == (10, 0, 25, None, 25)
    c = Cadence(every=10, start=3, offset=4)
    assert (c.every, c.offset, c.start, c.first) == (10, 7, 0, 7)
    c = Cadence(every=4, start=2, stop=100)
    assert (c.every, c.offset, c.start, c.stop) == (4, 2, 0, 99)
    c = Cadence(every=8, start=20, stop=25)  # a single step
    assert (c.every, c.offset, c.start, c.stop) == (1, 0, 20, 21)


@settings(max_examples=300, deadline=None)
@given(cadences(), cadences())
def test_printed_equal_iff_same_steps(a, b):
    assert (str(a) == str(b)) == (steps(a) == steps(b))
    assert (a == b) == (steps(a) == steps(b))
    if a == b:
        assert hash(a) == hash(b)


@settings(max_examples=300, deadline=None)
@given(cadences().flatmap(lambda c: st.tuples(st.just(c), rewrites(c))))
def test_rewrites_print_the_same(pair):
    a, b = pair
    assert steps(a) == steps(b)
    assert str(a) == str(b) and a == b


@settings(max_examples=100, deadline=None)
@given(cadences())
def test_printed_form_round_trips_through_fields(c):
    again = Cadence(every=c.every, offset=c.offset, start=c.start, stop=c.stop)
    assert again == c and str(again) == str(c)
    assert Cadence.model_validate(c.model_dump()) == c


# -- mask and active -------------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(cadences(max_every=50), st.integers(0, 250))
def test_mask_agrees_with_active(c, length):
    m = c.mask(length)
    assert m >> length == 0
    assert [t for t in range(length) if (m >> t) & 1] == [t for t in range(length) if c.active(t)]


def test_mask_examples():
    assert Cadence(every=3).mask(10) == 0b1001001001
    assert Cadence(every=3, offset=1).mask(10) == 0b0010010010
    assert Cadence(start=4, stop=6).mask(10) == 0b110000
    assert Cadence(start=20).mask(10) == 0
    assert Cadence().mask(0) == 0
    assert not Cadence(stop=5).active(5) and Cadence(stop=5).active(4)
    assert not Cadence(every=5, start=10).active(5) and Cadence(every=5, start=10).active(15)


# -- validation -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fields, text",
    [
        (dict(every=0), "greater than or equal to 1"),
        (dict(offset=-1), "greater than or equal to 0"),
        (dict(start=-1), "greater than or equal to 0"),
        (dict(stop=0), "greater than or equal to 1"),
        (dict(every=3, offset=3), "offset=3 must be smaller than every=3"),
        (dict(start=5, stop=5), "start=5 must be smaller than stop=5"),
        (dict(every=10, offset=5, stop=3), "never active"),
        (dict(every=2.5), "valid integer"),
        (dict(period=3), "Extra inputs are not permitted"),
    ],
)
def test_validation_errors(fields, text):
    with pytest.raises(pydantic.ValidationError, match=text):
        Cadence(**fields)


def test_cadences_are_frozen():
    c = Cadence(every=10)
    with pytest.raises(pydantic.ValidationError):
        c.every = 5  # type: ignore[misc]
    assert c.every == 10


# -- horizon ----------------------------------------------------------------------------------------------
def test_horizon():
    assert horizon([]) == (0, 1)
    assert horizon([Cadence(every=10), Cadence(every=4)]) == (0, 20)
    assert horizon([Cadence(every=10, offset=3), Cadence(start=100)]) == (100, 10)
    assert horizon([Cadence(stop=150), Cadence(every=5, start=12)]) == (150, 5)


@settings(max_examples=200, deadline=None)
@given(st.lists(cadences(), min_size=1, max_size=4))
def test_after_the_horizon_every_cadence_repeats(cs):
    prefix, period = horizon(cs)
    assert period == math.lcm(*(c.every for c in cs))
    for c in cs:
        for t in range(prefix, prefix + 2 * period):
            assert c.active(t) == c.active(t + period)


# -- describe_steps -----------------------------------------------------------------------------------------
@st.composite
def step_patterns(draw) -> tuple[int, int, int]:
    """(mask over [0, prefix + 2 * period), prefix, period), periodic after prefix."""
    prefix = draw(st.integers(0, 25))
    period = draw(st.sampled_from([1, 2, 3, 4, 5, 6, 10, 12]))
    head = draw(st.integers(0, (1 << prefix) - 1))
    cycle = draw(st.integers(0, (1 << period) - 1))
    mask = head
    for t in range(prefix, prefix + 2 * period):
        if (cycle >> ((t - prefix) % period)) & 1:
            mask |= 1 << t
    return mask, prefix, period


def pattern_steps(mask: int, prefix: int, period: int, n: int) -> list[int]:
    """The steps of the infinite pattern below ``n``."""
    def rep(t: int) -> int:
        return t if t < prefix + period else prefix + (t - prefix) % period

    return [t for t in range(n) if (mask >> rep(t)) & 1]


@settings(max_examples=400, deadline=None)
@given(step_patterns())
def test_describe_steps_is_exact(pattern):
    mask, prefix, period = pattern
    terms = describe_steps(mask, prefix, period, max_terms=10**6)
    assert terms is not None
    n = prefix + 6 * period
    got = [t for t in range(n) if any(c.active(t) for c in terms)]
    want = pattern_steps(mask, prefix, period, n)
    assert got == want, f"{terms} for {bin(mask)} (prefix {prefix}, period {period})"


@settings(max_examples=200, deadline=None)
@given(step_patterns())
def test_describe_steps_with_few_terms_is_exact_or_none(pattern):
    mask, prefix, period = pattern
    terms = describe_steps(mask, prefix, period)
    if terms is not None:
        assert len(terms) <= 3
        n = prefix + 6 * period
        got = [t for t in range(n) if any(c.active(t) for c in terms)]
        assert got == pattern_steps(mask, prefix, period, n)


@settings(max_examples=200, deadline=None)
@given(st.lists(cadences(max_every=6, max_start=20), min_size=1, max_size=1))
def test_describe_steps_of_one_cadence_is_that_cadence(cs):
    (c,) = cs
    prefix, period = horizon(cs)
    assert describe_steps(c.mask(prefix + 2 * period), prefix, period) == [c]


def test_describe_steps_examples():
    assert describe_steps(0, 5, 10) == []
    assert describe_steps(Cadence(every=10).mask(20), 0, 10) == [Cadence(every=10)]
    both = Cadence(every=10).mask(20) | Cadence(every=10, offset=5).mask(20)
    assert describe_steps(both, 0, 10) == [Cadence(every=5)]
    nine = sum(1 << t for t in range(20) if t % 10)
    assert describe_steps(nine, 0, 10) is None  # nine terms
    assert len(describe_steps(nine, 0, 10, max_terms=9)) == 5  # @every(2,+1), @every(5,+2), ...


def test_describe_steps_keeps_periodic_steps_after_a_finite_run():
    """Steps 0, 1, 2, 3 then every other step from 3 (prefix 3, period 2): a finite run must not swallow 3."""
    mask = sum(1 << t for t in (0, 1, 2, 3, 5))
    terms = describe_steps(mask, 3, 2)
    assert terms is not None
    got = [t for t in range(20) if any(c.active(t) for c in terms)]
    assert got == [0, 1, 2, 3, 5, 7, 9, 11, 13, 15, 17, 19], terms


def test_describe_steps_finds_strided_finite_runs():
    """Steps 0, 10, ..., 90 are one cadence, even when the steps right after 0 are not in the pattern."""
    mask = Cadence(every=10, stop=91).mask(170)
    assert describe_steps(mask, 150, 10) == [Cadence(every=10, stop=91)]
