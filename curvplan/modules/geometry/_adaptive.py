"""Adaptive per-layer Schatten-p geometry (docs/math.md §7.6): the criterion and the direction.

`SchattenCriterion` (every 100 steps by default) reads the layer gradients and the layer inputs
(``%activations``, the ``layer_io`` provider shared with K-FAC), keeps EMAs of their singular values and writes
the carried ``%schatten_inv_p`` (``1/p`` per layer: 1 is SGD, 0 is p = ∞, Muon). `SchattenDirection` reads it
every step and maps the momentum of each matrix through ``Φ_p(M) = U Σ^{1/p} Vᵀ``.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from pydantic import Field, model_validator

from curvplan.ir import carried, fresh
from curvplan.ir import quantities as q
from curvplan.ir._cadence import Cadence
from curvplan.ir._errors import ConfigError
from curvplan.modules._base import Module
from curvplan.modules.geometry import _maps
from curvplan.modules.geometry._lmo import leaf_keys
from curvplan.modules.geometry._muon import ema_moments

DEFAULT_GRID = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0)


def schatten_inv_p():
    """The carried per-layer ``1/p`` (dict layer key -> scalar) written by `SchattenCriterion`."""
    return q.quantity("schatten_inv_p")


# -- the criterion ---------------------------------------------------------------------------------------
def _log_schatten(s: jax.Array, r: np.ndarray, weight: jax.Array | float = 1.0) -> jax.Array:
    """log of ``(weight · Σ sᵢ^r)^{1/r}`` for each exponent in ``r`` (``inf``: log max), stable for large r."""
    top = jnp.maximum(jnp.max(s), 1e-30)
    finite = np.isfinite(r)
    rr = jnp.asarray(np.where(finite, r, 1.0), s.dtype)
    log_sum = jnp.log(jnp.sum((s / top)[None, :] ** rr[:, None], axis=1))
    return jnp.log(top) + jnp.where(finite, (jnp.log(weight) + log_sum) / rr, 0.0)


def criterion_inv_ps(include_inf: bool = True, grid: tuple[float, ...] = DEFAULT_GRID) -> np.ndarray:
    """The candidate ``1/p`` values (p on ``grid``, plus p = ∞ as 0)."""
    return np.asarray([1.0 / p for p in grid] + ([0.0] if include_inf else []))


def log_criterion(sg: jax.Array, sa: jax.Array, inv_p: float, wg: float = 1.0, wa: float = 1.0) -> jax.Array:
    """``log J(p) = log ‖G‖_{S_{1+1/p}} − log ‖A‖_{S_{2(p+1)/(p−1)}}`` from singular values ``sg``, ``sa``.

    ``wg`` / ``wa`` weight sub-sampled spectra (each value stands for ``w`` singular values).

    >>> import jax.numpy as jnp
    >>> sg, sa = jnp.array([3.0, 4.0]), jnp.array([2.0, 1.0])
    >>> round(float(jnp.exp(log_criterion(sg, sa, 1.0))), 6)     # ‖G‖_F / ‖A‖_op
    2.5
    >>> round(float(jnp.exp(log_criterion(sg, sa, 0.0))), 6)     # ‖G‖_* / ‖A‖_F
    3.130495
    """
    r_g, r_a = _exponents(np.asarray([inv_p], float))
    return (_log_schatten(sg, r_g, wg) - _log_schatten(sa, r_a, wa))[0]


def _exponents(inv_ps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Schatten exponents of the criterion for each ``1/p``: ``1 + 1/p`` on G, ``2(p+1)/(p−1)`` on A."""
    r_g = 1.0 + inv_ps
    with np.errstate(divide="ignore"):
        r_a = np.where(inv_ps == 1.0, np.inf, 2.0 * (1.0 + inv_ps) / np.maximum(1.0 - inv_ps, 1e-300))
    return r_g, r_a


def best_inv_p(sg, sa, inv_ps, wg=1.0, wa=1.0) -> jax.Array:
    """The ``1/p`` in ``inv_ps`` maximising J (the first one on ties), every candidate in one vectorised pass."""
    inv_ps = np.asarray(inv_ps, float)
    r_g, r_a = _exponents(inv_ps)
    vals = _log_schatten(sg, r_g, wg) - _log_schatten(sa, r_a, wa)
    return jnp.asarray(inv_ps, sg.dtype)[jnp.argmax(vals)]


