"""Conjugate gradient on pytrees with Steihaug-Toint stopping, and the `CG` module (docs/math.md §3.1).

`conjugate_gradient` returns a `Solution` shaped like lineax's: the ``value``, a ``result`` code from `CG_RESULTS`
and a ``stats`` mapping.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from pydantic import Field

from curvplan.ir import carried, fresh
from curvplan.ir import quantities as q
from curvplan.modules._base import Module
from curvplan.modules.curvature import curv_op


class CG_RESULTS:  # noqa: N801  (a namespace of result codes, as lineax's RESULTS)
    """Why `conjugate_gradient` stopped (the ``result`` of its `Solution`)."""

    successful = 0
    """The relative residual fell below ``tol``."""
    max_steps_reached = 1
    """``maxiter`` iterations ran first."""
    negative_curvature = 2
    """A search direction had ``pᵀAp <= 0`` (the operator is not positive definite there)."""
    radius_reached = 3
    """The iterate reached the trust radius and was stopped on its boundary."""


class Solution(NamedTuple):
    """What `conjugate_gradient` returns.

    Attributes:
        value: the approximate solution (a pytree like ``b``).
        result: an int32 code from `CG_RESULTS`.
        stats: ``num_steps`` (iterations, int32), ``residual`` (final ``‖r‖/‖b‖``).
    """

    value: Any
    result: jax.Array
    stats: dict[str, jax.Array]


def _boundary(x, p, radius):
    """τ >= 0 with ``‖x + τp‖ = radius`` (for ``‖x‖ <= radius``)."""
    xp, pp, xx = optax.tree.vdot(x, p), optax.tree.vdot(p, p), optax.tree.vdot(x, x)
    pp_safe = jnp.maximum(pp, jnp.finfo(jnp.result_type(pp)).tiny)
    disc = jnp.maximum(xp**2 + pp * (radius**2 - xx), 0.0)
    return (-xp + jnp.sqrt(disc)) / pp_safe


def conjugate_gradient(
    matvec: Callable[[Any], Any],
    b: Any,
    x0: Any | None = None,
    *,
    tol: float = 1e-5,
    maxiter: int = 20,
    precond: Callable[[Any], Any] | None = None,
    stabilise_every: int = 0,
    radius: Any | None = None,
) -> Solution:
    """(Preconditioned) conjugate gradient on pytrees for ``A x = b``, stopping on non-positive curvature.

    Iterates while ``‖r‖ > tol·‖b‖`` and fewer than ``maxiter`` iterations ran. If a search direction has
    ``pᵀAp <= 0`` the solve stops instead of dividing by a tiny or negative number: without a ``radius`` it
    returns the current iterate (or the first search direction when that iterate is still zero); with a
    ``radius`` Δ it follows the direction to the boundary ``‖x‖ = Δ`` (Steihaug-Toint), and an iterate that
    would leave the ball is stopped on its boundary too. ``stabilise_every=k`` recomputes the residual from
    scratch every k iterations (one extra matvec) and restarts the direction.

    Examples:
        >>> import jax.numpy as jnp
        >>> A = jnp.array([[4.0, 1.0], [1.0, 3.0]])
        >>> sol = conjugate_gradient(lambda v: A @ v, jnp.array([1.0, 2.0]), tol=1e-6)
        >>> [round(float(v), 4) for v in sol.value], int(sol.stats["num_steps"]), int(sol.result)
        ([0.0909, 0.6364], 2, 0)
        >>> sol = conjugate_gradient(lambda v: A @ v, jnp.array([1.0, 2.0]), radius=0.1)
        >>> round(float(jnp.linalg.norm(sol.value)), 4), int(sol.result) == CG_RESULTS.radius_reached
        (0.1, True)
    """
    vdot, add_scale = optax.tree.vdot, optax.tree.add_scale
    plain = precond is None
    precond = precond or (lambda r: r)
    bounded = radius is not None
    x = jax.tree.map(jnp.zeros_like, b) if x0 is None else x0
    bb = vdot(b, b)
    dt = jnp.result_type(bb)
    tiny, eps = jnp.finfo(dt).tiny, jnp.finfo(dt).eps
    if bounded:  # a warm start outside the ball is pulled onto it
        shrink = jnp.minimum(1.0, radius / jnp.maximum(jnp.sqrt(vdot(x, x)), tiny))
        x = jax.tree.map(lambda v: shrink * v, x)
    r = jax.tree.map(jnp.subtract, b, matvec(x)) if x0 is not None else b
    bound = tol**2 * jnp.maximum(bb, tiny)
    z = precond(r)
    rz = vdot(r, z)
    rr = rz if plain else vdot(r, r)

    # The loop carries r·r (equal to r·z without a preconditioner) so the stopping test costs nothing; on
    # non-positive curvature (or the boundary) the last move is made and the loop ends.
    def cond(c):
        x, r, z, p, rz, rr, k, stop = c
        return (k < maxiter) & (rr > bound) & (stop == CG_RESULTS.successful)

    def body(c):
        x, r, z, p, rz, rr, k, _ = c
        ap = matvec(p)
        pap = vdot(p, ap)
        neg = pap <= eps * jnp.maximum(vdot(p, p), tiny)
        alpha = jnp.where(neg, 0.0, rz / jnp.where(neg, 1.0, pap))
        stop = jnp.where(neg, CG_RESULTS.negative_curvature, CG_RESULTS.successful)
        if bounded:
            x_try = add_scale(x, alpha, p)
            out = vdot(x_try, x_try) >= radius**2
            tau = _boundary(x, p, radius)
            alpha = jnp.where(neg | out, tau, alpha)
            stop = jnp.where(out & ~neg, CG_RESULTS.radius_reached, stop)
        x_new = add_scale(x, alpha, p)
        r_new = add_scale(r, -alpha, ap)
        if stabilise_every and 0 < stabilise_every < maxiter:
            restart = ((k + 1) % stabilise_every == 0) & ~neg
            r_new = jax.lax.cond(restart, lambda: jax.tree.map(jnp.subtract, b, matvec(x_new)), lambda: r_new)
        else:
            restart = jnp.asarray(False)
        z_new = precond(r_new)
        rz_new = vdot(r_new, z_new)
        rr_new = rz_new if plain else vdot(r_new, r_new)
        beta = jnp.where(restart, 0.0, rz_new / jnp.maximum(rz, tiny))
        p_new = add_scale(z_new, beta, p)
        moved = (~neg) | bounded
        return (x_new, r_new, z_new, p_new, rz_new, rr_new, k + jnp.where(moved, 1, 0), stop.astype(jnp.int32))

    init = (x, r, z, z, rz, rr, jnp.zeros((), jnp.int32), jnp.asarray(CG_RESULTS.successful, jnp.int32))
    x, r, _, _, _, rr, k, stop = jax.lax.while_loop(cond, body, init)
    if not bounded:
        # negative curvature before any progress: return the first search direction p0 = M⁻¹ r0 (Steihaug);
        # a non-finite b propagates, so the step's non-finite guard sees it.
        fallback = ((stop == CG_RESULTS.negative_curvature) & (vdot(x, x) == 0)) | ~jnp.isfinite(bb)
        x = jax.tree.map(lambda xi, pi: jnp.where(fallback, pi, xi), x, z)
    converged = rr <= bound
    result = jnp.where(stop != CG_RESULTS.successful, stop,
                       jnp.where(converged, CG_RESULTS.successful, CG_RESULTS.max_steps_reached))
    rel = jnp.sqrt(rr / jnp.maximum(bb, tiny))
    return Solution(x, result.astype(jnp.int32), {"num_steps": k, "residual": rel})


class CGState(NamedTuple):
    """The previous solution (the warm start; ``()`` without ``warm_start``)."""

    x: Any


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
        radius: a trust radius Δ on ``‖s‖`` (Steihaug-Toint): on non-positive curvature, or where an iterate
            would leave the ball, the solve stops on its boundary. ``None``: unbounded.

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
    radius: float | None = Field(None, gt=0, allow_inf_nan=False)
    info_fields = (("cg_iters", "int"), ("cg_residual", "float"), ("cg_converged", "bool"),
                   ("cg_negative_curvature", "bool"), ("cg_radius_reached", "bool"), ("lambda", "float"))

    def consumes(self):
        uses = {"op": fresh(curv_op()), "grad": fresh(q.grad()), "lam": carried(q.lam())}
        return uses | ({"diag": carried(q.precond_diag())} if self.precondition else {})

    def produces(self):
        return {"direction": q.direction("newton")}

    def init(self, params, ctx) -> CGState:
        return CGState(jax.tree.map(jnp.zeros_like, params) if self.warm_start else ())

    def apply(self, inputs, state: CGState, ctx):
        op, g, lam = inputs.op, inputs.grad, inputs.lam
        precond = None
        if self.precondition:
            d = inputs.diag
            precond = lambda r: jax.tree.map(  # noqa: E731  (λ in each leaf's dtype, as in `LinearOperator.damped`)
                lambda ri, di: ri / (jnp.maximum(di, 0) + jnp.asarray(lam, ri.dtype) + 1e-8), r, d)
        x0 = None
        if self.warm_start:
            x0 = jax.tree.map(lambda x: self.warm_start_decay * x, state.x) if self.warm_start_decay != 1.0 \
                else state.x
        sol = conjugate_gradient(op.damped(lam).mv, g, x0, tol=self.tol, maxiter=self.maxiter,
                                 precond=precond, stabilise_every=self.stabilise_every, radius=self.radius)
        info = {"cg_iters": sol.stats["num_steps"], "cg_residual": sol.stats["residual"],
                "cg_converged": sol.result == CG_RESULTS.successful,
                "cg_negative_curvature": sol.result == CG_RESULTS.negative_curvature,
                "cg_radius_reached": sol.result == CG_RESULTS.radius_reached, "lambda": lam}
        return {"direction": sol.value}, CGState(sol.value if self.warm_start else ()), info
