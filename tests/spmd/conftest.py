"""The multi-device tests run in a pytest process of their own with 8 simulated CPU devices (`make test` starts
it with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``); started any other way they fail, never skip."""

import os

import jax
import pytest

DEVICES = 8


def pytest_configure(config):
    if "--xla_force_host_platform_device_count=8" not in os.environ.get("XLA_FLAGS", ""):
        raise pytest.UsageError(
            "tests/spmd needs 8 simulated devices set before JAX starts: run "
            "`XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest tests/spmd` (make test does)")


# float64: sharded and single-device runs then differ only by the order of their sums, far below any method's
# sensitivity, so a placement bug cannot hide behind rounding that a method amplifies
jax.config.update("jax_enable_x64", True)


@pytest.fixture(scope="session", autouse=True)
def eight_devices():
    assert jax.device_count() == DEVICES, f"expected {DEVICES} CPU devices, got {jax.devices()}"