def _spectrum(x: jax.Array, length: int, max_dim: int, key: jax.Array | None):
    """Descending singular values of ``x`` (length ``length``, zero-padded) and their weight.

    Exact (eigh of the smaller Gram, HIGHEST precision) when both dims are ≤ ``max_dim``; otherwise the
    singular values of a uniformly sampled ``r × c`` submatrix rescaled by ``√(rows·cols/(r·c))``, each
    weighted ``min(rows, cols)/min(r, c)``, with the top one replaced by a power-iteration σ_max (§7.6(c)).
    """
    rows, cols = x.shape
    if rows <= max_dim and cols <= max_dim or key is None:
        w, _, _ = _maps._gram_eigh(x)
        s = jnp.sqrt(w)[::-1]
    else:
        r, c = min(rows, max_dim), min(cols, max_dim)
        k1, k2 = jax.random.split(key)
        sub = x[jax.random.choice(k1, rows, (r,), replace=False)][
            :, jax.random.choice(k2, cols, (c,), replace=False)
        ]
        w, _, _ = _maps._gram_eigh(sub)
        s = jnp.sqrt(w)[::-1] * math.sqrt(rows * cols / (r * c))
        s = s.at[0].set(_maps.power_sigma_max(x, iters=100))
    s = s[:length]
    return jnp.pad(s, (0, length - s.shape[0])), _sample_weight(x.shape, max_dim, key)


def _sample_weight(shape: tuple[int, int], max_dim: int, key: jax.Array | None) -> float:
    """The weight `_spectrum` gives each singular value of a matrix of ``shape`` (1 when exact)."""
    rows, cols = shape
    if rows <= max_dim and cols <= max_dim or key is None:
        return 1.0
    return min(rows, cols) / min(min(rows, max_dim), min(cols, max_dim))


class CriterionState(NamedTuple):
    """Per layer key: the EMAs of the gradient's and the inputs' singular values; refreshes and failures."""

    sg: dict
    sa: dict
    count: jax.Array
    failures: jax.Array


