"""SOAP: Adam in the (shared) Shampoo eigenbasis.

>>> import curvplan as cp
>>> from curvplan.modules.preconditioners._soap import soap
>>> print(cp.compile_plan(soap(precondition_frequency=10), name="soap"))  # doctest: +ELLIPSIS
plan soap: 2 phases, period 10
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
    GradGram,
    GramConsumer,
    GramEigbasis,
    Spec,
    assemble,
    blocks_of,
    mm,
    spec_layout,
    stat_dtype,
)
from curvplan.modules.transforms import UpdateTail


class SoapState(NamedTuple):
    """``m``, ``v`` (moments, per block in the eigenbasis, or the leaf's own for fallback leaves) and ``used``
    (per block, the bases ``(Q_L, Q_R)`` the next step works in) hold one entry per parameter leaf, in leaf
    order (`per_leaf`); ``seen`` is the ``count`` of the basis last adopted, ``count`` the calls so far."""

    m: Any
    v: Any
    used: Any
    seen: jax.Array
    count: jax.Array


class Soap(GramConsumer):
    """SOAP direction ``%direction.soap``: Adam on G̃ = Q_Lᵀ G Q_R, mapped back, N = Q_L (m̃ / (√ṽ + eps)) Q_Rᵀ.

    Reads the carried ``%eigbasis.grad_gram`` (by default the published power-iteration + QR refresh). When the
    basis changed since the last step, the second moment ṽ is permuted like the basis columns (never rotated),
    and the first moment follows ``moments``:

    - ``"rotate"`` (soap.py @f42d296): m̃ is kept in the eigenbasis and rotated into the new one,
      m̃ ← Q_newᵀ Q_old m̃ Q_oldᵀ Q_new (keeps a copy of the basis it last used);
    - ``"keep"`` (the later revision): m is kept in the parameter basis and projected every step.

    With full orthogonal bases both give the same m̃ (up to rounding). With ``correct_bias`` the direction is
    scaled by √(1−β2ᵗ)/(1−β1ᵗ). Fallback leaves (vectors, huge matrices) get plain Adam.

    Step order as in soap.py: the first call only adopts the basis (direction zero, moments untouched; the
    tail's weight decay still applies), and step t ≥ 1 works in the basis it adopted at the end of the previous
    call; the basis refreshed with step t's own gradient is adopted after its direction. (In that basis G̃ is
    diagonal up to rounding, and elementwise Adam turns float32 rounding into entries of size one.) Note:
    inside a degenerate eigenspace (e.g. the null space of a rank-deficient Gram) the basis is arbitrary and
    elementwise Adam is not rotation-invariant there, so SOAP's direction depends on rounding in such cases
    (as in the reference code).
    """

    kind: Literal["soap"] = "soap"
    blockwise = True
    gram: Spec = GradGram().spec
    method: Literal["eigh", "power_qr"] = "power_qr"
    b1: float = Field(0.95, ge=0, lt=1)
    b2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    moments: Literal["rotate", "keep"] = "rotate"
    correct_bias: bool = True

    def consumes(self):
        return {"grad": fresh(q.grad()), "basis": carried(self._basis())}

    def produces(self):
        return {"direction": q.direction("soap")}

    def init(self, params, ctx) -> SoapState:
        ms, vs, used = [], [], []
        leaves, treedef = jax.tree.flatten(params)
        for p in leaves:
            dt, lay = stat_dtype(p), spec_layout(self.gram, p.shape)
            z = jnp.zeros(p.shape, dt)
            if lay is None:
                ms.append(z), vs.append(z), used.append(())
                continue
            bl = [jnp.zeros((r1 - r0, c1 - c0), dt) for r0, r1, c0, c1 in lay]
            vs.append(tuple(bl))
            ms.append(tuple(bl) if self.moments == "rotate" else z)
            used.append(tuple((jnp.eye(r1 - r0, dtype=dt), jnp.eye(c1 - c0, dtype=dt)) for r0, r1, c0, c1 in lay))
        zero = jnp.zeros((), jnp.int32)
        return SoapState(tuple(ms), tuple(vs), tuple(used), zero, zero)

    def apply(self, inputs, state: SoapState, ctx):
        grads = inputs.grad
        basis: Eigbasis = inputs.basis
        leaves, treedef = jax.tree.flatten(grads)
        ms, vs, useds, bases = state.m, state.v, state.used, basis.bases
        changed = basis.count != state.seen
        first = state.count == 0  # adopts the basis only
        b1, b2, eps = self.b1, self.b2, self.eps
        t = jnp.maximum(state.count, 1).astype(stat_dtype(leaves[0]))  # the updates so far, this one included
        # the bias corrections folded into one scale of the direction (eps stays uncorrected, as in soap.py)
        scale = jnp.sqrt(1 - b2**t) / (1 - b1**t) if self.correct_bias else 1.0
        ema = optax.tree.update_moment
        ema_sq = optax.tree.update_moment_per_elem_norm
        rotate = self.moments == "rotate"

        def unless_first(new, old):
            return jax.tree.map(lambda n, o: jnp.where(first, o, n), new, old)

        def block(item):  # one block: its second moment, its rotated first moment, its direction
            gb, vb, (el, er), mb, (ql, qr) = item
            gt = mm(mm(ql.T, gb), qr)  # in the basis adopted before this step's refresh
            if rotate:
                mb = unless_first(ema(gt, mb, b1, 1), mb)
                mt = mb
            else:
                mt = mm(mm(ql.T, mb), qr)
            vb = unless_first(ema_sq(gt, vb, b2, 2), vb)
            d = jnp.where(first, 0.0, mm(mm(ql, mt / (jnp.sqrt(vb) + eps)), qr.T))
            # then adopt this step's basis: ṽ permuted like its columns, m̃ rotated into it
            vb = jnp.where(changed, vb[el.perm][:, er.perm], vb)
            if rotate:
                mb = jax.lax.cond(changed, lambda: mm(mm(el.Q.T, mm(mm(ql, mb), qr.T)), er.Q), lambda: mb)
            return vb, mb, d

        out, new_m, new_v, new_used, items, lays = [], [], [], [], [], []
        for g, m, v, used, blocks in zip(leaves, ms, vs, useds, bases):
            g = g.astype(stat_dtype(g))
            lay = spec_layout(self.gram, g.shape)
            lays.append(lay)
            if lay is None:  # plain Adam
                m, v = unless_first((ema(g, m, b1, 1), ema_sq(g, v, b2, 2)), (m, v))
                out.append(jnp.where(first, 0.0, scale * m / (jnp.sqrt(v) + eps)))
                new_m.append(m), new_v.append(v), new_used.append(())
                continue
            if rotate:
                mbs = m
            else:
                m = unless_first(ema(g, m, b1, 1), m)
                mbs = blocks_of(m, lay)
            items += list(zip(blocks_of(g, lay), v, blocks, mbs, used))
            out.append(None), new_m.append(None if rotate else m), new_v.append(None)
            new_used.append(tuple((el.Q, er.Q) for el, er in blocks))
        done = iter(ctx.blocks.map(block, items))
        for i, (g, lay) in enumerate(zip(leaves, lays)):
            if lay is None:
                continue
            res = [next(done) for _ in lay]
            new_v[i] = tuple(r[0] for r in res)
            if rotate:
                new_m[i] = tuple(r[1] for r in res)
            out[i] = scale * assemble([r[2] for r in res], lay, g.shape)
        direction = treedef.unflatten([d.astype(g.dtype) for d, g in zip(out, leaves)])
        new = SoapState(tuple(new_m), tuple(new_v), tuple(new_used), basis.count, state.count + 1)
        return {"direction": direction}, new


def soap(
    learning_rate: Any = 3e-3,
    *,
    b1: float = 0.95,
    b2: float = 0.95,
    shampoo_beta: float | None = None,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    precondition_frequency: int = 10,
    max_precond_dim: int = 10000,
    method: Literal["eigh", "power_qr"] = "power_qr",
    moments: Literal["rotate", "keep"] = "rotate",
) -> list[Module]:
    """SOAP (soap.py @f42d296 defaults): factors EMA'd every step with ``shampoo_beta`` (``None``: ``b2``),
    the eigenbasis refreshed every ``precondition_frequency`` steps, Adam in it, decoupled weight decay."""
    gram = GradGram(beta=b2 if shampoo_beta is None else shampoo_beta, max_dim=max_precond_dim, every=1)
    return [
        gram,
        GramEigbasis(gram=gram.spec, method=method, every=precondition_frequency),
        Soap(gram=gram.spec, method=method, b1=b1, b2=b2, eps=eps, moments=moments),
        UpdateTail(learning_rate=learning_rate, source="soap", weight_decay=weight_decay),
    ]
