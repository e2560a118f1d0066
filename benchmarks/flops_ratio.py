"""FLOPs per step, planned vs unplanned, averaged over one cadence period (XLA ``cost_analysis``).

    python -m benchmarks.flops_ratio [--every 10] [--batch 256]

Workload: the digits MLP (64-128-128-10 tanh, workload W1 in benchmarks/workloads.py) with a Hutchinson diagonal of the Hessian
refreshed every ``--every`` steps (``cp.presets.adahessian_like``). Planned: each phase program's FLOPs,
weighted by how often the phase runs. Unplanned: the single program as XLA counts it (a ``lax.cond`` counts
as its costliest branch), and a lower bound with the guards resolved statically per step.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

import curvplan as cp
from curvplan.examples.digits import init_mlp, load_digits, loss_fn


def flops(fn, *args) -> float:
    return float(jax.jit(fn).lower(*args).compile().cost_analysis()["flops"])


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args(argv)
    (x, y), _ = load_digits()
    batch = (x[: args.batch], y[: args.batch])
    params = init_mlp(jax.random.key(0))
    rng = jax.random.key(1)
    mods = cp.presets.adahessian_like(hessian_every=args.every)
    objective = cp.Objective(loss_fn=loss_fn)

    planned = cp.lower_plan(cp.compile_plan(mods, name="hutchinson_every_k"), objective)
    state = planned.init(params)
    plan = planned.plan
    per_phase = [flops(lambda p, s, b, r, f=f: f(p, s, b, r, {}), params, state, batch, rng)
                 for f in planned.phase_fns]
    steps = range(plan.prefix, plan.prefix + plan.period)
    planned_avg = np.mean([per_phase[plan.phase_of(t)] for t in steps])

    unplanned = cp.lower_plan(cp.compile_plan(mods, name="hutchinson_every_k", optimize=False), objective)
    ustate = unplanned.init(params)
    # (a) XLA's cost analysis of the real unplanned program: a lax.cond counts as its costliest branch.
    xla_count = flops(lambda p, s, b, r: unplanned.phase_fns[0](p, s, b, r, {}), params, ustate, batch, rng)
    # (b) a lower bound: guards resolved statically per step, so XLA may delete work a real cond cannot skip.
    cache = {}
    per_step = []
    for t in steps:
        key = tuple(sorted((lbl, unplanned.plan.runs(lbl, t)) for lbl in unplanned.plan.run))
        if key not in cache:
            unplanned.guard_override = dict(key)
            cache[key] = flops(lambda p, s, b, r: unplanned.phase_fns[0](p, s, b, r, {}), params, ustate, batch, rng)
        per_step.append(cache[key])
    unplanned.guard_override = None
    unplanned_low = float(np.mean(per_step))
    grad = flops(jax.grad(loss_fn), params, batch)

    print(plan)
    print()
    print(f"one gradient (value_and_grad reference): {grad:,.0f} FLOPs")
    for i, f in enumerate(per_phase):
        print(f"planned phase {i} ({plan.phases[i].header}): {f:,.0f} FLOPs, runs {plan.phases[i].steps} steps of "
              f"{plan.prefix + 2 * plan.period}")
    print(f"unplanned program (XLA cost_analysis, cond counted as taken): {xla_count:,.0f} FLOPs every step")
    print(f"unplanned lower bound (guards resolved statically per step): {unplanned_low:,.0f} FLOPs on average")
    print(f"planned average over one period: {planned_avg:,.0f} FLOPs")
    print(f"ratio planned / unplanned: {planned_avg / xla_count:.3f} (XLA count), "
          f"{planned_avg / unplanned_low:.3f} (lower bound)")
    return planned_avg / xla_count


if __name__ == "__main__":
    main()
