"""Row-space (Woodbury) Gauss-Newton solves, MSE and CE, Cholesky and CG (docs/math.md §2.5, §3.2-3.3, §8.1).

With mean reduction the GGN system is ``(C + λI) s = g``, ``C = (1/B) Jᵀ Λ J``, ``g = (1/B) Jᵀ r`` (r_b the
per-example ∂ℓ_b/∂F_b). Factor ``Λ_b = L_b L_bᵀ``, set ``J̃_b = L_bᵀ J_b`` and ``r̃`` with ``L_b r̃_b = r_b``;
then ``s = J̃ᵀ u`` with ``(J̃ J̃ᵀ + B λ I) u = r̃``, an (m × m) system with m = B · C rows.

CE factors (both correct; Somax v1.0.1 uses ``L_b J_b`` and ``L_b⁻ᵀ r_b``, which solves another system):

- ``ce_factor="exact"`` (default): ``L_b = diag(√p) − p √pᵀ`` satisfies ``L_b L_bᵀ = diag(p) − p pᵀ``
  exactly (``I − √p√pᵀ`` is a projection), and ``r̃_b = r_b / √p`` (since Σ r_b = 0). No ε, no per-example
  Cholesky.
- ``ce_factor="cholesky"``: ``L_b = chol(Λ_b + εI)``, ``r̃_b = L_b⁻¹ r_b`` (the curvature gains ε JᵀJ / B).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from pydantic import Field

from curvplan.ir import carried, fresh
from curvplan.ir import quantities as q
from curvplan.ir._errors import LoweringError
from curvplan.modules import _linalg
from curvplan.modules._base import Module
from curvplan.modules.solvers._cg import CG_RESULTS, conjugate_gradient

_HI = _linalg.HIGHEST


def row_system(lin, ce_factor: str = "exact", eps: float = 1e-6):
    """``(apply_t, apply, rt)``: u ↦ J̃ᵀu (params), v ↦ J̃v (rows), and r̃, for a `%model_lin` value.

    Row vectors are flat of size m = B · C (C = 1 for scalar outputs).
    """
    out = lin.outputs
    B = out.shape[0]
    F = jax.lax.stop_gradient(out).reshape(B, -1)
    C = F.shape[1]
    r = lin.residual.reshape(B, C)
    if lin.loss_kind == "mse":
        L = None
        rt = r
    else:
        p = jax.nn.softmax(F, axis=-1)
        if ce_factor == "exact":
            sp = jnp.sqrt(jnp.maximum(p, jnp.finfo(p.dtype).tiny))
            L = jax.vmap(jnp.diag)(sp) - p[:, :, None] * sp[:, None, :]
            rt = r / sp
        else:
            lam_b = jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]
            L = _linalg.cholesky(lam_b + eps * jnp.eye(C, dtype=p.dtype))
            rt = _linalg.solve_triangular(L, r[..., None], lower=True)[..., 0]

    def apply_t(u):  # J̃ᵀ u = Jᵀ (L u)
        u = u.reshape(B, C)
        w = u if L is None else jnp.einsum("bij,bj->bi", L, u, precision=_HI)
        return lin.vjp(w.reshape(out.shape))

    def apply(v):  # J̃ v = Lᵀ (J v)
        jv = lin.jvp(v).reshape(B, C)
        return (jv if L is None else jnp.einsum("bji,bj->bi", L, jv, precision=_HI)).reshape(-1)

    return apply_t, apply, rt.reshape(-1)


class RowSpace(Module):
    """Gauss-Newton direction solved in the row space (EGN): produces ``%direction.newton`` = (C + λI)⁻¹ g.

    Args:
        loss: the objective's loss kind (``mse``: J̃ = J; ``ce``: see ``ce_factor``).
        solver: ``cholesky`` forms J̃ explicitly (m VJPs), K = J̃J̃ᵀ + BλI, and solves by Cholesky;
            ``cg`` runs CG on K (one JVP + one VJP per iteration, no warm start since m follows the batch).
        ce_factor: ``exact`` (closed-form factor of diag(p) − ppᵀ) or ``cholesky`` (of Λ_b + εI).
        eps: the ε of ``ce_factor="cholesky"``.
        jitter: added to K's diagonal (relative to its mean diagonal) for the Cholesky solve.

    >>> from curvplan.modules.solvers._row import RowSpace
    >>> [u.quantity.name for u in RowSpace(loss="ce").uses()]
    ['%model_lin', '%lambda']
    """

    kind: Literal["row_space"] = "row_space"
    loss: Literal["mse", "ce"] = "mse"
    solver: Literal["cholesky", "cg"] = "cholesky"
    ce_factor: Literal["exact", "cholesky"] = "exact"
    eps: float = Field(1e-6, gt=0)
    jitter: float = Field(0.0, ge=0)
    tol: float = Field(1e-5, gt=0)
    maxiter: int = Field(20, ge=1)
    info_fields = (("row_dim", "int"), ("row_cg_iters", "int"), ("row_cg_residual", "float"),
                   ("row_cg_converged", "bool"), ("lambda", "float"))

    def consumes(self):
        return {"lin": fresh(q.model_lin()), "lam": carried(q.lam())}

    def produces(self):
        return {"direction": q.direction("newton")}

    def apply(self, inputs, state, ctx):
        lin, lam = inputs.lin, inputs.lam
        if lin.loss_kind != self.loss:
            raise LoweringError(
                f"RowSpace(loss={self.loss!r}) but the objective's loss is {lin.loss_kind!r}",
                where=f"module `{ctx.module}`, quantity %model_lin",
                fix=f"use `RowSpace(loss={lin.loss_kind!r})` or give `loss={self.loss!r}` to the optimizer",
            )
        apply_t, apply, rt = row_system(lin, self.ce_factor, self.eps)
        m = rt.shape[0]
        mu = lin.outputs.shape[0] * lam
        info = {"row_dim": jnp.asarray(m, jnp.int32), "lambda": lam}
        if self.solver == "cholesky":
            rows = jax.vmap(apply_t)(jnp.eye(m, dtype=rt.dtype))  # J̃ᵀ e_i for every row i
            flat = jnp.concatenate([x.reshape(m, -1) for x in jax.tree.leaves(rows)], axis=1)
            K = jnp.matmul(flat, flat.T, precision=_HI)
            K = 0.5 * (K + K.T)
            K = K + (mu + self.jitter * jnp.mean(jnp.diag(K))) * jnp.eye(m, dtype=K.dtype)
            u = jax.scipy.linalg.cho_solve((_linalg.cholesky(K), True), rt)
            s = jax.tree.map(lambda x: jnp.tensordot(u, x, axes=1, precision=_HI), rows)
        else:
            res = conjugate_gradient(lambda u: apply(apply_t(u)) + mu * u, rt, tol=self.tol,
                                     maxiter=self.maxiter)
            s = apply_t(res.value)
            info |= {"row_cg_iters": res.stats["num_steps"], "row_cg_residual": res.stats["residual"],
                     "row_cg_converged": res.result == CG_RESULTS.successful}
        return {"direction": s}, state, info
