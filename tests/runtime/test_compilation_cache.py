"""`enable_compilation_cache`: a second process compiles nothing new, it loads the phase programs from disk."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
import sys, jax, jax.numpy as jnp, curvplan as cp
assert cp.enable_compilation_cache(sys.argv[1], min_compile_time_s=0) == sys.argv[1]
opt = cp.Optimizer(cp.presets.sophia_h(1e-2, hessian_every=2), loss_fn=lambda w, b: jnp.sum((w - b) ** 2))
w = jnp.ones(3)
s = opt.init(w)
for t in range(3):
    w, s, info = opt.step(w, s, jnp.zeros(3), jax.random.key(t))
print(float(info.loss))
"""


def _run(*args, env=None):
    out = subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, env=env,
                         check=True)
    return out.stdout.strip()


def test_a_second_run_writes_no_new_programs(tmp_path):
    first = _run(str(tmp_path))
    entries = sorted(p.name for p in tmp_path.iterdir())
    assert len(entries) >= 2  # at least the two phase programs of sophia_h (Hessian refresh, plain step)
    assert _run(str(tmp_path)) == first  # same numbers
    assert sorted(p.name for p in tmp_path.iterdir()) == entries  # every program came from the cache


def test_the_environment_variable_turns_it_off(tmp_path):
    code = "import curvplan as cp; print(cp.enable_compilation_cache())"
    env = {**os.environ, "CURVPLAN_COMPILATION_CACHE": "off"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "None"
    env["CURVPLAN_COMPILATION_CACHE"] = str(tmp_path / "c")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "c") and (tmp_path / "c").is_dir()
