"""Data-parallel Shampoo over two JAX processes on CPU (one device each, gloo collectives, the batch sharded over
a ("data",) mesh) ends at the same parameters and losses as the same run in one process on one device."""

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import _worker
import jax.numpy as jnp
import numpy as np

WORKER = Path(__file__).with_name("_worker.py")
NUM_PROCESSES = 2
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env() -> dict[str, str]:
    """This environment without what could give a worker another platform or more than one CPU device."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "PYTEST_XDIST"))}
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\S*", "", env.get("XLA_FLAGS", "")).strip()
    return env


class Workers:
    """The worker processes of one run, their output in ``tmp_path``; `wait` raises with their output when one
    fails or the run takes more than `TIMEOUT_S`, and leaves no process behind either way."""

    def __init__(self, tmp_path: Path):
        port, env = _free_port(), _worker_env()
        self.outs = [tmp_path / f"process{i}.npz" for i in range(NUM_PROCESSES)]
        self.logs = [tmp_path / f"process{i}.log" for i in range(NUM_PROCESSES)]
        self.procs = []
        for i in range(NUM_PROCESSES):
            with open(self.logs[i], "w") as log:
                self.procs.append(subprocess.Popen(
                    [sys.executable, str(WORKER), "--port", str(port), "--process-id", str(i),
                     "--num-processes", str(NUM_PROCESSES), "--out", str(self.outs[i])],
                    env=env, cwd=Path(__file__).parents[2], stdout=log, stderr=subprocess.STDOUT))
        self.deadline = time.monotonic() + TIMEOUT_S

    def wait(self) -> list[Path]:
        try:
            while None in (codes := [p.poll() for p in self.procs]):
                if any(c not in (None, 0) for c in codes):
                    self.fail("a worker failed")
                if time.monotonic() > self.deadline:
                    self.fail(f"the workers ran past {TIMEOUT_S} s")
                time.sleep(0.1)
            if any(p.returncode != 0 for p in self.procs):
                self.fail("a worker failed")
        finally:
            self.kill()
        return self.outs

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def fail(self, why: str) -> None:
        self.kill()
        report = [f"--- process {i} (exit status {p.returncode}):\n{log.read_text()}"
                  for i, (p, log) in enumerate(zip(self.procs, self.logs))]
        raise AssertionError(f"{why}\n" + "\n".join(report))


def test_two_processes_match_one(tmp_path):
    workers = Workers(tmp_path)
    try:  # the single-device reference, while the workers run
        params_np, batch_np = _worker.problem()
        ref_params, ref_losses = _worker.train({k: jnp.asarray(v) for k, v in params_np.items()},
                                               tuple(jnp.asarray(a) for a in batch_np))
    except BaseException:
        workers.kill()
        raise
    outs = workers.wait()
    assert np.all(np.isfinite(ref_losses)) and np.all(np.diff(ref_losses) < 0), ref_losses
    assert not np.allclose(ref_params["w1"], params_np["w1"], rtol=1e-3, atol=1e-3)  # the run moved the params

    for i, path in enumerate(outs):
        got = np.load(path)
        np.testing.assert_allclose(got["losses"], ref_losses, rtol=1e-5, atol=1e-6, err_msg=f"process {i} losses")
        for k, v in ref_params.items():
            np.testing.assert_allclose(got[f"param:{k}"], v, rtol=1e-5, atol=1e-6, err_msg=f"process {i} {k}")
