"""Shampoo: P = L̃^(-1/4) G R̃^(-1/4) per matrix block, from the shared eigendecomposition, with grafting.

>>> import curvplan as cp
>>> from curvplan.modules.preconditioners._shampoo import shampoo
>>> print(cp.compile_plan(shampoo(root_every=10, start_preconditioning_step=5), name="shampoo"))
... # doctest: +ELLIPSIS
plan shampoo: 2 phases, prefix 5, period 10
...
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from pydantic import Field

from curvplan.ir import carried, fresh
from curvplan.ir import quantities as q
from curvplan.modules._base import Module
from curvplan.modules.preconditioners._grad_gram import (
    Eigbasis,
    Eigen,
    GradGram,
    GramConsumer,
    GramEigbasis,
    Spec,
    assemble,
    blocks_of,
    count_fallback,
    mm,
    per_leaf,
    spec_layout,
    stat_dtype,
)
from curvplan.modules.transforms import UpdateTail


def inverse_root(e: Eigen, exponent: float = 4.0, epsilon: float = 1e-6, epsilon_abs: float = 0.0) -> jax.Array:
    """``(A + (max(ε, u)·λ_max(A) + ε_abs) I)^(-1/exponent)`` from A's eigendecomposition ``e`` (relative floor).

    ``u`` is the machine epsilon of ``e``'s dtype (float32: 2^-23, about 1.2e-7): eigenvalues below u·λ_max are
    rounding noise of the factor and of ``eigh``, so even ε = 0 keeps the root of a rank-deficient factor finite.

    >>> import jax.numpy as jnp
    >>> from curvplan.modules.preconditioners._grad_gram import Eigen
    >>> e = Eigen(jnp.eye(2), jnp.array([16.0, 1.0]), jnp.arange(2))
    >>> [round(float(x), 4) for x in jnp.diag(inverse_root(e, epsilon=0.0))]
    [0.5, 1.0]
    """
    floor = max(epsilon, float(jnp.finfo(e.lam.dtype).eps)) * jnp.max(e.lam) + epsilon_abs
    w = (jnp.maximum(e.lam, 0) + floor) ** (-1.0 / exponent)  # a PSD factor: a negative λ is rounding
    return mm(e.Q * w[None, :], e.Q.T)


class ShampooState(NamedTuple):
    """``roots`` (per block ``(L̃^(-1/e), R̃^(-1/e))``) and ``graft`` (the grafting accumulator) hold one entry per
    parameter leaf, in leaf order (`per_leaf`); ``seen`` is the ``count`` of the basis the roots were computed
    from, ``failures`` the roots that were not finite (cumulative), ``count`` the steps taken."""

    roots: Any
    seen: jax.Array
    failures: jax.Array
    graft: Any
    count: jax.Array


class Shampoo(GramConsumer):
    """Shampoo direction ``%direction.shampoo`` from the carried ``%eigbasis.grad_gram``.

    Per matrix block, P = L̃^(-1/exponent) G R̃^(-1/exponent) with L̃ = L + (max(ε, u)·λ_max + ε_abs) I, u the
    machine epsilon of the statistics' dtype (`inverse_root`). The roots
    are recomputed when the eigendecomposition was refreshed (its ``count`` changed); a root that is not finite
    keeps the previous one and is counted (``shampoo_root_failures``). With grafting, each block is rescaled to
    the norm of the graft direction D: (‖D‖/‖P‖)·P, where D is ``g`` (``"sgd"``), ``g/(√Σg² + eps)``
    (``"adagrad"``) or ``g/(√v̂ + eps)`` with v̂ the bias-corrected EMA of g² (``"adam"``; momentum comes from the
    update tail). Vectors and matrices that `GradGram` leaves to the diagonal fallback use D (reported as
    ``shampoo_fallback_leaves``); before the first refresh every leaf uses D (``start_preconditioning_step``).

    Args:
        gram: settings of the factors (`GradGram.spec`).
        method: which eigendecomposition to read (``"eigh"``; ``"power_qr"`` shares SOAP's).
    """

    kind: Literal["shampoo"] = "shampoo"
    blockwise = True
    gram: Spec = GradGram().spec
    method: Literal["eigh", "power_qr"] = "eigh"
    exponent: float = Field(4.0, gt=0)
    epsilon: float = Field(1e-6, ge=0)
    epsilon_abs: float = Field(0.0, ge=0)
    graft: Literal["none", "sgd", "adagrad", "adam"] = "adagrad"
    graft_beta2: float = Field(0.999, ge=0, lt=1)
    graft_eps: float = Field(1e-10, gt=0)
    info_fields = (("shampoo_root_failures", "int"), ("shampoo_fallback_leaves", "int"))

    def consumes(self):
        return {"grad": fresh(q.grad()), "basis": carried(self._basis())}

    def produces(self):
        return {"direction": q.direction("shampoo")}

    def init(self, params, ctx) -> ShampooState:
        def roots(p):
            lay = spec_layout(self.gram, p.shape)
            dt = stat_dtype(p)
            return () if lay is None else tuple(
                (jnp.eye(r1 - r0, dtype=dt), jnp.eye(c1 - c0, dtype=dt)) for r0, r1, c0, c1 in lay)

        graft = per_leaf(lambda p: jnp.zeros(p.shape, stat_dtype(p)), params) if self.graft in (
            "adagrad", "adam") else ()
        zero = jnp.zeros((), jnp.int32)
        return ShampooState(per_leaf(roots, params), zero, zero, graft, zero)

    def _graft_dir(self, g, acc, count):
        if self.graft in ("none", "sgd"):
            return g, acc
        if self.graft == "adagrad":
            acc = acc + g * g
            return g / (jnp.sqrt(acc) + self.graft_eps), acc
        acc = optax.tree.update_moment_per_elem_norm(g, acc, self.graft_beta2, 2)
        return g / (jnp.sqrt(optax.tree.bias_correction(acc, self.graft_beta2, count)) + self.graft_eps), acc

    def apply(self, inputs, state: ShampooState, ctx):
        grads = inputs.grad
        basis: Eigbasis = inputs.basis
        leaves, treedef = jax.tree.flatten(grads)
        old_roots, bases = state.roots, basis.bases

        def root_pair(item):
            (el, er), (rl, rr) = item
            nl = inverse_root(el, self.exponent, self.epsilon, self.epsilon_abs)
            nr = inverse_root(er, self.exponent, self.epsilon, self.epsilon_abs)
            ok = jnp.all(jnp.isfinite(nl)) & jnp.all(jnp.isfinite(nr))
            return (jnp.where(ok, nl, rl), jnp.where(ok, nr, rr)), (~ok).astype(jnp.int32)

        def fresh_roots():
            items = [(e, r) for old, blocks in zip(old_roots, bases) for r, e in zip(old, blocks)]
            done = iter(ctx.blocks.map(root_pair, items))
            out = tuple(tuple(next(done) for _ in old) for old in old_roots)
            fails = sum((f for leaf in out for _, f in leaf), jnp.zeros((), jnp.int32))
            return tuple(tuple(r for r, _ in leaf) for leaf in out), fails

        roots, nfail = jax.lax.cond(basis.count != state.seen, fresh_roots,
                                    lambda: (old_roots, jnp.zeros((), jnp.int32)))
        count = state.count + 1
        have_root = basis.count > 0
        accs = state.graft if self.graft in ("adagrad", "adam") else [None] * len(leaves)
        g32s, ds, new_accs, lays = [], [], [], []
        for g, acc in zip(leaves, accs):
            g32 = g.astype(stat_dtype(g))
            d, acc = self._graft_dir(g32, acc, count)
            g32s.append(g32), ds.append(d), new_accs.append(acc), lays.append(spec_layout(self.gram, g.shape))

        def precondition(item):
            gb, db, (rl, rr) = item
            p = mm(mm(rl, gb), rr)
            if self.graft != "none":
                p = p * (jnp.linalg.norm(db) / jnp.maximum(jnp.linalg.norm(p), 1e-30))
            return p

        items = [(gb, db, rb) for g32, d, r, lay in zip(g32s, ds, roots, lays) if lay is not None
                 for gb, db, rb in zip(blocks_of(g32, lay), blocks_of(d, lay), r)]
        done = iter(ctx.blocks.map(precondition, items))
        dirs = []
        for g, d, lay in zip(leaves, ds, lays):
            if lay is None:
                dirs.append(d.astype(g.dtype))
            else:
                pb = [next(done) for _ in lay]
                dirs.append(jnp.where(have_root, assemble(pb, lay, g.shape), d).astype(g.dtype))
        graft = tuple(new_accs) if self.graft in ("adagrad", "adam") else ()
        failures = state.failures + nfail
        new = ShampooState(tuple(roots), basis.count, failures, graft, count)
        info = {"shampoo_root_failures": failures, "shampoo_fallback_leaves": count_fallback(grads, self.gram)}
        return {"direction": treedef.unflatten(dirs)}, new, info


def shampoo(
    learning_rate: Any = 1e-3,
    *,
    beta: float | None = None,
    root_every: int = 10,
    start_preconditioning_step: int = 1,
    graft: Literal["none", "sgd", "adagrad", "adam"] = "adagrad",
    epsilon: float = 1e-6,
    exponent: float = 4.0,
    block_size: int | None = None,
    max_dim: int = 4096,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> list[Module]:
    """Shampoo with grafting: factors every step, eigendecompositions (hence roots) every ``root_every`` steps
    from ``start_preconditioning_step`` on. The start is the refresh module's cadence start, so it shapes the
    phase table (``prefix``); until the first refresh Shampoo returns the graft direction. Those steps run
    the same program as the other non-refresh steps (nothing differs statically), so they add no program.

    ``beta=None`` accumulates the factors (AdaGrad-style, as in the paper); a float keeps an EMA.
    """
    gram = GradGram(beta=beta, block_size=block_size, max_dim=max_dim, every=1)
    return [
        gram,
        GramEigbasis(gram=gram.spec, method="eigh", every=root_every, start=start_preconditioning_step),
        Shampoo(gram=gram.spec, exponent=exponent, epsilon=epsilon, graft=graft),
        UpdateTail(learning_rate=learning_rate, source="shampoo", momentum=momentum, weight_decay=weight_decay),
    ]