class SchattenCriterion(Module):
    """Chooses ``p`` per layer by maximising ``J(p) = ‖G‖_{S_{1+1/p}} / ‖A‖_{S_{2(p+1)/(p−1)}}`` (§7.6(b)).

    ``G`` is the layer's kernel gradient (conv kernels as ``(kh·kw·c_in, c_out)``), ``A`` the layer inputs from
    ``%activations`` (``(N, d_in)``). Singular values are EMA'd (``ema``, bias-corrected by the number of
    refreshes) and sub-sampled above ``max_dim``. p ranges over ``grid`` (plus ∞ when ``include_inf``). Writes
    the carried ``%schatten_inv_p`` (and reads its previous value, carried): layers ``%activations`` does not
    cover keep their previous value. A refresh whose spectra are not finite is discarded (every layer keeps
    its previous p) and counted (``criterion_failures``).

    Telemetry: ``p_min``, ``p_max``, ``p_mean`` (harmonic: 1/mean(1/p)) over layers, and ``p[<layer key>]``
    for every key named in ``report_layers``.

    >>> from curvplan.modules.geometry import SchattenCriterion
    >>> SchattenCriterion().cadence, SchattenCriterion(report_layers=("['w']",)).info_fields[-1]
    (@every(100), ("p['w']", 'float'))
    """

    kind: Literal["schatten_criterion"] = "schatten_criterion"
    blockwise = True  # the spectra of the layers (eigh of their Grams)
    cadence: Cadence | None = Cadence(every=100)
    grid: tuple[float, ...] = DEFAULT_GRID
    include_inf: bool = True
    ema: float = Field(0.9, ge=0.0, lt=1.0)
    max_dim: int = Field(512, ge=2)
    init_p: float = Field(1e30, ge=1.0)
    """p before the first refresh (≥ 1e30 means ∞)."""
    report_layers: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _check_grid(self):
        bad = [p for p in self.grid if not p >= 1.0]  # NaN fails too
        if bad:
            raise ConfigError(f"grid={self.grid} has values outside [1, ∞]: {bad}",
                              fix="Schatten-p needs p ≥ 1: give grid values ≥ 1 (p = ∞ comes from include_inf)")
        if not self.grid and not self.include_inf:
            raise ConfigError("no candidate p: grid is empty and include_inf=False",
                              fix="give grid values ≥ 1 or include_inf=True")
        return self

    @property
    def info_fields(self):  # type: ignore[override]
        base = (("p_min", "float"), ("p_max", "float"), ("p_mean", "float"), ("criterion_failures", "int"))
        return base + tuple((f"p{k}", "float") for k in self.report_layers)

    def consumes(self):
        return {"grad": fresh(q.grad()), "activations": fresh(q.activations()), "rng": fresh(q.rng()),
                "prev_inv_p": carried(schatten_inv_p())}

    def produces(self):
        return {"inv_p": schatten_inv_p()}

    def _layers(self, params):
        return {k: x for k, x in zip(leaf_keys(params), jax.tree.leaves(params)) if x.ndim >= 2}

    def _lengths(self, x):
        g = x.reshape(-1, x.shape[-1])
        return min(min(g.shape), self.max_dim), min(g.shape[0], self.max_dim)

    def init(self, params, ctx) -> CriterionState:
        layers = self._layers(params)
        dt = lambda x: jnp.promote_types(x.dtype, jnp.float32)
        sg = {k: jnp.zeros(self._lengths(x)[0], dt(x)) for k, x in layers.items()}
        sa = {k: jnp.zeros(self._lengths(x)[1], dt(x)) for k, x in layers.items()}
        return CriterionState(sg, sa, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

    def init_carried(self, name, params, ctx):
        inv = 0.0 if self.init_p >= 1e30 else 1.0 / self.init_p
        return {k: jnp.asarray(inv, jnp.float32) for k in self._layers(params)}

    def apply(self, inputs, state: CriterionState, ctx):
        g, acts, key, prev = inputs.grad, inputs.activations, inputs.rng, inputs.prev_inv_p
        layers = self._layers(g)
        inv_ps = criterion_inv_ps(self.include_inf, self.grid)
        count = state.count + 1
        sg, sa, out = dict(state.sg), dict(state.sa), {}
        ok = jnp.array(True)
        keys = dict(zip(layers, jax.random.split(key, len(layers)))) if key is not None and layers else {}
        covered, items, statics = [k for k in layers if k in acts], [], []
        for k in covered:  # the spectra of every layer, handed to the block map (split over devices when placed)
            lg, la = self._lengths(layers[k])
            kg, ka = jax.random.split(keys[k]) if k in keys else (None, None)
            dt = state.sg[k].dtype
            xg, xa = layers[k].reshape(-1, layers[k].shape[-1]).astype(dt), jnp.asarray(acts[k], dt)
            kg, ka = (None if self._exact(y) else kk for y, kk in ((xg, kg), (xa, ka)))  # keys only to sample
            items.append((xg, xa, kg, ka))
            statics.append((lg, la))
        spectra = ctx.blocks.map(lambda it, st: (_spectrum(it[0], st[0], self.max_dim, it[2])[0],
                                                 _spectrum(it[1], st[1], self.max_dim, it[3])[0]), items, statics)
        for k, (s_g, s_a), (xg, xa, kg, ka) in zip(covered, spectra, items):
            wg, wa = (_sample_weight(y.shape, self.max_dim, kk) for y, kk in ((xg, kg), (xa, ka)))
            ok = ok & jnp.all(jnp.isfinite(s_g)) & jnp.all(jnp.isfinite(s_a))
            sg[k], sa[k] = optax.tree.update_moment((s_g, s_a), (state.sg[k], state.sa[k]), self.ema, 1)
            s_g_hat, s_a_hat = optax.tree.bias_correction((sg[k], sa[k]), self.ema, count)
            ok = ok & jnp.all(jnp.isfinite(s_g_hat)) & jnp.all(jnp.isfinite(s_a_hat))  # a poisoned EMA fails too
            out[k] = best_inv_p(s_g_hat, s_a_hat, inv_ps, wg, wa).astype(jnp.float32)
        inv = {k: jnp.where(ok, out[k], prev[k]) if k in out else prev[k] for k in layers}
        new = CriterionState(sg, sa, count, state.failures)
        kept = CriterionState(state.sg, state.sa, state.count, state.failures + 1)
        new = optax.tree.where(ok, new, kept)
        return {"inv_p": inv}, new, self._info(inv, new.failures)

    def _exact(self, x) -> bool:
        return x.shape[0] <= self.max_dim and x.shape[1] <= self.max_dim

    def _info(self, inv, failures) -> dict:
        info = {"criterion_failures": failures}
        if inv:
            v = jnp.stack(list(inv.values()))
            to_p = lambda x: jnp.where(x > 0, 1.0 / jnp.maximum(x, 1e-30), jnp.inf)
            info |= {"p_min": to_p(jnp.max(v)), "p_max": to_p(jnp.min(v)), "p_mean": to_p(jnp.mean(v))}
            info |= {f"p{k}": to_p(inv[k]) for k in self.report_layers if k in inv}
        return info


# -- the direction ---------------------------------------------------------------------------------------
class SchattenState(NamedTuple):
    """The step count, the EMAs of g (``beta``) and g² (``b2``), and the auxiliary Adam's first moment."""

    count: jax.Array
    m: object
    v: object
    adam_m: object


class SchattenDirection(Module):
    """``%direction.schatten``: per matrix ``s^{1−1/p} · D ⊙ Φ_p(D ⊙ m̂)``, elementwise ``D² ⊙ m̂`` elsewhere.

    Matrices are the 2-D leaves and 4-D conv kernels (as ``(kh·kw·c_in, c_out)``; `optax.contrib.muon` sends
    those to Adam by default).

    m̂ is the bias-corrected (Nesterov if set) EMA of the gradient with ``beta``; ``Φ_p(M) = U Σ^{1/p} Vᵀ``
    (unscaled, so p = 1 is the identity); ``s = √max(1, fan_out/fan_in)`` is Muon's shape factor, applied
    fully at p = ∞ and not at p = 1. ``precondition="adam"`` uses ``D = (√v̂ + eps)^{−1/2}`` (v̂ the
    bias-corrected EMA of g² with ``b2``), so that ``D² ⊙ m̂`` is exactly Adam's step; ``"none"`` is D ≡ 1.
    The four corners: none/p=1 SGD-momentum, none/p=∞ Muon, adam/p=1 Adam, adam/p=∞ MuAdam.

    p per matrix: ``fixed_p`` if given (``"inf"`` allowed), else the carried ``%schatten_inv_p`` of
    `SchattenCriterion` (leaves it does not list use p = ∞). ``vectors="adam"`` gives non-matrix leaves
    Muon's auxiliary Adam (``adam_b1``, ``b2``) instead of the same rule at p = 1.

    ``method``: ``exact`` (eigh of the smaller Gram; p = ∞ is the exact polar factor), ``newton_schulz``
    (refitted quintic iterations, §7.6(d); with a fixed p = ∞ the Muon quintic ``ns`` preset), or ``auto``
    (exact up to ``exact_max_dim``, Newton-Schulz above). The refitted iteration is inaccurate (measured in
    the tests: relative error up to ~0.3 for p = 4), so ``exact`` is the default.
    """

    kind: Literal["schatten_direction"] = "schatten_direction"
    blockwise = True
    beta: float = Field(0.95, ge=0.0, lt=1.0)
    nesterov: bool = True
    precondition: Literal["none", "adam"] = "none"
    b2: float = Field(0.999, ge=0.0, lt=1.0)
    eps: float = Field(1e-8, gt=0)
    fixed_p: float | Literal["inf"] | None = None
    method: Literal["exact", "newton_schulz", "auto"] = "exact"
    ns: Literal["standard", "polar_express"] = "standard"
    ns_steps: int = Field(5, ge=1, le=100)
    exact_max_dim: int = Field(1024, ge=1)
    vectors: Literal["same", "adam"] = "same"
    adam_b1: float = Field(0.9, ge=0.0, lt=1.0)
    shape_scale: bool = True

    @model_validator(mode="after")
    def _check_p(self):
        p = self.fixed_p
        if p is not None and p != "inf" and not p >= 1.0:  # NaN fails too
            raise ConfigError(f"fixed_p={p} is outside [1, ∞]",
                              fix='Schatten-p needs p ≥ 1: give fixed_p ≥ 1, "inf" (Muon), or None (the criterion)')
        fractional = p is None or (p != "inf" and p > 1.0)
        if self.method != "exact" and fractional and self.ns_steps < 5:
            raise ConfigError(f"ns_steps={self.ns_steps} with method={self.method!r}: below 5 refitted steps the "
                              "quintic for large p leaves [0, 1] and the map grows without bound",
                              fix='give ns_steps ≥ 5, or method="exact"')
        return self

    def consumes(self):
        uses = {"grad": fresh(q.grad())}
        return uses if self.fixed_p is not None else uses | {"inv_p": carried(schatten_inv_p())}

    def produces(self):
        return {"direction": q.direction("schatten")}

    def init(self, params, ctx) -> SchattenState:
        z = optax.tree.zeros_like(params)
        return SchattenState(jnp.zeros((), jnp.int32), z, z, z)

    def _fixed_inv_p(self):
        return (
            0.0
            if self.fixed_p == "inf" or (self.fixed_p is not None and math.isinf(self.fixed_p))
            else (1.0 / float(self.fixed_p))
        )

    def apply(self, inputs, state: SchattenState, ctx):
        g = inputs.grad
        count = state.count + 1
        m, m_hat = ema_moments(g, state.m, count, self.beta, self.nesterov)
        v = optax.tree.update_moment_per_elem_norm(g, state.v, self.b2, 2)
        am, am_hat = ema_moments(g, state.adam_m, count, self.adam_b1, self.nesterov)
        keys, leaves = leaf_keys(g), jax.tree.leaves(g)
        treedef = jax.tree.structure(g)
        mh, vh, amh = (jax.tree.leaves(t) for t in (m_hat, optax.tree.bias_correction(v, self.b2, count), am_hat))
        inv_tab = None if self.fixed_p is not None else inputs.inv_p
        out: list = [None] * len(leaves)
        mats, inv_list, idx = [], [], []
        d_of = {}
        for i, x in enumerate(leaves):
            v_hat = vh[i]
            d = (jnp.sqrt(v_hat) + self.eps) ** -0.5 if self.precondition == "adam" else None
            if x.ndim in (2, 4):  # conv kernels (kh, kw, c_in, c_out) as (kh·kw·c_in, c_out)
                idx.append(i)
                d_of[i] = d
                mats.append((mh[i] if d is None else d * mh[i]).reshape(-1, x.shape[-1]))
                inv = self._fixed_inv_p() if inv_tab is None else inv_tab.get(keys[i], 0.0)
                inv_list.append(jnp.asarray(inv, x.dtype))
            elif self.vectors == "adam":
                out[i] = amh[i] / (jnp.sqrt(v_hat) + self.eps)
            else:
                out[i] = mh[i] if d is None else d * d * mh[i]
        phis = ctx.blocks.map_stacked(lambda s: self._phi(*s), list(zip(mats, inv_list)))
        for i, phi, inv in zip(idx, phis, inv_list):
            fan_in, fan_out = mats[idx.index(i)].shape
            s = max(1.0, fan_out / fan_in) ** 0.5 if self.shape_scale else 1.0
            phi = phi.reshape(leaves[i].shape) * s ** (1.0 - inv)
            out[i] = phi if d_of[i] is None else d_of[i] * phi
        return {"direction": jax.tree.unflatten(treedef, out)}, SchattenState(count, m, v, am)

    def _phi(self, stack, inv_p):
        """Φ_p on a stack of equal-shape matrices with per-matrix ``1/p``."""
        if self.fixed_p is not None and self._fixed_inv_p() == 1.0:
            return stack  # Φ_1 is the identity
        use_ns = self.method == "newton_schulz" or (
            self.method == "auto" and min(stack.shape[-2:]) > self.exact_max_dim
        )
        if not use_ns:
            return _maps.schatten_exact(stack, inv_p[:, None])
        if self.fixed_p is not None and self._fixed_inv_p() == 0.0:
            return _maps.newton_schulz(stack, self.ns, self.ns_steps, self.eps)
        p = jnp.where(inv_p > 0, 1.0 / jnp.maximum(inv_p, 1e-30), jnp.inf)
        return jax.vmap(lambda x, pp: _maps.schatten_ns(x, pp, self.ns_steps))(stack, p)
