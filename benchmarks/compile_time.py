"""Seconds to compile what `Optimizer.step` runs, per method and workload, against optax.adamw's step.

    python -m benchmarks.compile_time                                  # the table: presets on W1 and W3
    python -m benchmarks.compile_time --methods scao --workloads w3    # one row
    python -m benchmarks.compile_time --methods scao --workloads w3 --cache /tmp/cpcache   # twice: the 2nd loads

Each jitted program is lowered and compiled once (`jax.stages`), so a figure is tracing plus XLA compile, with
no step executed. "programs" is what the step driver compiles (`Plan.programs`: one per provider pass); "phase
programs" is the old way, one specialised program per phase, compiled after it in the same process (shared
trace caches can only make that figure smaller). Writes ``benchmarks/results/compile_time.{json,md}`` for the
full table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax

import curvplan as cp
from benchmarks.optimizers import METHODS, make_runner
from benchmarks.workloads import get_workload

RESULTS = pathlib.Path(__file__).parent / "results"
TABLE = {"w1": ["sophia_h", "adahessian", "gauss_newton_cg", "kfac", "kfac_adaptive", "shampoo", "soap", "scao",
                "muon"],
         "w3": ["muon", "shampoo", "soap", "scao", "kfac", "kfac_adaptive"]}


def _seconds(fns_args) -> float:
    t0 = time.perf_counter()
    for fn, args in fns_args:
        fn.lower(*args).compile()
    return time.perf_counter() - t0


def measure(method: str, workload: str) -> dict:
    w = get_workload(workload)
    if method == "adamw":
        r = make_runner("adamw", w)
        params = w.init(jax.random.key(0))
        progs = r.programs(params, r.init(params, jax.random.key(1)), next(w.batches(0)), jax.random.key(2))
        s = _seconds([(fn, args) for _, fn, args in progs])
        return {"method": method, "workload": w.name, "programs": len(progs), "compile_s": round(s, 2)}
    opt = cp.Optimizer(METHODS[method].modules(w), **w.optimizer_kwargs())
    params = w.init(jax.random.key(0))
    args = (params, opt.init(params, jax.random.key(1)), next(w.batches(0)), jax.random.key(2))
    merged = _seconds([(fn, args) for fn in opt._jitted])
    phases = _seconds([(opt._phase_jit(i), args) for i in range(len(opt.plan.phases))])
    return {"method": method, "workload": w.name, "programs": len(opt._jitted), "compile_s": round(merged, 2),
            "phase_programs": len(opt.plan.phases), "phase_compile_s": round(phases, 2)}


def markdown(rows: list[dict]) -> str:
    base = {r["workload"]: r["compile_s"] for r in rows if r["method"] == "adamw"}
    lines = ["| method | workload | programs | compile (s) | vs AdamW | phase programs | compile (s), one per phase |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = base.get(r["workload"])
        ratio = f"{r['compile_s'] / ref:.1f}" if ref else "—"
        lines.append(f"| {r['method']} | {r['workload']} | {r['programs']} | {r['compile_s']:.1f} | {ratio} | "
                     f"{r.get('phase_programs', '—')} | {r.get('phase_compile_s', '—')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="*", default=None, help="default: the table's presets per workload")
    ap.add_argument("--workloads", nargs="*", default=sorted(TABLE))
    ap.add_argument("--cache", default=None, help="a directory for JAX's persistent compilation cache")
    args = ap.parse_args(argv)
    if args.cache:
        cp.enable_compilation_cache(args.cache)
    rows = []
    for wl in args.workloads:
        for m in ["adamw", *(args.methods or TABLE[wl])]:
            rows.append(measure(m, wl))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    md = markdown(rows)
    print(md)
    if args.methods is None and args.cache is None:
        out = {"command": "python -m benchmarks.compile_time", "jax": jax.__version__, "rows": rows}
        (RESULTS / "compile_time.json").write_text(json.dumps(out, indent=1))
        (RESULTS / "compile_time.md").write_text(md + "\n")
    return rows


if __name__ == "__main__":
    main()
