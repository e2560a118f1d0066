"""Lanczos extreme eigenvalues of the curvature (docs/math.md §2.6: Somax declares a spectrum only)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from pydantic import Field

from curvplan.ir import fresh
from curvplan.ir import quantities as q
from curvplan.modules._base import Module
from curvplan.modules.curvature._fisher import require_rng
from curvplan.modules.curvature._operators import curv_op


def lanczos_ritz_values(matvec: Callable[[jax.Array], jax.Array], v0: jax.Array, iters: int,
                        key: jax.Array) -> jax.Array:
    """Ritz values (ascending) of ``iters`` Lanczos steps on a symmetric operator over flat vectors.

    Full reorthogonalisation (two Gram-Schmidt passes against every previous vector). On breakdown (the
    Krylov space is invariant) the next vector is a fresh random one orthogonal to the basis and the coupling
    is zero, so ``iters = n`` returns every eigenvalue, repeated ones included.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> A = jnp.diag(jnp.array([3.0, -1.0, 2.0]))
        >>> r = lanczos_ritz_values(lambda v: A @ v, jnp.ones(3), 3, jax.random.key(0))
        >>> [round(float(x), 4) for x in r]
        [-1.0, 2.0, 3.0]
    """
    n = v0.shape[0]
    iters = min(iters, n)
    dt = v0.dtype
    eps = jnp.finfo(dt).eps
    V = jnp.zeros((iters + 1, n), dt).at[0].set(v0 / jnp.linalg.norm(v0))

    def orth(V, w):
        for _ in range(2):  # rows of V not yet filled are zero and do nothing
            w = w - V.T @ (V @ w)
        return w

    def body(j, c):
        V, alpha, beta, anorm = c
        w = matvec(V[j])
        anorm = jnp.maximum(anorm, jnp.linalg.norm(w))
        a = jnp.vdot(V[j], w)
        w = orth(V, w)
        b = jnp.linalg.norm(w)
        broke = b <= 10 * jnp.sqrt(n) * eps * jnp.maximum(anorm, jnp.finfo(dt).tiny)

        def restart():
            r = orth(V, orth(V, jax.random.normal(jax.random.fold_in(key, j), (n,), dt)))
            return r / jnp.linalg.norm(r)

        nxt = jax.lax.cond(broke, restart, lambda: w / b)
        V = V.at[j + 1].set(nxt)
        return V, alpha.at[j].set(a), beta.at[j].set(jnp.where(broke, 0.0, b)), anorm

    init = (V, jnp.zeros(iters, dt), jnp.zeros(iters, dt), jnp.zeros((), dt))
    _, alpha, beta, _ = jax.lax.fori_loop(0, iters, body, init)
    T = jnp.diag(alpha) + jnp.diag(beta[:-1], 1) + jnp.diag(beta[:-1], -1)
    return jnp.linalg.eigvalsh(T)


class Lanczos(Module):
    """Extreme eigenvalue estimates of `%curv_op` by Lanczos with full reorthogonalisation.

    Produces ``%eigvals.curvature[est=lanczos, ...]``: the ``k`` largest (descending) for
    ``which="largest"``, the ``k`` smallest (ascending) for ``"smallest"``, or both concatenated (smallest
    ascending, then largest descending) for ``"both"``. Memory: ``iters + 1`` parameter-sized vectors.

    Args:
        iters: Lanczos steps (operator products); capped at the number of parameters.
        k: how many eigenvalues at each requested end.

    >>> from curvplan.modules.estimators._lanczos import Lanczos
    >>> Lanczos(iters=10).outputs()
    (eigvals[curvature; est=lanczos, iters=10, k=1, which=both],)
    """

    kind: Literal["lanczos"] = "lanczos"
    iters: int = Field(20, ge=1)
    k: int = Field(1, ge=1)
    which: Literal["largest", "smallest", "both"] = "both"
    sink = True  # telemetry: runs even when nothing reads the estimates
    info_fields = (("eig_max", "float"), ("eig_min", "float"), ("lanczos_iters", "int"))

    def consumes(self):
        return {"op": fresh(curv_op()), "rng": fresh(q.rng())}

    def produces(self):
        return {"eigvals": q.eigvals("curvature", est="lanczos", iters=self.iters, k=self.k, which=self.which)}

    def apply(self, inputs, state, ctx):
        key = require_rng(inputs.rng, ctx, "a random start vector")
        op = inputs.op
        flat, unravel = ravel_pytree(ctx.params)
        k0, k1 = jax.random.split(key)
        v0 = jax.random.normal(k0, flat.shape, flat.dtype)
        ritz = lanczos_ritz_values(lambda v: ravel_pytree(op.mv(unravel(v)))[0], v0, self.iters, k1)
        k = min(self.k, ritz.shape[0])
        small, large = ritz[:k], ritz[::-1][:k]
        out = {"largest": large, "smallest": small, "both": jnp.concatenate([small, large])}[self.which]
        info = {"eig_max": ritz[-1], "eig_min": ritz[0], "lanczos_iters": jnp.asarray(ritz.shape[0], jnp.int32)}
        return {"eigvals": out}, state, info
