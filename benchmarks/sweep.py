"""Small documented sweeps of preset settings: held-out loss after a fixed budget, per seed.

    python -m benchmarks.sweep cg_radius              # Newton-CG / Gauss-Newton-CG trust radius x damping, W1
    python -m benchmarks.sweep kfac_adaptive          # K-FAC: fixed lr vs the quadratic-model step, W1, + kfac-jax
    python -m benchmarks.sweep kfac_adaptive_w3       # the same on the W3 char transformer
    python -m benchmarks.sweep adahessian             # AdaHessian learning rate, W1, to the AdamW target
    python -m benchmarks.sweep adahessian_fine        # ... and β2, clipping around its best points
    python -m benchmarks.sweep gauss_newton_cg        # Gauss-Newton-CG damping x radius, W1, to the target
    python -m benchmarks.sweep gauss_newton_cg_w4     # its damping on the W4 least-squares workload
    python -m benchmarks.sweep cg_radius --steps 50 --seeds 0 1

Each point of a sweep's grid is one preset configuration, trained from each seed's initialisation on that
seed's batches with `Optimizer.run` (compiled once per point). Results go to
``benchmarks/results/sweep_<name>.{json,md}``: the held-out loss per seed, and the step-info counters the
sweep names (e.g. how many steps hit the CG radius). A run whose loss is not finite or above ``diverged``
is marked as diverged.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as in benchmarks.run

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import curvplan as cp  # noqa: E402
from benchmarks.run import RESULTS, _log  # noqa: E402
from benchmarks.workloads import get_workload  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A grid of preset settings on one workload: ``make(workload, **point)`` returns the module list."""

    workload: str
    make: Callable[..., list]
    grid: dict[str, tuple]
    steps: int = 100
    seeds: tuple[int, ...] = (0, 1)
    counters: tuple[str, ...] = ()  # boolean / integer StepInfo fields summed over the run
    diverged: float = 100.0
    target: float | None = None  # held-out loss; the first evaluated step at or below it is reported
    eval_every: int | None = None  # held-out loss every this many steps (default: at the end only)
    peer: Callable[..., list[dict] | None] | None = None  # (point, seed, steps, eval_every) -> curves, or None
    about: str = ""


def _cg(w, method, **kw):
    extra = {"loss": w.loss_kind} if method == "gauss_newton_cg" else {}
    return getattr(cp.presets, method)(**extra, **kw)


def _kfac(w, **kw):
    return cp.presets.kfac(loss=w.loss_kind, **kw)


KFAC_VENV = pathlib.Path(__file__).parent.parent / ".venv-kfac" / "bin" / "python"


