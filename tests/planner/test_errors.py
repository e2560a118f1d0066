"""Every planning error says what went wrong and names the module(s) and quantity involved."""

from __future__ import annotations

import pydantic
import pytest

import curvplan as cp
from curvplan.ir import quantities as q
from curvplan.ir.toy import Toy

SGD = Toy(name="sgd", reads=("grad",), makes=("update",))


def raises(exc, mods, **kw) -> str:
    with pytest.raises(exc) as info:
        cp.compile_plan(mods, **kw)
    err = info.value
    assert isinstance(err, cp.PlanError) and isinstance(err, cp.Error)
    assert err.what and err.where and err.fix, "an error says what, where and how to fix it"
    return str(err)


def test_missing_producer():
    msg = raises(cp.MissingProducerError, [Toy(name="direction", reads=("grad", "v"), makes=("update",))])
    assert "`direction`" in msg and "%v" in msg
    assert "register_provider" in msg


def test_missing_producer_suggests_quantities_of_the_same_kind():
    mods = [Toy(name="dir", reads=("diag.gnb",), makes=("update",)),
            Toy(name="est", reads=("grad",), makes=("diag.hessian",))]
    msg = raises(cp.MissingProducerError, mods)
    assert "`dir`" in msg and "%diag.gnb" in msg and "produced here: %diag.hessian" in msg


def test_ambiguous_producer():
    mods = [
        Toy(name="hutchinson", reads=("hvp_op.hessian", "rng"), makes=("diag.hessian",)),
        Toy(name="gnb", reads=("ggn_op.ce",), makes=("diag.hessian",)),
        Toy(name="dir", reads=("grad", "diag.hessian"), makes=("update",)),
    ]
    msg = raises(cp.AmbiguousProducerError, mods)
    assert "`hutchinson`" in msg and "`gnb`" in msg and "%diag.hessian" in msg
    assert "tag=" in msg and "take=" in msg


def test_tag_and_take_resolve_an_ambiguous_producer():
    mods = [
        Toy(name="hutchinson", reads=("hvp_op.hessian", "rng"), makes=("diag.hessian",)),
        Toy(name="gnb", reads=("ggn_op.ce",), makes=("diag.hessian",), tag="gnb"),
        Toy(name="dir", reads=("grad", "diag.hessian"), makes=("update",), take=(("diag.hessian", "gnb"),)),
    ]
    plan = cp.compile_plan(mods)
    (phase,) = plan.phases
    tagged = q.diag("hessian", tag="gnb")
    assert phase.op("gnb").outputs == (tagged,)
    assert [r.node for r in phase.op("dir").reads] == [q.grad(), tagged]
    assert plan.removed == ("hutchinson",)  # nobody takes the untagged estimate
    assert "= toy:gnb(%ggn_op.ce)" in str(plan) and "toy:dir(%grad, %diag.hessian:gnb)" in str(plan)
    assert phase.providers == ("linearize_model",)


def test_cycle():
    mods = [
        Toy(name="a", reads=("grad", "y"), makes=("x",)),
        Toy(name="b", reads=("x",), makes=("y",)),
        Toy(name="dir", reads=("x",), makes=("update",)),
    ]
    msg = raises(cp.CycleError, mods)
    assert "`a` --%x-->" in msg and "`b` --%y-->" in msg  # the cycle, edge by edge
    assert "carried(" in msg
    # reading one side carried breaks the cycle
    mods[0] = Toy(name="a", reads=("grad", "y"), carry=("y",), makes=("x",))
    cp.compile_plan(mods)


def test_cycle_message_reads_as_one_chain():
    mods = [Toy(name="a", reads=("grad", "y"), makes=("x",)),
            Toy(name="b", reads=("x",), makes=("update", "y"))]
    msg = raises(cp.CycleError, mods)
    assert "`a` --%x--> `b` --%y--> `a`" in msg, msg


def test_self_cycle():
    msg = raises(cp.CycleError, [Toy(name="m", reads=("grad", "x"), makes=("x", "update"))])
    assert "`m`" in msg and "%x" in msg


