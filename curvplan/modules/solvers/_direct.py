"""Direct, diagonal and identity solvers (docs/math.md §3.4, §3.5): ``%direction.newton`` without CG."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from pydantic import Field

from curvplan.ir import carried, fresh
from curvplan.ir import quantities as q
from curvplan.ir._errors import LoweringError
from curvplan.modules import _linalg
from curvplan.modules._base import Module
from curvplan.modules.curvature._operators import curv_op


def materialize(mv, params) -> jax.Array:
    """The dense symmetric matrix of a pytree operator (n products, one per basis vector), symmetrized."""
    flat, unravel = ravel_pytree(params)
    n = flat.shape[0]
    cols = jax.vmap(lambda e: ravel_pytree(mv(unravel(e)))[0])(jnp.eye(n, dtype=flat.dtype))
    return 0.5 * (cols + cols.T)


class DenseDirect(Module):
    """Solves ``(C + λI) s = g`` exactly by materializing C (n operator products): small problems and tests.

    ``method="solve"``: LU (`jnp.linalg.solve`, fine for an indefinite C + λI). ``method="eigh"``:
    C = Q diag(w) Qᵀ, s = Q (Qᵀg / (w + λ)), and reports the extreme eigenvalues of C.

    Args:
        max_params: refuse (at trace time) to materialize more than this many parameters.

    >>> from curvplan.modules.solvers._direct import DenseDirect
    >>> [x.name for x in DenseDirect().outputs()]
    ['%direction.newton']
    """

    kind: Literal["dense_direct"] = "dense_direct"
    method: Literal["solve", "eigh"] = "solve"
    max_params: int = Field(4096, ge=1)
    info_fields = (("direct_eig_min", "float"), ("direct_eig_max", "float"), ("lambda", "float"))

    def consumes(self):
        return {"op": fresh(curv_op()), "grad": fresh(q.grad()), "lam": carried(q.lam())}

    def produces(self):
        return {"direction": q.direction("newton")}

    def apply(self, inputs, state, ctx):
        op, g, lam = inputs.op, inputs.grad, inputs.lam
        gf, unravel = ravel_pytree(g)
        n = gf.shape[0]
        if n > self.max_params:
            raise LoweringError(
                f"DenseDirect would materialize a {n}x{n} curvature matrix (max_params={self.max_params})",
                where=f"module `{ctx.module}`, quantity %curv_op",
                fix="use `CG` or a row-space solver for models this size, or raise `max_params`",
            )
        C = materialize(op.mv, g)
        info = {"lambda": lam}
        if self.method == "solve":
            s = jnp.linalg.solve(C + lam * jnp.eye(n, dtype=C.dtype), gf)
        else:
            w, Q = _linalg.eigh(C)
            s = Q @ ((Q.T @ gf) / (w + lam))
            info |= {"direct_eig_min": w[0], "direct_eig_max": w[-1]}
        return {"direction": unravel(s)}, state, info


class DiagonalSolve(Module):
    """``s = g / (max(d, 0) + λ + eps)`` with ``d`` the carried ``%precond.diag`` (Somax's DiagDirect).

    Never calls the curvature operator. Pair it with a diagonal estimator and `DiagEMA` (``beta=0`` uses
    the latest estimate as is).

    >>> from curvplan.modules.solvers._direct import DiagonalSolve
    >>> [u.quantity.name for u in DiagonalSolve().uses()]
    ['%grad', '%precond.diag', '%lambda']
    """

    kind: Literal["diagonal_solve"] = "diagonal_solve"
    eps: float = Field(1e-8, ge=0.0)

    def consumes(self):
        return {"grad": fresh(q.grad()), "diag": carried(q.precond_diag()), "lam": carried(q.lam())}

    def produces(self):
        return {"direction": q.direction("newton")}

    def apply(self, inputs, state, ctx):
        g, d, lam = inputs.grad, inputs.diag, inputs.lam
        s = jax.tree.map(lambda gi, di: gi / (jnp.maximum(di, 0) + lam + self.eps), g, d)
        return {"direction": s}, state


class IdentitySolve(Module):
    """``s = g``: the identity solver of Somax's diagonal lane (plain gradient direction).

    >>> from curvplan.modules.solvers._direct import IdentitySolve
    >>> [u.quantity.name for u in IdentitySolve().uses()]
    ['%grad']
    """

    kind: Literal["identity_solve"] = "identity_solve"

    def consumes(self):
        return {"grad": fresh(q.grad())}

    def produces(self):
        return {"direction": q.direction("newton")}

    def apply(self, inputs, state, ctx):
        return {"direction": inputs.grad}, state
