"""LMO directions over a parameter tree (Scion-style, docs/math.md §7.1); same-shape matrices share one call."""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import optax
from pydantic import Field

from curvplan.ir import fresh
from curvplan.ir import quantities as q
from curvplan.modules._base import Module
from curvplan.modules.geometry import _maps

NormOrAuto = Literal[
    "auto", "frobenius", "sign", "spectral", "spectral_conv", "colnorm", "rownorm", "bias_rms"
]


def leaf_keys(tree) -> list[str]:
    """``jax.tree_util.keystr`` of every leaf, in ``jax.tree.leaves`` order (the shared layer-key convention)."""
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


class LMOState(NamedTuple):
    """The gradient momentum (``()`` when ``beta`` is 0)."""

    m: object


class LMODirection(Module):
    """The LMO step of Scion / Gluon-style methods: ``%direction.lmo = radius · dir(M)`` per leaf.

    ``M ← β M + (1 − β) G`` (Scion's ``momentum`` α is ``1 − β``; β = 0 uses the raw gradient), then each leaf
    gets the unit-ball maximiser of its norm (`curvplan.modules.geometry.lmo`) times its radius. Norms come
    from ``rules`` — ``(substring of the leaf's key path, norm, radius)``, first match wins, matrices only
    unless ``rules_matrices_only=False`` — else ``norm``
    (``auto``: 2-D spectral, 4-D spectral_conv, else bias_rms) with ``radius``. Spectral leaves of equal shape
    are orthogonalised in one batched Newton-Schulz call.

    With ``constrained=True`` the direction is ``radius · dir + θ``, so `UpdateTail` (−lr·direction) makes the
    Frank-Wolfe step ``θ ← (1 − lr) θ − lr · radius · dir``.

    >>> from curvplan.modules.geometry import LMODirection
    >>> [u.quantity.name for u in LMODirection(constrained=True).uses()]
    ['%grad', 'params']
    """

    kind: Literal["lmo_direction"] = "lmo_direction"
    blockwise = True
    norm: NormOrAuto = "auto"
    radius: float = Field(1.0, gt=0)
    rules: tuple[tuple[str, NormOrAuto, float], ...] = ()
    rules_matrices_only: bool = True
    """Apply ``rules`` to leaves with ≥ 2 dims only (so a head's bias keeps the default norm)."""
    beta: float = Field(0.0, ge=0.0, lt=1.0)
    constrained: bool = False
    normalized: bool = True
    ns: Literal["standard", "polar_express", "exact"] = "standard"
    ns_steps: int = Field(5, ge=1, le=100)

    def consumes(self):
        return {"grad": fresh(q.grad())} | ({"params": fresh(q.params())} if self.constrained else {})

    def produces(self):
        return {"direction": q.direction("lmo")}

    def leaf_rule(self, key: str, shape: tuple[int, ...]) -> tuple[str, float]:
        """(norm, radius) for the leaf with this key path and shape."""
        norm, radius = self.norm, self.radius
        for pattern, n, r in self.rules:
            if pattern in key and (len(shape) >= 2 or not self.rules_matrices_only):
                norm, radius = n, r
                break
        return (_maps.auto_norm(shape) if norm == "auto" else norm), radius

    def init(self, params, ctx) -> LMOState:
        return LMOState(optax.tree.zeros_like(params) if self.beta else ())

    def apply(self, inputs, state: LMOState, ctx):
        g = inputs.grad
        m = optax.tree.update_moment(g, state.m, self.beta, 1) if self.beta else g
        leaves, treedef = jax.tree.flatten(m)
        keys = leaf_keys(m)
        rules = [self.leaf_rule(k, x.shape) for k, x in zip(keys, leaves)]
        ns = None if self.ns == "exact" else self.ns
        out = [None] * len(leaves)
        spectral = [i for i, (n, _) in enumerate(rules) if n in ("spectral", "spectral_conv")]
        mats = [
            leaves[i] if leaves[i].ndim == 2 else leaves[i].reshape(-1, leaves[i].shape[-1]) for i in spectral
        ]
        polar = (
            (lambda s: _maps.spectral_exact(s))
            if ns is None
            else (lambda s: _maps.newton_schulz(s, ns, self.ns_steps))
        )
        for i, o in zip(spectral, ctx.blocks.map_stacked(polar, mats)):
            x = leaves[i]
            if rules[i][0] == "spectral":
                fan_in, fan_out = x.shape
                scale = (fan_out / fan_in) ** 0.5 if self.normalized else fan_out**0.5
            else:
                kh, kw, c_in, c_out = x.shape
                scale = (c_out / c_in) ** 0.5 / (kh * kw)
            out[i] = o.reshape(x.shape) * scale
        for i, (n, _) in enumerate(rules):
            if out[i] is None:
                out[i] = _maps.lmo(leaves[i], n, normalized=self.normalized)
        d = [o * r for o, (_, r) in zip(out, rules)]
        d = jax.tree.unflatten(treedef, d)
        if self.constrained:
            d = optax.tree.add(d, inputs.params)
        return {"direction": d}, LMOState(m if self.beta else ())
