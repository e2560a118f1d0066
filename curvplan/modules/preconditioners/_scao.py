"""SCAO (docs/math.md §6.4, whispering3/scao v0.1.0 core): Adam warm-up, then Adam on a low-rank
Kronecker-preconditioned gradient with an adaptive rank, reached through a linear blend.

Phases are cadences: the factors, their eigendecomposition and the rank refresh run every ``precond_freq``
steps from step 0; the preconditioner runs from ``start = max(warmup_steps, precond_freq·(min_precond_updates−1))``;
the blend runs on ``[start, start + blend_steps)``.

>>> import curvplan as cp
>>> from curvplan.modules.preconditioners._scao import scao_modules
>>> plan = cp.compile_plan(scao_modules(warmup_steps=4, precond_freq=2, blend_steps=4, min_precond_updates=1))
>>> len(plan.phases), [plan.phase_of(t) for t in (0, 1, 4, 5, 8, 9)]
(6, [0, 1, 2, 3, 4, 5])
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from pydantic import Field, model_validator

from curvplan.ir import carried, fresh
from curvplan.ir import quantities as q
from curvplan.ir._cadence import Cadence
from curvplan.ir._errors import LoweringError
from curvplan.modules._base import Module
from curvplan.modules.preconditioners._grad_gram import (
    Eigbasis,
    GradGram,
    GramConsumer,
    GramEigbasis,
    GramFactors,
    Spec,
    assemble,
    blocks_of,
    grad_gram,
    mm,
    per_leaf,
    spec_layout,
    stat_dtype,
)
from curvplan.modules.transforms import UpdateTail

_SCAO_GRAM = GradGram(beta=0.999, init_scale=1e-4).spec


# -- rank selection --------------------------------------------------------------------------------------
def rank_bounds(m: int, k: int, k_min: int, k_max: int) -> tuple[int, int]:
    """``(lo, hi)`` for a block of shape (m, k): hi = min(k_max, min(m,k)//2) if min(m,k) > 2·k_min else k_min,
    both capped at min(m, k)."""
    n = min(m, k)
    hi = min(k_max, n // 2) if n > 2 * k_min else k_min
    hi = min(hi, n)
    return min(k_min, hi), hi


def spectral_rank(s: jax.Array, epsilon: float) -> jax.Array:
    """The smallest r such that the r largest values of ``s`` (sorted descending) hold >= (1−ε) of their sum.

    >>> import jax.numpy as jnp
    >>> int(spectral_rank(jnp.array([6.0, 3.0, 1.0]), 0.15)), int(spectral_rank(jnp.array([6.0, 3.0, 1.0]), 0.05))
    (2, 3)
    """
    c = jnp.cumsum(s)
    r = jnp.sum(c < (1 - epsilon) * c[-1]) + 1
    return jnp.minimum(r, s.shape[0]).astype(jnp.int32)


def select_rank(s_l, s_r, r_old, epsilon, lo, hi, down: int = 1, up: int = 4) -> jax.Array:
    """SCAO's rank: r_side = `spectral_rank` clamped to [lo, hi] (lo when the mass is below 1e-12),
    r = min(r_L, r_R), then limited to [r_old − down, r_old + up]."""

    def side(s):
        r = jnp.clip(spectral_rank(s, epsilon), lo, hi)
        return jnp.where(jnp.sum(s) < 1e-12, lo, r)

    r = jnp.minimum(side(s_l), side(s_r))
    return jnp.clip(r, r_old - down, r_old + up).astype(jnp.int32)


# -- modules ---------------------------------------------------------------------------------------------
def scao_spectrum(spec: Spec) -> q.Quantity:
    """``%precond.scao``: per block the regularized top eigenvalues and the rank; per fallback leaf a
    `DiagSpectrum`."""
    return q.quantity("precond", "scao", **{f"gram_{k}": v for k, v in spec})


class SpectrumBlock(NamedTuple):
    s_l: jax.Array
    s_r: jax.Array
    rank: jax.Array


class DiagSpectrum(NamedTuple):
    """A fallback leaf's bias-corrected statistic ``d_hat = d / bc`` and its correction ``bc`` (a scalar)."""

    d_hat: jax.Array
    bc: jax.Array


class ScaoSpectrumState(NamedTuple):
    """``ranks``: per parameter leaf (in leaf order, `per_leaf`) the rank of each block (``()`` for fallback
    leaves), the ``r_old`` of the next `select_rank`."""

    ranks: Any


class ScaoSpectrum(GramConsumer):
    """SCAO's curvature refresh: bias-corrected, Tikhonov-regularized eigenvalues and the adaptive rank.

    For each factor with eigenvalues λ (of the raw EMA, ``bc = 1 − ρ^count``):
    s = λ/bc + max(tikhonov_min, tikhonov · Σλ/(bc·dim)), descending. The rank follows `select_rank`; only the
    ``hi`` largest eigenvalues are kept (eigenvalue truncation). Fallback leaves carry d̂ = d / bc and bc.
    """

    kind: Literal["scao_spectrum"] = "scao_spectrum"
    gram: Spec = _SCAO_GRAM
    epsilon_sparse: float = Field(0.05, gt=0, lt=1)
    k_min: int = Field(8, ge=1)
    k_max: int = Field(128, ge=1)
    tikhonov: float = Field(1e-4, ge=0)
    tikhonov_min: float = Field(1e-8, ge=0)
    info_fields = (("scao_mean_rank", "float"),)

    def consumes(self):
        return {"factors": fresh(grad_gram(self.gram)), "basis": fresh(self._basis())}

    def produces(self):
        return {"spectrum": scao_spectrum(self.gram)}

    def _bounds(self, lay):
        return [rank_bounds(r1 - r0, c1 - c0, self.k_min, self.k_max) for r0, r1, c0, c1 in lay]

    def init(self, params, ctx) -> ScaoSpectrumState:
        def leaf(p):
            lay = spec_layout(self.gram, p.shape)
            return () if lay is None else tuple(jnp.asarray(lo, jnp.int32) for lo, _ in self._bounds(lay))

        return ScaoSpectrumState(per_leaf(leaf, params))

    def init_carried(self, name, params, ctx):
        def leaf(p):
            lay = spec_layout(self.gram, p.shape)
            if lay is None:
                return DiagSpectrum(jnp.ones(p.shape, stat_dtype(p)), jnp.ones((), stat_dtype(p)))
            return tuple(SpectrumBlock(jnp.ones(hi, stat_dtype(p)), jnp.ones(hi, stat_dtype(p)),
                                       jnp.asarray(lo, jnp.int32)) for lo, hi in self._bounds(lay))

        return per_leaf(leaf, params)

    def apply(self, inputs, state: ScaoSpectrumState, ctx):
        gram: GramFactors = inputs.factors
        basis: Eigbasis = inputs.basis
        params = jax.tree.leaves(ctx.params)
        facs, bases, ranks = gram.factors, basis.bases, state.ranks
        beta = dict(self.gram)["beta"]
        out, new_ranks, all_ranks = [], [], []
        for p, fac, blocks, rk in zip(params, facs, bases, ranks):
            dt = stat_dtype(p)
            bc = jnp.ones((), dt) if beta is None else jnp.maximum(1 - beta ** gram.count.astype(dt), 1e-8)
            lay = spec_layout(self.gram, p.shape)
            if lay is None:
                out.append(DiagSpectrum(fac / bc, bc)), new_ranks.append(())
                continue
            leaf_out, leaf_ranks = [], []
            for (el, er), r_old, (lo, hi) in zip(blocks, rk, self._bounds(lay)):
                def reg(lam):
                    lam = lam / bc
                    return lam + jnp.maximum(self.tikhonov_min, self.tikhonov * jnp.sum(lam) / lam.shape[0])

                s_l, s_r = reg(el.lam), reg(er.lam)
                r = select_rank(s_l, s_r, r_old, self.epsilon_sparse, lo, hi)
                leaf_out.append(SpectrumBlock(s_l[:hi], s_r[:hi], r))
                leaf_ranks.append(r)
                all_ranks.append(r)
            out.append(tuple(leaf_out)), new_ranks.append(tuple(leaf_ranks))
        info = {"scao_mean_rank": jnp.mean(jnp.stack(all_ranks).astype(jnp.float32))} if all_ranks else {}
        return {"spectrum": tuple(out)}, ScaoSpectrumState(tuple(new_ranks)), info


class ScaoPrecondition(GramConsumer):
    """SCAO's preconditioned gradient ``%direction.scao_pre`` (every step, from the carried basis and spectrum).

    With U_l, U_r the top columns of the eigenbases, P = U_lᵀ G U_r and the rank-r mask M,
    G_pre = G + U_l [M ⊙ (s_l^(-¼) s_r^(-¼)ᵀ − 1) ⊙ P] U_rᵀ (identity outside the kept subspace),
    s^(-¼) = max(s, 1e-8)^(-¼). Natural-gradient clip: ν = ‖M ⊙ s_l^(-½) P s_r^(-½)‖_F; if ν > ``clip``
    the block is scaled by clip/ν (``clip=None``: off). Fallback leaves: g / (d̂^(¼) + 1e-8), clipped the same
    way with ν = (Σ g² / (d^(½) + 1e-8))^(½) over the leaf, on the uncorrected statistic d = bc·d̂.
    """

    kind: Literal["scao_precondition"] = "scao_precondition"
    gram: Spec = _SCAO_GRAM
    clip: float | None = Field(1.0, gt=0)

    def consumes(self):
        return {"grad": fresh(q.grad()), "basis": carried(self._basis()), "spectrum": carried(scao_spectrum(self.gram))}

    def produces(self):
        return {"direction": q.direction("scao_pre")}

    def apply(self, inputs, state, ctx):
        leaves, treedef = jax.tree.flatten(inputs.grad)
        bases = inputs.basis.bases
        specs = inputs.spectrum
        out = []
        for g, blocks, sp in zip(leaves, bases, specs):
            g32 = g.astype(stat_dtype(g))
            lay = spec_layout(self.gram, g.shape)
            if lay is None:
                d_hat = jnp.maximum(sp.d_hat, 0)
                G = g32 / (d_hat**0.25 + 1e-8)
                if self.clip is not None:
                    nu = jnp.sqrt(jnp.sum(g32**2 / (jnp.sqrt(d_hat * sp.bc) + 1e-8)))
                    G = G * jnp.minimum(1.0, self.clip / jnp.maximum(nu, 1e-30))
                out.append(G.astype(g.dtype))
                continue
            pre = []
            for gb, (el, er), b in zip(blocks_of(g32, lay), blocks, sp):
                k = b.s_l.shape[0]
                ul, ur = el.Q[:, :k], er.Q[:, :k]
                P = mm(mm(ul.T, gb), ur)
                keep = jnp.arange(k) < b.rank
                mask = keep[:, None] & keep[None, :]
                wl, wr = jnp.maximum(b.s_l, 1e-8) ** -0.25, jnp.maximum(b.s_r, 1e-8) ** -0.25
                G = gb + mm(mm(ul, jnp.where(mask, (wl[:, None] * wr[None, :] - 1) * P, 0)), ur.T)
                if self.clip is not None:
                    nu = jnp.linalg.norm(jnp.where(mask, (wl**2)[:, None] * P * (wr**2)[None, :], 0))
                    G = G * jnp.minimum(1.0, self.clip / jnp.maximum(nu, 1e-30))
                pre.append(G)
            out.append(assemble(pre, lay, g.shape).astype(g.dtype))
        return {"direction": treedef.unflatten(out)}, state


class ScaoBlend(Module):
    """Linear blend ``%direction.scao_blend`` = b·G_pre + (1−b)·g with b = (t − begin)/steps, on the steps
    [begin, begin + steps) (its cadence, set from these fields)."""

    kind: Literal["scao_blend"] = "scao_blend"
    begin: int = Field(..., ge=0)
    steps: int = Field(..., ge=1)

    @model_validator(mode="after")
    def _cadence(self):
        want = Cadence(start=self.begin, stop=self.begin + self.steps)
        if self.cadence is None:
            object.__setattr__(self, "cadence", want)
        elif self.cadence != want:
            raise ValueError(f"the cadence of a blend is {want} (from begin/steps); got {self.cadence}")
        return self

    def consumes(self):
        return {"grad": fresh(q.grad()), "preconditioned": fresh(q.direction("scao_pre"))}

    def produces(self):
        return {"direction": q.direction("scao_blend")}

    def apply(self, inputs, state, ctx):
        b = (ctx.step - self.begin).astype(jnp.float32) / self.steps
        out = jax.tree.map(lambda g, p: (b * p + (1 - b) * g).astype(g.dtype), inputs.grad, inputs.preconditioned)
        return {"direction": out}, state


class ScaoAdamState(NamedTuple):
    """Adam's moments ``m``, ``v`` (shaped like the parameters), the step ``count``, and ``abs_ema`` (the EMA of
    |g| behind ``grad_mask``; ``()`` without it)."""

    m: Any
    v: Any
    count: jax.Array
    abs_ema: Any


class ScaoAdam(Module):
    """Adam over all of SCAO's phases (moments never reset), on g_eff = g before ``precondition_from``, the
    carried ``%direction.scao_blend`` until ``blend_until`` and the carried ``%direction.scao_pre`` after
    (carried reads see this step's value: their producers run first). Produces ``%direction.scao``.

    Opt-in extras of SCAO's HEAD (off by default; where they act is our choice, the reference was not run):

    - ``grad_mask=s``: keep the entries of g_eff whose EMA_0.99(|g|) is at or above the s-quantile of its leaf;
    - ``grad_noise=σ``: add N(0, (σ·0.998ᵗ)²) to g_eff (needs ``rng``);
    - ``lars=c``: scale each leaf's direction u by c·‖p‖/(‖u‖ + lars_weight_decay·‖p‖ + 1e-8) (1 if ‖p‖ = 0).
    """

    kind: Literal["scao_adam"] = "scao_adam"
    b1: float = Field(0.9, ge=0, lt=1)
    b2: float = Field(0.999, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    precondition_from: int = Field(100, ge=0)
    blend_until: int = Field(150, ge=0)
    grad_mask: float | None = Field(None, gt=0, lt=1)
    grad_noise: float | None = Field(None, gt=0)
    grad_noise_decay: float = Field(0.998, gt=0, le=1)
    lars: float | None = Field(None, gt=0)
    lars_weight_decay: float = Field(0.0, ge=0)

    def _blends(self) -> bool:
        return self.blend_until > self.precondition_from

    def consumes(self):
        uses = {"grad": fresh(q.grad()), "preconditioned": carried(q.direction("scao_pre"))}
        if self._blends():
            uses["blend"] = carried(q.direction("scao_blend"))
        if self.grad_noise:
            uses["rng"] = fresh(q.rng())
        return uses

    def produces(self):
        return {"direction": q.direction("scao")}

    def init(self, params, ctx) -> ScaoAdamState:
        z = jax.tree.map(lambda p: jnp.zeros(p.shape, stat_dtype(p)), params)
        return ScaoAdamState(z, z, jnp.zeros((), jnp.int32), z if self.grad_mask else ())

    def apply(self, inputs, state: ScaoAdamState, ctx):
        t = ctx.step
        g, pre = inputs.grad, inputs.preconditioned
        blend = inputs.blend if self._blends() else pre
        geff = jax.tree.map(
            lambda a, b, c: jnp.where(t < self.precondition_from, a, jnp.where(t < self.blend_until, c, b)),
            g, pre, blend)
        abs_ema = state.abs_ema
        if self.grad_mask:
            abs_ema = optax.tree.update_moment(jax.tree.map(jnp.abs, g), abs_ema, 0.99, 1)
            geff = jax.tree.map(
                lambda x, e: jnp.where(e >= jnp.quantile(e, self.grad_mask), x, 0), geff, abs_ema)
        if self.grad_noise:
            key = inputs.rng
            if key is None:
                raise LoweringError("ScaoAdam(grad_noise=...) needs random numbers but the step got no rng",
                                    where=f"module `{ctx.module}`, quantity rng",
                                    fix="pass `rng=jax.random.key(0)` to step / update")
            leaves, treedef = jax.tree.flatten(geff)
            sigma = self.grad_noise * self.grad_noise_decay ** t.astype(jnp.float32)
            keys = jax.random.split(key, len(leaves))
            geff = treedef.unflatten([x + (sigma * jax.random.normal(k, x.shape)).astype(x.dtype)
                                      for x, k in zip(leaves, keys)])
        count = state.count + 1
        m = optax.tree.update_moment(geff, state.m, self.b1, 1)
        v = optax.tree.update_moment_per_elem_norm(geff, state.v, self.b2, 2)
        m_hat = optax.tree.bias_correction(m, self.b1, count)
        v_hat = optax.tree.bias_correction(v, self.b2, count)

        def direction(m_hat, v_hat, x, p):
            u = m_hat / (jnp.sqrt(v_hat) + self.eps)
            if self.lars:
                pn, un = jnp.linalg.norm(p), jnp.linalg.norm(u)
                trust = self.lars * pn / (un + self.lars_weight_decay * pn + 1e-8)
                u = u * jnp.where((pn > 0) & (un > 0), trust, 1.0)
            return u.astype(x.dtype)

        out = jax.tree.map(direction, m_hat, v_hat, g, ctx.params)
        return {"direction": out}, ScaoAdamState(m, v, count, abs_ema)


# -- presets ---------------------------------------------------------------------------------------------
def scao_modules(
    learning_rate: Any = 3.5e-4,
    *,
    weight_decay: float = 0.1,
    warmup_steps: int = 100,
    precond_freq: int = 10,
    blend_steps: int = 50,
    min_precond_updates: int = 10,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    rho: float = 0.999,
    epsilon_sparse: float = 0.05,
    k_min: int = 8,
    k_max: int = 128,
    clip: float | None = 1.0,
    max_precond_dim: int = 4096,
    init_scale: float = 1e-4,
    grad_mask: float | None = None,
    grad_noise: float | None = None,
    lars: float | None = None,
) -> list[Module]:
    """SCAO as a module list (defaults: the README quick-start lr/wd/warmup/freq, the rest as the HEAD
    constructor). The factors advance only on refresh steps (every ``precond_freq`` from step 0). The HEAD-only
    extras ``grad_mask`` (0.7 in HEAD), ``grad_noise`` (0.01) and ``lars`` (1e-3) are off unless given; Adan's
    third moment and Lookahead are not provided (wrap with ``optax.lookahead`` for the latter)."""
    start = max(warmup_steps, precond_freq * (min_precond_updates - 1))
    gram = GradGram(beta=rho, init_scale=init_scale, max_dim=max_precond_dim)
    mods: list[Module] = [
        gram,
        GramEigbasis(gram=gram.spec, method="eigh", every=precond_freq),
        ScaoSpectrum(gram=gram.spec, epsilon_sparse=epsilon_sparse, k_min=k_min, k_max=k_max, every=precond_freq),
        ScaoPrecondition(gram=gram.spec, clip=clip, start=start),
        ScaoAdam(b1=b1, b2=b2, eps=eps, precondition_from=start, blend_until=start + blend_steps,
                 grad_mask=grad_mask, grad_noise=grad_noise, lars=lars, lars_weight_decay=weight_decay),
        UpdateTail(learning_rate=learning_rate, source="scao", weight_decay=weight_decay),
    ]
    if blend_steps:
        mods.insert(4, ScaoBlend(begin=start, steps=blend_steps))
    return mods
