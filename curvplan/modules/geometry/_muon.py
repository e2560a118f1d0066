"""Muon (docs/math.md §7.2): Nesterov momentum + Newton-Schulz on matrices, AdamW on every other leaf."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from pydantic import ConfigDict, Field, PlainSerializer

from curvplan.ir import fresh
from curvplan.ir import quantities as q
from curvplan.ir._errors import ConfigError
from curvplan.modules._base import Module
from curvplan.modules.geometry import _maps
from curvplan.modules.geometry._lmo import leaf_keys


def ema_moments(g, m, count, beta: float, nesterov: bool):
    """``m ← β m + (1−β) g`` and the bias-corrected (optionally Nesterov) estimate, as optax computes them.

    ``count`` is the number of updates including this one.
    """
    m = optax.tree.update_moment(g, m, beta, 1)
    if nesterov:
        m_hat = jax.tree.map(
            lambda a, b: beta * a + (1 - beta) * b,
            optax.tree.bias_correction(m, beta, count + 1),
            optax.tree.bias_correction(g, beta, count),
        )
    else:
        m_hat = optax.tree.bias_correction(m, beta, count)
    return m, m_hat


def _callable_name(f):
    """How a ``param_labels`` callable prints in settings (a plain serializer, so a default None stays unprinted)."""
    return None if f is None else f"<callable {getattr(f, '__name__', type(f).__name__)}>"


class MuonState(NamedTuple):
    """The step count, Muon's momentum and AdamW's two moments (each shaped like params, on every leaf)."""

    count: jax.Array
    mu: Any
    adam_mu: Any
    adam_nu: Any


class MuonDirection(Module):
    """Muon's per-leaf direction ``%direction.muon`` (use with ``UpdateTail(source="muon", learning_rate=lr)``).

    Muon leaves: ``√max(1, fan_out/fan_in) · NS(m̂) + weight_decay · θ`` with Nesterov momentum ``beta``;
    AdamW leaves: ``adam_lr_ratio · (m̂/(√v̂ + eps) + adam_weight_decay · θ)`` with ``adam_b1``/``adam_b2``
    (Nesterov as well, like `optax.contrib.muon`). Routing, first rule that applies:

    - ``param_labels(params)`` → a tree of ``"muon"`` / ``"adam"`` labels (as in `optax.multi_transform`);
    - a leaf whose key path contains one of ``adam_keys`` (e.g. ``("embed", "head")``) goes to AdamW;
    - otherwise 2-D leaves go to Muon and all others to AdamW (the default of `optax.contrib.muon`).

    Equal-shape Muon matrices are orthogonalised in one batched Newton-Schulz call.

    >>> from curvplan.modules.geometry import MuonDirection
    >>> MuonDirection(adam_keys=("head",)).route({"h": {"w": jnp.ones((3, 4))}, "head": {"w": jnp.ones((4, 2))}})
    [True, False]
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    kind: Literal["muon_direction"] = "muon_direction"
    blockwise = True
    beta: float = Field(0.95, ge=0.0, lt=1.0)
    nesterov: bool = True
    ns: Literal["standard", "polar_express", "exact"] = "standard"
    ns_steps: int = Field(5, ge=1, le=100)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0.0)
    consistent_rms: float | None = Field(None, gt=0)
    adam_b1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_b2: float = Field(0.999, ge=0.0, lt=1.0)
    adam_eps_root: float = Field(0.0, ge=0.0)
    adam_weight_decay: float = Field(0.0, ge=0.0)
    adam_lr_ratio: float = Field(1.0, gt=0)
    """AdamW's learning rate divided by Muon's (the tail applies Muon's)."""
    adam_keys: tuple[str, ...] = ()
    param_labels: Annotated[Callable[[Any], Any] | None, PlainSerializer(_callable_name)] = None

    def consumes(self):
        return {"grad": fresh(q.grad()), "params": fresh(q.params())}

    def produces(self):
        return {"direction": q.direction("muon")}

    def route(self, params) -> list[bool]:
        """Per leaf (``jax.tree.leaves`` order): True for Muon, False for AdamW."""
        leaves = jax.tree.leaves(params)
        if self.param_labels is not None:
            labels = jax.tree.leaves(self.param_labels(params))
            if len(labels) != len(leaves) or any(lb not in ("muon", "adam") for lb in labels):
                raise ConfigError(
                    f"param_labels returned {labels!r} for {len(leaves)} leaves",
                    where=f"module `{self.label}` (MuonDirection.param_labels)",
                    fix="return a tree shaped like params whose leaves are 'muon' or 'adam'",
                )
            out = [lb == "muon" for lb in labels]
        else:
            out = [
                x.ndim == 2 and not any(k in key for k in self.adam_keys)
                for key, x in zip(leaf_keys(params), leaves)
            ]
        bad = [k for k, x, r in zip(leaf_keys(params), leaves, out) if r and x.ndim != 2]
        if bad:
            raise ConfigError(
                f"Muon needs 2-D leaves but {bad} are not",
                where=f"module `{self.label}`",
                fix="label them 'adam' (or reshape conv kernels yourself)",
            )
        return out

    def init(self, params, ctx) -> MuonState:
        zeros = optax.tree.zeros_like(params)
        return MuonState(jnp.zeros((), jnp.int32), zeros, zeros, zeros)

    def apply(self, inputs, state: MuonState, ctx):
        g, params = inputs.grad, inputs.params
        count = state.count + 1
        mu, mu_hat = ema_moments(g, state.mu, count, self.beta, self.nesterov)
        am, am_hat = ema_moments(g, state.adam_mu, count, self.adam_b1, self.nesterov)
        av = optax.tree.update_moment_per_elem_norm(g, state.adam_nu, self.adam_b2, 2)
        av_hat = optax.tree.bias_correction(av, self.adam_b2, count)
        is_muon = self.route(g)
        leaves, treedef = jax.tree.flatten(g)
        mh, amh, avh, th = (jax.tree.leaves(t) for t in (mu_hat, am_hat, av_hat, params))
        out: list = [None] * len(leaves)
        idx = [i for i, r in enumerate(is_muon) if r]
        ns = None if self.ns == "exact" else self.ns
        polar = (
            (lambda s: _maps.spectral_exact(s))
            if ns is None
            else (lambda s: _maps.newton_schulz(s, ns, self.ns_steps, self.eps))
        )
        for i, o in zip(idx, ctx.blocks.map_stacked(polar, [mh[i] for i in idx])):
            fan_in, fan_out = leaves[i].shape
            scale = (
                max(fan_in, fan_out) ** 0.5 * self.consistent_rms
                if self.consistent_rms is not None
                else max(1.0, fan_out / fan_in) ** 0.5
            )
            out[i] = scale * o + self.weight_decay * th[i] if self.weight_decay else scale * o
        for i, r in enumerate(is_muon):
            if not r:
                d = amh[i] / (jnp.sqrt(avh[i] + self.adam_eps_root) + self.eps)
                if self.adam_weight_decay:
                    d = d + self.adam_weight_decay * th[i]
                out[i] = self.adam_lr_ratio * d if self.adam_lr_ratio != 1.0 else d
        return {"direction": jax.tree.unflatten(treedef, out)}, MuonState(count, mu, am, av)
