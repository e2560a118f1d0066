"""How long `compile_plan` takes on a realistic 50-module composition (target: < 50 ms).

Run with ``python -m benchmarks.planner_speed``. Prints one line; writes nothing.
"""

from __future__ import annotations

import statistics
import timeit

import curvplan as cp
from curvplan.ir.toy import Toy

CADENCES = (1, 5, 10, 20)
ESTIMATOR_READS = (
    ("hvp_op.hessian", "rng"),  # Hutchinson diagonal
    ("ggn_op.ce",),  # Gauss-Newton-Bartlett
    ("activations", "out_cotangents"),  # K-FAC factors
    ("grad",),  # gradient Gram (Shampoo / SOAP)
)


def composition(n_modules: int = 50) -> list[Toy]:
    """Curvature blocks (estimator -> EMA with a cadence -> direction -> telemetry), damping, one combiner."""
    mods: list[Toy] = []
    directions: list[str] = []
    i = 0
    while len(mods) < n_modules - 1:
        every = CADENCES[i % len(CADENCES)]
        start = 10 if i % 3 == 2 else 0
        block = [
            Toy(name=f"est{i}", reads=ESTIMATOR_READS[i % len(ESTIMATOR_READS)], makes=(f"diag.b{i}",),
                attrs=(("probes", 1 + i % 2),)),
            Toy(name=f"ema{i}", reads=(f"diag.b{i}",), makes=(f"v{i}",), stateful=True, every=every,
                start=start, attrs=(("beta", 0.99),)),
            Toy(name=f"dir{i}", reads=("grad", f"v{i}"), carry=(f"v{i}",), makes=(f"direction.b{i}",),
                stateful=True, attrs=(("eps", 1e-8),)),
            Toy(name=f"tele{i}", reads=("loss", f"direction.b{i}"), makes=(f"stat.b{i}",), is_sink=True,
                every=CADENCES[(i + 1) % len(CADENCES)]),
            Toy(name=f"damp{i}", reads=("loss", f"v{i}"), carry=(f"v{i}",), makes=(f"lambda.b{i}",),
                stateful=True, every=5),
        ]
        block = block[: n_modules - 1 - len(mods)]
        mods += block
        if len(block) >= 3:
            directions.append(f"direction.b{i}")
        i += 1
    mods.append(Toy(name="combine", reads=tuple(directions), makes=("update",)))
    return mods


def main() -> None:
    mods = composition()
    plan = cp.compile_plan(mods, name="bench")
    times = timeit.repeat(lambda: cp.compile_plan(mods, name="bench"), number=1, repeat=20)
    ms = statistics.median(times) * 1e3
    print(f"compile_plan: {ms:.1f} ms (median of 20), {len(mods)} modules, {len(plan.phases)} phases")


if __name__ == "__main__":
    main()
