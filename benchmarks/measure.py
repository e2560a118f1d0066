"""Measurements: interleaved per-step time, time/steps to target, XLA FLOPs/bytes, compile time, peak RSS.

No function here asserts on time; callers report ratios measured in one process.
"""

from __future__ import annotations

import platform
import resource
import sys
import time
from collections.abc import Callable, Iterable

import jax
import numpy as np

from benchmarks.optimizers import Runner
from benchmarks.workloads import Workload


def machine() -> dict:
    """Where and with what a result was measured."""
    import optax

    dev = jax.devices()[0]
    return {
        "platform": platform.platform(), "python": sys.version.split()[0], "processor": platform.processor(),
        "cpu_count": __import__("os").cpu_count(), "jax": jax.__version__, "optax": optax.__version__,
        "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}",
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Live:
    """A runner in mid-training: params, state and a batch stream (so interleaved blocks continue)."""

    def __init__(self, runner: Runner, w: Workload, seed: int, batch_size: int | None):
        self.runner = runner
        self.params = w.init(jax.random.key(seed))
        self.key = jax.random.key(seed + 1000)
        self.state = runner.init(self.params, self.key)
        self.batches = w.batches(seed, batch_size)
        self.compile_s = 0.0

    def run(self, n: int) -> float:
        """Runs n steps; returns the seconds they took (device work included)."""
        jax.block_until_ready((self.params, self.state))
        t0 = time.perf_counter()
        for _ in range(n):
            self.params, self.state, loss = self.runner.step(self.params, self.state, next(self.batches), self.key)
        jax.block_until_ready((self.params, self.state))
        return time.perf_counter() - t0


def _rotated(names: list[str], rep: int) -> list[str]:
    """The A/B order of repeat ``rep``: the names rotated by ``rep`` (each runner leads in turn)."""
    return names[rep % len(names):] + names[: rep % len(names)]


def summary(v: list[float]) -> dict:
    """samples, median, min and max of per-repeat values."""
    return {"samples": v, "median": float(np.median(v)), "min": float(np.min(v)), "max": float(np.max(v))}


def interleaved_step_times(runners: dict[str, Runner], w: Workload, *, steps: int = 30, repeats: int = 3,
                           seed: int = 0, batch_size: int | None = None,
                           progress: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Per-step seconds for each runner, A/B interleaved: each repeat runs one block of ``steps`` (rounded up
    to a multiple of the runner's period) per runner, in rotating order. Warm-up (compilation of every
    phase) is three full periods per runner (at least 10 steps), timed separately as ``compile_s``: a program
    that runs once per period needs a few executions before its time settles.

    Returns name -> {"samples": [s/step per repeat], "median", "min", "max", "compile_s"}.
    """
    live = {k: Live(r, w, seed, batch_size) for k, r in runners.items()}
    for k, lv in live.items():
        n = max(3 * lv.runner.period, 10, lv.runner.warmup_steps + 2 * lv.runner.period)
        lv.compile_s = lv.run(n)
        if progress:
            progress(f"warm-up {k}: {lv.compile_s:.1f} s")
    samples = {k: [] for k in runners}
    names = list(runners)
    for rep in range(repeats):
        for k in _rotated(names, rep):
            lv = live[k]
            n = -(-steps // lv.runner.period) * lv.runner.period
            samples[k].append(lv.run(n) / n)
        if progress:
            progress(f"repeat {rep + 1}/{repeats}: " + ", ".join(f"{k} {samples[k][-1] * 1e3:.2f} ms" for k in names))
    return {k: {**summary(v), "compile_s": live[k].compile_s} for k, v in samples.items()}


def interleaved_scan_times(runners: dict[str, Runner], w: Workload, *, steps: int = 30, repeats: int = 3,
                           seed: int = 0, batch_size: int | None = None) -> dict[str, dict]:
    """Per-step seconds with the host out of the loop: each runner's ``scan`` runs ``steps`` (rounded up to
    whole periods) in one compiled program, A/B interleaved over ``repeats``, after one warm-up call. The same
    stacked batches feed every runner; params and state continue from block to block.

    Returns name -> {"samples", "median", "min", "max"} like `interleaved_step_times`.
    """
    live = {k: Live(r, w, seed, batch_size) for k, r in runners.items()}
    stacks = {}
    for k, lv in live.items():
        n = -(-steps // lv.runner.period) * lv.runner.period
        bs = [next(lv.batches) for _ in range(n)]
        stacks[k] = jax.tree.map(lambda *xs: jax.numpy.stack(xs), *bs)
        lv.params, lv.state = lv.runner.scan(lv.params, lv.state, stacks[k], lv.key)  # compile + warm
        jax.block_until_ready((lv.params, lv.state))
    samples = {k: [] for k in runners}
    names = list(runners)
    for rep in range(repeats):
        for k in _rotated(names, rep):
            lv = live[k]
            t0 = time.perf_counter()
            lv.params, lv.state = lv.runner.scan(lv.params, lv.state, stacks[k], lv.key)
            jax.block_until_ready((lv.params, lv.state))
            samples[k].append((time.perf_counter() - t0) / jax.tree.leaves(stacks[k])[0].shape[0])
    return {k: summary(v) for k, v in samples.items()}


def ratio_stats(a: dict, b: dict) -> dict:
    """a / b per repeat (paired by repeat index): median, min, max."""
    r = np.asarray(a["samples"]) / np.asarray(b["samples"])
    return {"median": float(np.median(r)), "min": float(r.min()), "max": float(r.max())}


def cost(runner: Runner, w: Workload, seed: int = 0, batch_size: int | None = None) -> dict:
    """FLOPs and bytes accessed per step (XLA ``cost_analysis``), averaged over one period, plus each
    program's compile time and temp memory (``memory_analysis``)."""
    params = w.init(jax.random.key(seed))
    key = jax.random.key(seed + 1000)
    state = runner.init(params, key)
    batch = next(w.batches(seed, batch_size))
    flops = bytes_ = 0.0
    progs = []
    for weight, fn, args in runner.programs(params, state, batch, key):
        t0 = time.perf_counter()
        compiled = fn.lower(*args).compile()
        ct = time.perf_counter() - t0
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        mem = compiled.memory_analysis()
        f, b = float(ca.get("flops", 0.0)), float(ca.get("bytes accessed", 0.0))
        flops += weight * f
        bytes_ += weight * b
        progs.append({"weight": weight, "flops": f, "bytes": b, "compile_s": ct,
                      "temp_bytes": int(getattr(mem, "temp_size_in_bytes", 0) or 0)})
    return {"flops": flops, "bytes": bytes_, "programs": progs, "n_programs": runner.n_programs}


def unplanned_flops_lower_bound(runner: Runner, w: Workload, steps: range, seed: int = 0) -> float:
    """FLOPs of an unplanned curvplan runner with its ``lax.cond`` guards resolved per step (XLA counts a
    cond as its costliest branch; this is the smallest count any cond-based program could reach), averaged
    over ``steps`` (one period of the planned plan)."""
    opt = runner.extra["optimizer"]
    lowered, plan = opt.lowered, opt.plan
    params = w.init(jax.random.key(seed))
    key = jax.random.key(seed + 1000)
    state = opt.init(params, key)
    batch = next(w.batches(seed))
    cache, per_step = {}, []
    for t in steps:
        sig = tuple(sorted((lbl, plan.runs(lbl, t)) for lbl in plan.run))
        if sig not in cache:
            lowered.guard_override = dict(sig)
            fn = jax.jit(lambda p, s, b, r: lowered.phase_fns[0](p, s, b, r, {}))
            ca = fn.lower(params, state, batch, key).compile().cost_analysis()
            ca = ca[0] if isinstance(ca, (list, tuple)) else ca
            cache[sig] = float(ca["flops"])
        per_step.append(cache[sig])
    lowered.guard_override = None
    return float(np.mean(per_step))


def train_curve(runner: Runner, w: Workload, *, steps: int, seed: int, eval_every: int,
                batch_size: int | None = None, target: float | None = None) -> dict:
    """Trains for ``steps`` (stopping early at ``target``), evaluating the held-out loss every ``eval_every``
    steps outside the timed region. Wall time excludes the first call of every phase (compilation), which
    is reported as ``compile_s``."""
    lv = Live(runner, w, seed, batch_size)
    # compile every phase (prefix phases included) on a throwaway copy so the timed run starts warm
    warm = Live(runner, w, seed, batch_size)
    compile_s = warm.run(max(runner.period + 1, runner.warmup_steps))
    del warm
    wall, curve, reached = 0.0, [], None
    t = 0
    curve.append({"step": 0, "time": 0.0, "eval_loss": w.eval_loss(lv.params)})
    while t < steps:
        n = min(eval_every, steps - t)
        wall += lv.run(n)
        t += n
        ev = w.eval_loss(lv.params)
        curve.append({"step": t, "time": wall, "eval_loss": ev})
        if not np.isfinite(ev):
            break
        if target is not None and reached is None and ev <= target:
            reached = {"step": t, "time": wall}
            break
    return {"curve": curve, "reached": reached, "compile_s": compile_s, "live": lv}


def median_or_none(xs: Iterable[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.median(xs)) if xs else None