def test_cadence():
    mods = [
        Toy(name="ema", reads=("loss",), makes=("v",), every=10),
        Toy(name="dir", reads=("grad", "v"), makes=("update",)),
    ]
    msg = raises(cp.CadenceError, mods)
    assert "`ema`" in msg and "`dir`" in msg and "%v" in msg and "@every(10)" in msg
    assert "step 1" in msg
    # the fixes the message offers all work; `dir` makes the update, which runs every step, so giving it
    # ema's cadence is not offered (and is refused)
    cp.compile_plan([Toy(name="ema", reads=("loss",), makes=("v",)), mods[1]])
    cp.compile_plan([mods[0], Toy(name="dir", reads=("grad", "v"), carry=("v",), makes=("update",))])
    assert "make `dir` run only" not in msg
    msg = raises(cp.CadenceError, [mods[0], Toy(name="dir", reads=("grad", "v"), makes=("update",), every=10)])
    assert "`dir` produces %update" in msg and "MultiSteps" in msg
    # a consumer that does not make the update may take the producer's cadence
    side = [mods[0], Toy(name="side", reads=("v",), makes=("z",), is_sink=True), Toy(name="sgd", reads=("grad",),
                                                                                     makes=("update",))]
    msg = raises(cp.CadenceError, side)
    assert "make `side` run only on @every(10)" in msg
    cp.compile_plan([side[0], Toy(name="side", reads=("v",), makes=("z",), is_sink=True, every=10), side[2]])


def test_duplicate_name():
    msg = raises(cp.DuplicateNameError, [SGD, Toy(name="sgd", reads=("loss",), makes=("z",), is_sink=True)])
    assert "'sgd'" in msg
    # equal modules under one name are not an error: they are merged
    assert len(cp.compile_plan([SGD, SGD.model_copy()]).modules) == 1


def test_config_error_keeps_pydantic_text_and_names_the_module():
    with pytest.raises(cp.ConfigError) as info:
        Toy(name="bad_toy", reads=3)
    msg = str(info.value)
    assert "`bad_toy`" in msg and "Toy" in msg
    assert "reads" in msg and "Input should be a valid tuple" in msg  # pydantic's own text
    assert isinstance(info.value.__cause__, pydantic.ValidationError)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "fields, text",
    [
        (dict(every=0), "greater than or equal to 1"),
        (dict(every=3, offset=5), "offset=5 must be smaller than every=3"),
        (dict(start=5, stop=3), "start=5 must be smaller than stop=3"),
        (dict(every=2, cadence=cp.Cadence(every=3)), "not both"),
        (dict(bogus=1), "Extra inputs are not permitted"),
    ],
)
def test_config_errors(fields, text):
    with pytest.raises(cp.ConfigError) as info:
        Toy(name="bad", **fields)
    assert text in str(info.value) and "`bad`" in str(info.value)


def test_config_error_of_an_unnamed_module_names_its_kind():
    with pytest.raises(cp.ConfigError, match="`toy`"):
        Toy(makes=5)


def test_period():
    mods = [
        Toy(name="a", reads=("grad",), makes=("y",), is_sink=True, every=997),
        Toy(name="b", reads=("loss",), makes=("z",), is_sink=True, every=1009),
    ]
    msg = raises(cp.PeriodError, mods)
    assert "`a` @every(997)" in msg and "`b` @every(1009)" in msg
    assert "1005973" in msg  # 997 * 1009
    # a larger limit lets it through (planning stays lazy about the table's contents)
    assert cp.compile_plan(mods[:1], max_period=1000).period == 997


def test_non_module_in_the_list():
    with pytest.raises(cp.PlanError) as info:
        cp.compile_plan([SGD, "sgd"])
    assert "item 1" in str(info.value) and "str" in str(info.value)
    assert type(info.value) is cp.PlanError


def test_carried_provider_quantity():
    mods = [SGD, Toy(name="probe", reads=("loss",), carry=("loss",), makes=("z",), is_sink=True)]
    msg = raises(cp.PlanError, mods)
    assert "`probe`" in msg and "%loss" in msg and "carried" in msg
