"""A placed plan: the same plan plus a placement section, carried through dicts and shown by `diff_plans`."""

import pytest

import curvplan as cp


def shampoo():
    return cp.presets.shampoo(learning_rate=1e-3, root_every=5)


def test_placed_plan_differs_only_in_placement():
    one = cp.compile_plan(shampoo(), name="s")
    eight = cp.compile_plan(shampoo(), name="s", mesh={"data": 8})
    assert one.fingerprint == eight.fingerprint  # the schedule and the modules are the same plan
    text_one, text_eight = str(one).splitlines(), str(eight).splitlines()
    assert text_eight[: len(text_one)] == text_one
    assert text_eight[len(text_one):] == [
        "placement: mesh data=8 (8 devices)",
        "  batch over (data): %grad, %loss (means over the global batch)",
        "  blocks over (data): grad_gram, gram_eigbasis, shampoo",
        "  state: shaped like a sharded parameter follows it; the rest split over (data)",
    ]
    d = cp.diff_plans(one, eight)
    assert d and not (d.added or d.removed or d.changed or d.cadences or d.phases)
    assert d.placement == ("one device", "mesh data=8; batch over (data); blocks over (data): grad_gram, gram_eigbasis, shampoo")
    assert all(line[1:].startswith(("placement:", "  ")) for line in d.text.splitlines()
               if line[:1] in "+-" and not line.startswith(("+++", "---")))


def test_second_axis_splits_blocks_not_the_batch():
    p = cp.compile_plan(shampoo(), mesh={"data": 4, "model": 2})
    assert p.placement.batch_axes == ("data",)
    assert p.placement.block_axes == ("data", "model")
    assert p.placement.shares(p.placement.block_axes) == 8
    assert cp.diff_plans(p, cp.compile_plan(shampoo(), mesh={"data": 8})).placement[0].startswith(
        "mesh data=4 model=2")


def test_placement_survives_a_dict_round_trip():
    p = cp.compile_plan(shampoo(), mesh={"data": 4, "model": 2}, batch_axes=("data",))
    q = cp.Plan.from_dict(p.to_dict())
    assert q.placement == p.placement
    assert str(q) == str(p)
    assert not cp.diff_plans(p, q)


@pytest.mark.parametrize("mesh, batch_axes", [({"data": 8}, "model"), ({"data": 0}, None), ({}, None),
                                              ({"data": 2, "model": 2}, ("data", "data"))])
def test_bad_mesh_or_batch_axes_are_refused(mesh, batch_axes):
    with pytest.raises(cp.PlanError, match="mesh|batch axes"):
        cp.compile_plan(shampoo(), mesh=mesh, batch_axes=batch_axes)
