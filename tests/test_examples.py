"""Every script in ``examples/`` runs here at a small size, and what it claims is checked against a reference."""

from __future__ import annotations

import importlib
import pathlib
import sys

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def example():
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield lambda name: importlib.import_module(name)
    finally:
        sys.path.remove(str(EXAMPLES))


def test_every_example_has_a_test():
    tested = {"flax_nnx", "equinox_mlp", "grad_accumulation", "char_lm", "least_squares", "orbax_checkpoint"}
    scripts = {p.stem for p in EXAMPLES.glob("*.py")} - {"common"}
    assert scripts == tested


def test_flax_nnx_trains_with_a_scheduled_learning_rate(example):
    out = example("flax_nnx").main(["--steps", "30", "--batch-size", "64"])
    assert out["losses"][-1] < 0.6 * out["losses"][0]
    # the schedule reached the optimizer through inject_hyperparams: warm-up cosine at its last step is ~0
    import optax

    sched = optax.warmup_cosine_decay_schedule(0.0, 0.02, 3, 30)
    np.testing.assert_allclose(out["final_lr"], float(sched(29)), rtol=1e-5)  # the rate of the last update


def test_equinox_trains(example):
    out = example("equinox_mlp").main(["--steps", "30", "--batch-size", "64"])
    assert out["losses"][-1] < 0.6 * out["losses"][0]


@pytest.fixture
def float64():
    import jax

    prev = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", prev)


def test_multisteps_equals_the_big_batch(example, float64):
    out = example("grad_accumulation").main(["--steps", "4", "--micro-batch", "16", "--k", "3"])
    assert out["inner_steps"] == 4  # the curvplan state advanced once per k micro-batches
    # the same trajectory up to float64 rounding (amplified by the roots); a state that advanced on every
    # micro-batch, or saw one micro-batch's gradient, would differ at the size of the steps themselves
    assert out["relative_diff"] < 1e-4


def test_char_lm_runs_every_method(example):
    out = example("char_lm").main(["--steps", "4", "--eval-every", "2", "--batch-size", "4", "--plot", ""])
    assert set(out) == {"adamw", "muon", "soap", "adaptive_schatten"}
    for r in out.values():
        assert np.isfinite(r["final"]) and r["final"] < r["curve"][0][1]


def test_least_squares_matches_scipy(example):
    out = example("least_squares").main(["--steps", "40", "--points", "100"])
    assert out["max_rel_diff"] < 1e-6
    np.testing.assert_allclose(out["cost"], out["scipy_cost"], rtol=1e-9)


def test_orbax_resume_is_bit_exact(example):
    out = example("orbax_checkpoint").main(["--steps", "8", "--save-at", "3"])
    assert out["identical"] and out["step"] == 8
