"""Seconds to compile every phase program of a benchmark method, optionally through the persistent cache.

    python -m benchmarks.compile_time scao --workload w3                         # cold, no cache
    python -m benchmarks.compile_time scao --workload w3 --cache /tmp/cpcache    # run twice: the second loads

Each phase's jitted step is lowered and compiled once (`jax.stages`), so the figure is compile time alone, with
no step executed. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import jax

import curvplan as cp
from benchmarks.optimizers import METHODS
from benchmarks.workloads import get_workload


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("method", choices=sorted(METHODS))
    ap.add_argument("--workload", default="w1")
    ap.add_argument("--cache", default=None, help="a directory for JAX's persistent compilation cache")
    args = ap.parse_args(argv)
    if args.cache:
        cp.enable_compilation_cache(args.cache)
    w = get_workload(args.workload)
    opt = cp.Optimizer(METHODS[args.method].modules(w), **w.optimizer_kwargs())
    params = w.init(jax.random.key(0))
    state = opt.init(params, jax.random.key(1))
    batch, key = next(w.batches(0)), jax.random.key(2)
    t0 = time.perf_counter()
    for fn in opt._jitted:  # one jitted program per phase
        fn.lower(params, state, batch, key).compile()
    out = {"method": args.method, "workload": w.name, "programs": len(opt._jitted), "cache": args.cache,
           "compile_s": round(time.perf_counter() - t0, 2), "jax": jax.__version__}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
