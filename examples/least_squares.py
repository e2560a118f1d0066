"""Nonlinear least squares with curvplan's Levenberg-Marquardt, checked against SciPy.

Fits a two-exponential decay ``y = a·exp(-k₁t) + b·exp(-k₂t) + c`` to noisy samples. curvplan's
``levenberg_marquardt`` preset solves the damped Gauss-Newton system by CG and adapts λ from the gain ratio;
``scipy.optimize.least_squares(method="lm")`` (MINPACK) is the reference. Both minimise ½Σr², so they must
reach the same parameters. Runs in float64.

    python examples/least_squares.py
    python examples/least_squares.py --steps 40 --points 100
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import curvplan as cp

TRUE = np.array([3.0, 1.5, 1.0, 0.2, 0.5])  # a, k1, b, k2, c
START = np.array([1.0, 1.0, 1.0, 0.1, 0.0])


def model(p, t):
    return p[0] * jnp.exp(-p[1] * t) + p[2] * jnp.exp(-p[3] * t) + p[4]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--points", type=int, default=200)
    args = ap.parse_args(argv)
    from scipy.optimize import least_squares

    previous = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    try:
        rng = np.random.default_rng(0)
        t = np.linspace(0.0, 20.0, args.points)
        y = np.asarray(model(TRUE, t)) + 0.02 * rng.normal(size=t.shape)
        batch = (jnp.asarray(t), jnp.asarray(y))

        opt = cp.Optimizer(cp.presets.levenberg_marquardt(lam0=1e-2, tol=1e-12, maxiter=50),
                           model_fn=model, loss="mse")
        p, state = jnp.asarray(START), opt.init(jnp.asarray(START))
        for _ in range(args.steps):
            p, state, info = opt.step(p, state, batch)
        ref = least_squares(lambda q: np.asarray(model(q, t)) - y, START, method="lm", xtol=1e-15, ftol=1e-15,
                            gtol=1e-15)
        rel = float(np.max(np.abs(np.asarray(p) - ref.x) / np.abs(ref.x)))
        cost = 0.5 * float(np.sum((np.asarray(model(p, t)) - y) ** 2))
        print(f"curvplan LM after {args.steps} steps: {np.round(np.asarray(p), 6)}  cost {cost:.6e}")
        print(f"scipy least_squares (lm, {ref.nfev} evaluations): {np.round(ref.x, 6)}  cost {ref.cost:.6e}")
        print(f"max relative difference {rel:.1e}; final λ {float(info['lambda_next']):.2e}")
        return {"params": np.asarray(p), "scipy": ref.x, "max_rel_diff": rel, "cost": cost, "scipy_cost": ref.cost}
    finally:
        jax.config.update("jax_enable_x64", previous)


if __name__ == "__main__":
    cp.enable_compilation_cache()  # the next run loads its programs from ~/.cache/curvplan/jax
    main()
