from __future__ import annotations

from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
from pydantic import Field

from curvplan.ir import carried, fresh
from curvplan.ir import quantities as q
from curvplan.modules._base import Module, tree_add_scaled, tree_vdot
from curvplan.modules.curvature import curv_op


class CGResult(NamedTuple):
    x: Any
    iterations: jax.Array
    residual: jax.Array
    converged: jax.Array
    negative_curvature: jax.Array


def conjugate_gradient(
    matvec: Callable[[Any], Any],
    b: Any,
    x0: Any | None = None,
    *,
    tol: float = 1e-5,
    maxiter: int = 20,
    precond: Callable[[Any], Any] | None = None,
    stabilise_every: int = 0,
) -> CGResult:
    """(Preconditioned) conjugate gradient on pytrees, stopping on non-positive curvature.

    Iterates while ``‖r‖ > tol·‖b‖`` and fewer than ``maxiter`` iterations ran. If a search direction has
    ``pᵀAp <= 0`` the solve stops and returns the current iterate (or ``b`` itself when that iterate is still
    zero), instead of dividing by a tiny or negative number (Steihaug). ``stabilise_every=k`` recomputes the
    residual from scratch every k iterations (one extra matvec) and restarts the direction.

    Examples:
        >>> import jax.numpy as jnp
        >>> A = jnp.array([[4.0, 1.0], [1.0, 3.0]])
        >>> res = conjugate_gradient(lambda v: A @ v, jnp.array([1.0, 2.0]), tol=1e-6)
        >>> [round(float(v), 4) for v in res.x], int(res.iterations)
        ([0.0909, 0.6364], 2)
    """
    plain = precond is None
    precond = precond or (lambda r: r)
    x = jax.tree.map(jnp.zeros_like, b) if x0 is None else x0
    r = jax.tree.map(jnp.subtract, b, matvec(x)) if x0 is not None else b
    bb = tree_vdot(b, b)
    tiny = jnp.finfo(jnp.result_type(bb)).tiny
    bound = tol**2 * jnp.maximum(bb, tiny)
    z = precond(r)
    rz = tree_vdot(r, z)
    rr = rz if plain else tree_vdot(r, r)
    eps = jnp.finfo(jnp.result_type(bb)).eps

    # The loop carries r·r (equal to r·z without a preconditioner) so the stopping test costs nothing; on
    # non-positive curvature alpha is 0, which leaves x and r unchanged, and the loop ends.
    def cond(c):
        x, r, z, p, rz, rr, k, neg = c
        return (k < maxiter) & (rr > bound) & ~neg

    def body(c):
        x, r, z, p, rz, rr, k, neg = c
        ap = matvec(p)
        pap = tree_vdot(p, ap)
        neg_now = pap <= eps * jnp.maximum(tree_vdot(p, p), tiny)
        alpha = jnp.where(neg_now, 0.0, rz / jnp.where(neg_now, 1.0, pap))
        x_new = tree_add_scaled(x, alpha, p)
        r_new = tree_add_scaled(r, -alpha, ap)
        if stabilise_every and 0 < stabilise_every < maxiter:
            restart = ((k + 1) % stabilise_every == 0) & ~neg_now
            r_new = jax.lax.cond(
                restart, lambda: jax.tree.map(jnp.subtract, b, matvec(x_new)), lambda: r_new
            )
        else:
            restart = jnp.asarray(False)
        z_new = precond(r_new)
        rz_new = tree_vdot(r_new, z_new)
        rr_new = rz_new if plain else tree_vdot(r_new, r_new)
        beta = jnp.where(restart, 0.0, rz_new / jnp.maximum(rz, tiny))
        p_new = tree_add_scaled(z_new, beta, p)
        return (x_new, r_new, z_new, p_new, rz_new, rr_new, k + jnp.where(neg_now, 0, 1), neg_now)

    init = (x, r, z, z, rz, rr, jnp.zeros((), jnp.int32), jnp.asarray(False))
    x, r, _, _, _, rr, k, neg = jax.lax.while_loop(cond, body, init)
    # negative curvature before any progress: return the first search direction p0 = M⁻¹ r0 (Steihaug);
    # a non-finite b propagates, so the step's non-finite guard sees it.
    fallback = (neg & (tree_vdot(x, x) == 0)) | ~jnp.isfinite(bb)
    x = jax.tree.map(lambda xi, pi: jnp.where(fallback, pi, xi), x, z)
    rel = jnp.sqrt(rr / jnp.maximum(bb, tiny))
    return CGResult(x, k, rel, rr <= bound, neg)


class CG(Module):
    """Solves ``(C + λI) s = g`` by conjugate gradient; produces ``%direction.newton``.

    Args:
        tol: relative residual tolerance ``‖r‖ / ‖g‖``.
        maxiter: iteration cap.
        warm_start: start from the previous step's solution (kept in state).
        warm_start_decay: start from ζ times the previous solution (Martens' Hessian-free uses ζ ≈ 0.95).
        stabilise_every: recompute the residual every k iterations (0: never).
        precondition: divide residuals by ``max(d, 0) + λ + 1e-8`` where ``d`` is the carried
            ``%precond.diag`` produced by a diagonal preconditioner module.

    >>> from curvplan.modules import CG
    >>> CG(maxiter=10).info_fields[0]
    ('cg_iters', 'int')
    """

    kind: Literal["cg"] = "cg"
    tol: float = Field(1e-5, gt=0)
    maxiter: int = Field(20, ge=1)
    warm_start: bool = True
    warm_start_decay: float = Field(1.0, ge=0.0, le=1.0)
    stabilise_every: int = Field(0, ge=0)
    precondition: bool = False
    cost = 0.0
    info_fields = (("cg_iters", "int"), ("cg_residual", "float"), ("cg_converged", "bool"),
                   ("cg_negative_curvature", "bool"), ("lambda", "float"))

    @property
    def state_fields(self):  # type: ignore[override]
        return ("x",) if self.warm_start else ()

    def consumes(self):
        uses = (fresh(curv_op()), fresh(q.grad()), carried(q.lam()))
        return uses + ((carried(q.quantity("precond", "diag")),) if self.precondition else ())

    def produces(self):
        return (q.direction("newton"),)

    def init(self, params, ctx):
        return jax.tree.map(jnp.zeros_like, params) if self.warm_start else ()

    def apply(self, inputs, state, ctx):
        op, g, lam = inputs[curv_op()], inputs[q.grad()], inputs[q.lam()]
        precond = None
        if self.precondition:
            d = inputs[q.quantity("precond", "diag")]
            precond = lambda r: jax.tree.map(lambda ri, di: ri / (jnp.maximum(di, 0) + lam + 1e-8), r, d)  # noqa
        x0 = None
        if self.warm_start:
            x0 = state if self.warm_start_decay == 1.0 else jax.tree.map(lambda x: self.warm_start_decay * x, state)
        res = conjugate_gradient(
            op.damped(lam).mv, g, x0, tol=self.tol, maxiter=self.maxiter,
            precond=precond, stabilise_every=self.stabilise_every,
        )
        ctx.report("cg_iters", res.iterations)
        ctx.report("cg_residual", res.residual)
        ctx.report("cg_converged", res.converged)
        ctx.report("cg_negative_curvature", res.negative_curvature)
        ctx.report("lambda", lam)
        return {q.direction("newton"): res.x}, (res.x if self.warm_start else state)