def _kfac_jax(point, seed: int, steps: int, every: int) -> list[dict] | None:
    """kfac-jax 0.0.8 with the point's settings on the same init and batches (`make bench-peers` builds its
    venv; without it the sweep has no peer rows). True labels on both sides (its ``fisher_empirical``).

    Two runs: the same damping λ, and λ/B. kfac-jax's output-side factor of a mean loss carries one more 1/B
    than curvplan's (Γ_kfac-jax = Γ/B), so its λ plays the part of curvplan's λ·B."""
    if not KFAC_VENV.exists():
        return None
    script = pathlib.Path(__file__).parent / "peers" / "kfac_jax_w1.py"
    batch = get_workload("w1").batch_size
    runs = []
    for label, damping in (("kfac-jax", point["damping"]), ("kfac-jax λ/B", point["damping"] / batch)):
        cmd = [str(KFAC_VENV), str(script), "--curve", str(steps), "--eval-every", str(every), "--seed", str(seed),
               "--batch", str(batch),
               "--damping", str(damping), "--inverse-every", "5", "--ema", "0.95", "--learning-rate", "0.1",
               "--estimation-mode", "fisher_empirical"] + (["--adaptive"] if point["adaptive"] else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        runs.append({**json.loads(out.stdout.strip().splitlines()[-1]), "peer": label})
    return runs


W1_TARGET, W3_TARGET, W4_TARGET = 0.0282, 2.5809, 0.0044
"""AdamW's held-out loss at 60% of its budget (600 steps on W1, 300 on W3, 1500 on W4: the README's time-to-target
tables)."""


SWEEPS: dict[str, Sweep] = {
    "cg_radius": Sweep(
        "w1", _cg, {"method": ("newton_cg", "gauss_newton_cg"), "lam": (1.0, 0.01), "radius": (None, 1.0, 3.0, 10.0)},
        counters=("cg_radius_reached",),
        about="CG trust radius (Steihaug-Toint) on ‖s‖ against the constant damping λ, learning rate 1."),
    "kfac_adaptive": Sweep(
        "w1", _kfac, {"adaptive": (False, True), "damping": (0.01, 0.1, 1.0)}, steps=400, seeds=(0, 1, 2),
        target=W1_TARGET, eval_every=20, counters=("skipped",), peer=_kfac_jax,
        about="K-FAC with its fixed learning rate 0.1 vs the quadratic-model step size and momentum "
              "(`adaptive=True`, damping adapted every 5 steps from the given initial value). AdamW reaches "
              f"the target {W1_TARGET} in 360 steps (median of 5 seeds)."),
    "adahessian": Sweep(
        "w1", lambda w, **kw: cp.presets.adahessian(**kw),
        {"learning_rate": (0.01, 0.03, 0.1, 0.2, 0.3), "hessian_every": (1, 10)}, steps=600, seeds=(0, 1, 2),
        target=W1_TARGET, eval_every=20, counters=("skipped",),
        about="AdaHessian over its learning rate and Hessian-diagonal cadence. AdamW reaches the target "
              f"{W1_TARGET} in 360 steps (median of 5 seeds)."),
    "adahessian_fine": Sweep(
        "w1", lambda w, **kw: cp.presets.adahessian(hessian_every=1, **kw),
        {"learning_rate": (0.1, 0.15), "beta2": (0.99, 0.999), "clip_norm": (None, 1.0)}, steps=600,
        seeds=(0, 1, 2), target=W1_TARGET, eval_every=20, counters=("skipped",),
        about="AdaHessian with a fresh Hessian diagonal every step, around the best points of `adahessian`: "
              f"learning rate x β2 x update clipping. AdamW reaches the target {W1_TARGET} in 360 steps."),
    "gauss_newton_cg": Sweep(
        "w1", lambda w, **kw: cp.presets.gauss_newton_cg(loss=w.loss_kind, maxiter=10, **kw),
        {"lam": (0.01, 0.1, 1.0), "radius": (1.0, 3.0)}, steps=600, seeds=(0, 1, 2), target=W1_TARGET,
        eval_every=20, counters=("cg_radius_reached",),
        about="Gauss-Newton-CG (10 CG iterations, learning rate 1) over the damping λ and the CG trust radius. "
              f"AdamW reaches the target {W1_TARGET} in 360 steps (median of 5 seeds)."),
    "gauss_newton_cg_w4": Sweep(
        "w4", lambda w, **kw: cp.presets.gauss_newton_cg(loss=w.loss_kind, maxiter=10, **kw),
        {"lam": (0.1, 1.0), "radius": (1.0,)}, steps=1500, seeds=(0, 1, 2), target=W4_TARGET,
        eval_every=50, counters=("cg_radius_reached",),
        about="Gauss-Newton-CG on the least-squares workload: the W1 choice λ = 0.1 against the old default 1. "
              f"AdamW reaches the target {W4_TARGET} in 900 steps (median of 5 seeds)."),
    "kfac_adaptive_w3": Sweep(
        "w3", _kfac, {"adaptive": (False, True), "damping": (0.01, 0.1)}, steps=300, seeds=(0, 1, 2),
        target=W3_TARGET, eval_every=20, counters=("skipped",),
        about="K-FAC on the char transformer: fixed learning rate 0.1 vs `adaptive=True`, from initial damping "
              "0.01 and 0.1. AdamW reaches the "
              f"target {W3_TARGET} in 200 steps (median of 3 seeds)."),
}


def run_point(w, modules, sw: Sweep, steps: int, seed: int) -> dict[str, Any]:
    opt = cp.Optimizer(modules, **w.optimizer_kwargs())
    params = w.init(jax.random.key(seed))
    it = w.batches(seed)
    state = opt.init(params, batch=next(w.batches(seed)))  # per-layer layouts read off the model (K-FAC)
    every = sw.eval_every or steps
    curve, counts, t0 = [], {c: 0 for c in sw.counters}, time.perf_counter()
    for start in range(0, steps, every):
        n = min(every, steps - start)
        batches = jax.tree.map(lambda *xs: jnp.stack(xs), *[next(it) for _ in range(n)])
        params, state, infos = opt.run(params, state, batches, jax.random.fold_in(jax.random.key(seed + 1), start))
        for c in sw.counters:
            counts[c] += int(np.sum(np.asarray(getattr(infos, c))))
        curve.append((start + n, w.eval_loss(params)))
    return _result(seed, curve, sw, {"seconds": time.perf_counter() - t0, **counts})


def _result(seed: int, curve: list, sw: Sweep, extra: dict) -> dict[str, Any]:
    """One run: its held-out curve (a non-finite loss as None), final loss and first step at the target."""
    curve = [(t, v if v is not None and math.isfinite(v) else None) for t, v in curve]
    reached = [t for t, v in curve if sw.target is not None and v is not None and v <= sw.target]
    return {"seed": seed, "test_loss": curve[-1][1], "curve": curve, "steps_to_target": reached[0] if reached else None,
            **extra}


def _row(point, runs, sw: Sweep) -> dict:
    diverged = sum(r["test_loss"] is None or r["test_loss"] > sw.diverged for r in runs)
    return {"point": point, "runs": runs, "diverged": diverged}


def run_sweep(name: str, steps: int | None = None, seeds: tuple[int, ...] | None = None) -> dict:
    sw = SWEEPS[name]
    w = get_workload(sw.workload)
    steps, seeds = steps or sw.steps, seeds or sw.seeds
    keys = list(sw.grid)
    points = [dict(zip(keys, vals)) for vals in itertools.product(*sw.grid.values())]
    rows = []
    for i, point in enumerate(points):
        runs = [run_point(w, sw.make(w, **point), sw, steps, s) for s in seeds]
        rows.append(_row(point, runs, sw))
        new = 1
        if sw.peer is not None:
            per_seed = [sw.peer(point, s, steps, sw.eval_every or steps) for s in seeds]
            if all(c is not None for c in per_seed):
                for variant in zip(*per_seed):  # one row per peer configuration, its runs over seeds
                    rows.append(_row({**point, "by": variant[0]["peer"]}, [_result(c["seed"], c["curve"], sw, {k: "-" for k in sw.counters}) for c in variant], sw))
                    new += 1
        _log(f"{i + 1}/{len(points)} {point}: test loss " + "; ".join(
            ", ".join("nan" if r["test_loss"] is None else f"{r['test_loss']:.4g}" for r in row["runs"])
            for row in rows[-new:]))
    return {"sweep": name, "workload": sw.workload, "steps": steps, "seeds": list(seeds), "about": sw.about,
            "counters": list(sw.counters), "target": sw.target, "rows": rows, "jax": jax.__version__,
            "date": time.strftime("%Y-%m-%d")}


def to_markdown(res: dict) -> str:
    keys = list(dict.fromkeys(k for row in res["rows"] for k in row["point"]))
    target = res.get("target")
    head = keys + ["test loss per seed", *(["steps to target"] if target else []), *res["counters"], "diverged"]
    lines = [f"# Sweep `{res['sweep']}` on {res['workload']}: {res['steps']} steps, seeds {res['seeds']}", "",
             res["about"], "", f"JAX {res['jax']}, {res['date']}. Command: `python -m benchmarks.sweep {res['sweep']}`.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in res["rows"]:
        losses = " / ".join("nan" if r["test_loss"] is None else f"{r['test_loss']:.3g}" for r in row["runs"])
        counts = [" / ".join(str(r[c]) for r in row["runs"]) for c in res["counters"]]
        ttt = [" / ".join("-" if r["steps_to_target"] is None else str(r["steps_to_target"]) for r in row["runs"])]
        cells = [str(row["point"].get(k, "curvplan" if k == "by" else "")) for k in keys] + [losses, *(ttt if target else []), *counts,
                                                         f"{row['diverged']}/{len(row['runs'])}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", choices=sorted(SWEEPS))
    ap.add_argument("--steps", type=int)
    ap.add_argument("--seeds", type=int, nargs="+")
    args = ap.parse_args(argv)
    res = run_sweep(args.sweep, args.steps, tuple(args.seeds) if args.seeds else None)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"sweep_{args.sweep}.json").write_text(json.dumps(res, indent=1))
    md = to_markdown(res)
    (RESULTS / f"sweep_{args.sweep}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
