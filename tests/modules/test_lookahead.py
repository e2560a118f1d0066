"""`Lookahead` against its recurrence written out in NumPy, and its plan text."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from helpers import random_grads, run_optax

import curvplan as cp


def test_lookahead_matches_the_numpy_recurrence():
    grads = random_grads(0, {"w": (3, 2), "b": (2,)}, 4)
    mods = [cp.modules.IdentitySolve(), cp.modules.Lookahead(beta=0.5),
            cp.modules.UpdateTail(learning_rate=0.1, source="lookahead")]
    ups, _ = run_optax(mods, {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}, grads)
    prev = {k: np.zeros_like(np.asarray(v)) for k, v in grads[0].items()}
    for g, u in zip(grads, ups):
        for k in g:
            now = np.asarray(g[k], np.float64)
            np.testing.assert_allclose(np.asarray(u[k]), -0.1 * (now + 0.5 * (now - prev[k])), rtol=1e-6, atol=1e-7)
            prev[k] = now


def test_lookahead_state_line_comes_from_its_state_type():
    plan = cp.compile_plan([cp.modules.IdentitySolve(), cp.modules.Lookahead(),
                            cp.modules.UpdateTail(source="lookahead")], name="la")
    assert "lookahead.previous" in plan.state
