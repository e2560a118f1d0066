import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import pytest

# Planner / IR defects found by these tests and not fixed yet. Each is a strict xfail: it is reported as
# xfailed (never as passed), and the suite fails as soon as a fix makes it pass, so the entry must go.
KNOWN_BUGS = {
    "tests/ir/test_quantity.py::test_attributes_cannot_be_deleted": "Quantity lacks __delattr__ guard",
    "tests/ir/test_quantity.py::test_numerically_equal_attributes_of_other_types_print_as_given":
        "hash-consing merges 1 / 1.0 / True attribute values",
    "tests/planner/test_errors.py::test_cycle_message_reads_as_one_chain": "cycle message format",
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

