"""Quantities: hash-consing, equality, immutability, printed names and (de)serialisation."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from curvplan.ir import Quantity
from curvplan.ir import quantities as q


def test_hash_consing():
    assert q.grad() is q.grad() is Quantity("grad")
    assert q.hvp_op("hessian") is Quantity("hvp_op", "hessian")
    assert q.diag("hessian", est="hutchinson", probes=1) is q.diag("hessian", probes=1, est="hutchinson")
    assert Quantity("k", None, {"b": 1, "a": 2}) is Quantity("k", None, [("a", 2), ("b", 1)])
    assert Quantity("k", None, {"t": [1, 2]}) is Quantity("k", None, {"t": (1, 2)})  # lists become tuples
    assert q.kron("grad_gram", scope="matrices") is q.kron("grad_gram", scope="matrices")


def test_equality_and_hash():
    a, b = q.grad(), q.grad("matrices")
    assert a != b and a == q.grad() and hash(a) == hash(q.grad())
    assert a != "grad" and a != ("grad", None, (), "all")
    assert q.diag("hessian", probes=1) != q.diag("hessian", probes=2) != q.diag("hessian")
    assert len({q.grad(), Quantity("grad"), q.loss()}) == 2
    assert sorted([q.loss(), q.grad(), q.activations()]) == [q.activations(), q.grad(), q.loss()]


def test_copies_and_pickles_are_the_same_object():
    x = q.diag("hessian", est="hutchinson", probes=1)
    assert copy.copy(x) is x and copy.deepcopy(x) is x
    assert pickle.loads(pickle.dumps(x)) is x


def test_immutable():
    x = Quantity("immutability_probe", "s", {"a": 1})
    with pytest.raises(AttributeError):
        x.kind = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        x.new_field = 1  # type: ignore[attr-defined]
    assert x.kind == "immutability_probe"


def test_attributes_cannot_be_deleted():
    """Deleting a field of a hash-consed quantity would break every holder of the shared object."""
    x = Quantity("deletion_probe", "s")
    with pytest.raises(AttributeError):
        del x.kind  # type: ignore[misc]
    assert Quantity("deletion_probe", "s").kind == "deletion_probe"


def test_numerically_equal_attributes_of_other_types_print_as_given():
    """``1``, ``1.0`` and ``True`` compare equal in Python; the cached quantity must not depend on which one
    was built first."""
    first = Quantity("hash_cons_types", None, {"beta": 1})
    later = Quantity("hash_cons_types", None, {"beta": 1.0})
    assert repr(first) == "hash_cons_types[beta=1]"
    assert repr(later) == "hash_cons_types[beta=1.0]", "the printed form depends on construction history"
    one = Quantity("hash_cons_bool", None, {"flag": 1})
    assert Quantity("hash_cons_bool", None, {"flag": True}) is not one


@pytest.mark.parametrize(
    "x, name, text",
    [
        (q.loss(), "%loss", "loss"),
        (q.grad(), "%grad", "grad"),
        (q.grad("matrices"), "%grad[matrices]", "grad@matrices"),
        (q.hvp_op("hessian"), "%hvp_op.hessian", "hvp_op[hessian]"),
        (q.ggn_op("ce"), "%ggn_op.ce", "ggn_op[ce]"),
        (q.diag("hessian", est="hutchinson", probes=1), "%diag.hessian",
         "diag[hessian; est=hutchinson, probes=1]"),
        (q.kron("grad_gram"), "%kron.grad_gram", "kron[grad_gram]"),
        (q.eigbasis(q.kron("grad_gram")), "%eigbasis.grad_gram", "eigbasis[grad_gram; of=kron]"),
        (q.direction("newton", scope="matrices"), "%direction.newton[matrices]",
         "direction[newton]@matrices"),
        (q.quantity("stat", beta=0.5), "%stat", "stat[beta=0.5]"),
        (q.quantity("x", tag="gnb"), "%x:gnb", "x[tag=gnb]"),
        (q.quantity("x", instance="m"), "%x/m", "x[instance=m]"),
        (q.quantity("x", window=(1, 2)), "%x", "x[window=(1,2)]"),
        (q.lam(), "%lambda", "lambda"),
        (q.params(), "params", "params"),
        (q.batch(), "batch", "batch"),
        (q.rng(), "rng", "rng"),
    ],
)
def test_names_and_repr(x, name, text):
    assert x.name == name
    assert repr(x) == text


def test_inputs():
    assert all(x.is_input for x in (q.params(), q.batch(), q.rng()))
    assert not any(x.is_input for x in (q.loss(), q.grad(), q.update()))


def test_attr_replace_with_attrs():
    x = q.diag("hessian", est="hutchinson", probes=1)
    assert x.attr("probes") == 1 and x.attr("missing", 7) == 7
    assert x.replace() is x
    assert x.replace(subject="ggn") is q.diag("ggn", est="hutchinson", probes=1)
    assert x.with_attrs(probes=4) is q.diag("hessian", est="hutchinson", probes=4)
    assert x.with_attrs(tag="gnb").name == "%diag.hessian:gnb"
    assert x.attr("probes") == 1  # unchanged


@pytest.mark.parametrize("kind", ["", "has space", "a.b", "x-y", "%grad"])
def test_invalid_kind(kind):
    with pytest.raises(ValueError, match="identifier"):
        Quantity(kind)


def test_invalid_attribute_value():
    with pytest.raises(TypeError, match="must be a str/int/float/bool/None"):
        Quantity("k", None, {"bad": object()})
    with pytest.raises(TypeError):
        Quantity("k", None, {"bad": {"nested": 1}})


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.sampled_from([0.5, 1e-3]), st.text("abc", max_size=3)
)
quantity_st = st.builds(
    Quantity,
    st.sampled_from(["grad", "diag", "kron", "stat_x"]),
    st.one_of(st.none(), st.sampled_from(["hessian", "ggn"])),
    st.dictionaries(
        st.sampled_from(["a", "b", "probes"]), st.one_of(scalars, st.tuples(scalars, scalars)), max_size=3
    ),
    st.sampled_from(["all", "matrices"]),
)


@settings(max_examples=200, deadline=None)
@given(quantity_st)
def test_to_dict_from_dict_round_trip(x):
    assert Quantity.from_dict(x.to_dict()) is x
    assert Quantity.from_dict(json.loads(json.dumps(x.to_dict()))) is x


def test_to_dict_shape():
    d = q.diag("hessian", est="hutchinson", probes=1).to_dict()
    assert d == {
        "kind": "diag", "subject": "hessian", "attrs": [["est", "hutchinson"], ["probes", 1]], "scope": "all"
    }
    assert Quantity.from_dict({"kind": "grad"}) is q.grad()
