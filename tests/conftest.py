import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import pytest


@pytest.fixture(scope="module")
def x64():
    """float64 for a whole test module (dense references), restored afterwards."""
    import jax

    prev = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", prev)

# Planner / IR defects found by these tests and not fixed yet. Each is a strict xfail: it is reported as
# xfailed (never as passed), and the suite fails as soon as a fix makes it pass, so the entry must go.
KNOWN_BUGS = {
    "tests/planner/test_properties.py::test_to_dict_from_dict_round_trip": "removed modules lost in to_dict",
    "tests/planner/test_properties.py::test_removed_modules_do_not_change_the_period":
        "horizon uses cadences of removed modules",
    "tests/planner/test_properties.py::test_removed_consumers_do_not_set_a_producers_cadence":
        "propagation counts consumers that never run",
    "tests/planner/test_properties.py::test_a_removed_carried_reader_does_not_keep_its_producer":
        "liveness counts carried readers that never run",
    "tests/planner/test_properties.py::test_round_trip_with_removed_modules[True]": "removed modules lost in to_dict",
    "tests/planner/test_properties.py::test_round_trip_with_removed_modules[False]": "removed modules lost in to_dict",
    "tests/planner/test_properties.py::test_carried_read_sees_the_same_value_in_every_phase_and_in_the_baseline":
        "carried read resolution (fresh vs slot) differs between phases / baseline",
    "tests/planner/test_properties.py::test_carried_read_resolution_does_not_depend_on_names":
        "carried edges are added in name order, so names decide which read becomes a slot read",
    "tests/planner/test_properties.py::test_renaming_modules_changes_nothing_but_names":
        "carried edges are added in name order, so names decide which read becomes a slot read",
    "tests/planner/test_properties.py::test_unplanned_baseline_reads_the_same_values":
        "carried read resolution (fresh vs slot) can differ between the plan and its baseline",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        reason = KNOWN_BUGS.get(item.nodeid)
        if reason:
            item.add_marker(pytest.mark.xfail(strict=True, reason="known bug: " + reason))

