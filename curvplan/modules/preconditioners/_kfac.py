"""K-FAC (docs/math.md §6.1): Kronecker factors from layer inputs and output cotangents, their π-damped inverses
(or, for exact / adaptive damping, eigendecompositions) refreshed every k steps, and the per-layer direction.

For a layer seen as a (d_in, d_out) matrix W (outputs = a @ W, conv: im2col patches), over N rows:

- ``A = (1/N) Σ ā āᵀ`` with ā = [a, 1] when the layer has a bias (homogeneous coordinate), else ā = a;
- ``Γ = (1/M) Σ (M δ)(M δ)ᵀ`` where δ are the output cotangents of the mean loss over M terms (``M δ`` is the
  cotangent of one term's own loss), i.e. the empirical Fisher with true labels.

M = N for a dense layer with one loss term per row. Where one term spans several rows (a convolution's
locations, a loop constant's iterations, an example-level loss over a sequence) the sum still runs over all N
rows, which is KFC's T·E[āāᵀ] ⊗ E[DsDsᵀ] (Grosse & Martens 2016, spatial homogeneity; "expand" for
sequences): Γ carries the factor T = N / M that A's mean leaves out.

Factors are averaged with weight ``ema`` (value = Σ ema^i x_i / Σ ema^i, no separate bias correction). The
direction solves ``(A ⊗ Γ + γ I) vec(U) = vec(∇)`` exactly in the factors' eigenbases (``damping_mode="exact"``)
or ``(Â ⊗ Γ̂) vec(U) = vec(∇)`` with π-adjusted Tikhonov damping Â = A + π√γ I, Γ̂ = Γ + √γ/π I (``"pi"``).

The factor state is allocated at ``init``: from the discovered layers when init is given an example batch, else
from parameter shapes alone: every leaf with two or more axes gets blocks for d_out = ``shape[out_axis]``,
d_in = size / d_out (``out_axis=-1`` for flax / plain ``x @ W`` / HWIO convolutions, ``0`` for equinox / torch
layouts). A discovered layer whose matrix shape
does not match, and every leaf discovery could not handle, uses the fallback (``identity``: the gradient itself,
``diagonal``: ``g / (EMA(g²) + γ)``); their count is reported as ``kfac_fallback_leaves``.

Stacked layers (one leaf scanned over by ``scan``: ``nn.scan``, equinox scan-over-layers) are named by key prefix
in ``stacked``: their leaves' leading axis is the stack, every slice gets its own factors, inverses and
direction, computed batched over the stack.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from pydantic import Field

from curvplan.ir import carried, fresh
from curvplan.ir import quantities as q
from curvplan.ir._errors import ConfigError, LoweringError
from curvplan.modules import _linalg
from curvplan.modules._base import Module
from curvplan.modules._blocks import BlockStore
from curvplan.modules._linalg import HIGHEST as _HI


def kfac_factors() -> q.Quantity:
    """``%kron.kfac``: per layer (A, Γ) as used by the inverse refresh."""
    return q.kron("kfac")


def kfac_eigbasis() -> q.Quantity:
    """``%eigbasis.kfac``: per layer eigendecompositions of the damped-ready factors (carried)."""
    return q.eigbasis(kfac_factors())


def kfac_inverses(damping: float) -> q.Quantity:
    """``%inverse.kfac``: per layer π-damped factor inverses (Â⁻¹, Γ̂⁻¹) for a fixed damping (carried)."""
    return q.quantity("inverse", "kfac", damping=float(damping))


def _pi_damped(tA, tG, gamma):
    """The π-adjusted Tikhonov terms (π√γ, √γ/π) for factors with mean traces ``tA``, ``tG`` (§6.1)."""
    pi = jnp.where((tA > 0) & (tG > 0), jnp.sqrt(tA / jnp.where(tG > 0, tG, 1.0)), 1.0)
    s = jnp.sqrt(gamma)
    return pi * s, s / pi


def _spd_inverse(m: jax.Array) -> jax.Array:
    """M⁻¹ = L⁻ᵀ L⁻¹ from the Cholesky factor M = L Lᵀ (NaN where M is not positive definite)."""
    x = _linalg.solve_triangular(_linalg.cholesky(m), jnp.eye(m.shape[-1], dtype=m.dtype), lower=True)
    return _linalg.symmetrize(jnp.matmul(x.T, x, precision=_HI))


def _blocks(params, out_axis: int, stacked: tuple[str, ...] = ()) -> dict[str, tuple[int, int, int]]:
    """Leaf key -> (stack, d_in, d_out) of the state blocks, from shapes only (stack 0: a single matrix)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        key, shape = jax.tree_util.keystr(path), jnp.shape(leaf)
        stack = shape[0] if any(key.startswith(s) for s in stacked) else 0
        inner = shape[1:] if stack else shape
        if len(inner) >= 2 and jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            d_out = inner[out_axis]
            out[key] = (stack, int(np.prod(inner)) // d_out, d_out)
    return out


def _allocation(params, ctx, out_axis: int, stacked: tuple[str, ...]) -> dict[str, tuple[int, int, int]]:
    """Leaf key -> (stack, d_in, d_out) of the layers K-FAC keeps state for.

    When ``init`` saw an example batch (``ctx.layers``), these are the discovered layers, read off the traced
    use: ``(in, out)`` flax weights and ``(out, in)`` equinox / torch weights alike, stacked (scanned-over,
    per-head) layers with their stack. Otherwise every floating leaf with two or more axes, by ``out_axis`` and
    ``stacked`` (`_blocks`)."""
    if ctx is not None and ctx.layers is not None:
        return {k: (l.stack, l.d_in, l.d_out) for k, l in ctx.layers().layers.items()}
    return _blocks(params, out_axis, stacked)


def _allocated(pairs: dict) -> dict[str, tuple[int, int, int]]:
    """(stack, d_in, d_out) per layer from its state pair (A-side, Γ-side) as allocated: A has the homogeneous
    slot, so d_in is one less than its side."""
    return {k: (a.shape[0] if a.ndim == 3 else 0, a.shape[-1] - 1, g.shape[-1]) for k, (a, g) in pairs.items()}


def _lead(stack: int) -> tuple[int, ...]:
    """The leading shape of a layer's state arrays: ``(stack,)`` for a stacked layer, else ``()``."""
    return (stack,) if stack else ()


def _stack_eye(n: int, stack: int, dt) -> jax.Array:
    return jnp.broadcast_to(jnp.eye(n, dtype=dt), _lead(stack) + (n, n))


def _per_slice(fn, stack: int):
    """``fn`` over a single layer's arrays, mapped over the leading axis for a stacked layer."""
    return jax.vmap(fn) if stack else fn


def _slices(item: tuple, split: bool) -> list[tuple]:
    """A layer's arrays as block items: the slices of a stacked layer when ``split``, else the layer whole."""
    if not split:
        return [item]
    return [tuple(x[j] for x in item) for j in range(item[0].shape[0])]


def _unslice(parts: list, stacked: bool):
    """Inverse of `_slices` for the results."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *parts) if stacked else parts[0]


def _report(acts, module: str):
    report = getattr(acts, "report", None)
    if report is None:
        raise LoweringError(
            "K-FAC needs the layer report that comes with %activations from the layer_io provider",
            where=f"module `{module}`, quantity %activations",
            fix="let the planner pick the `layer_io` provider (do not give %activations from another module)",
        )
    return report


def _covered(report, blocks) -> dict[str, Any]:
    """Discovered layers whose (stack, d_in, d_out) match the state blocks."""
    return {k: l for k, l in report.layers.items() if blocks.get(k) == (l.stack, l.d_in, l.d_out)}


class FallbackWarning(UserWarning):
    """A K-FAC plan leaves weight matrices to its fallback (said once per compiled program, with the reason)."""


def _warn_uncovered(report, blocks, covered, matrices: set[str], out_axis: int, module: str) -> None:
    """Names the matrix leaves K-FAC does not cover and why, at trace time (once per compiled program)."""
    why = {}
    for k, l in report.layers.items():
        if k in covered:
            continue
        got = f"used as a {l.d_in}x{l.d_out} (in, out) matrix"
        if k not in blocks:
            why[k] = f"{got}, no state allocated for it"
            continue
        s, i, o = blocks[k]
        transposed = (l.stack, l.d_out, l.d_in) == (s, i, o)
        why[k] = (f"{got}, allocated as {i}x{o} by out_axis={out_axis}"
                  + (f": give init an example batch (`opt.init(params, batch=...)`, `as_optax(..., "
                     f"example_batch=...)`) or pass out_axis={0 if out_axis == -1 else -1}" if transposed else ""))
    for k, reason in report.skipped.items():
        if k in matrices:
            why[k] = reason
    if why:
        listed = "; ".join(f"{k} ({r})" for k, r in sorted(why.items()))
        msg = (f"K-FAC module `{module}` covers {len(covered)} weight matrices and leaves {len(why)} to its "
               f"fallback: {listed}")
        if msg not in _WARNED:  # every phase program traces the direction: say it once
            _WARNED.add(msg)
            warnings.warn(msg, FallbackWarning, stacklevel=2)


_WARNED: set[str] = set()


def _check_stacked(params, stacked: tuple[str, ...], module: str) -> None:
    keys = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    missing = [s for s in stacked if not any(k.startswith(s) for k in keys)]
    if missing:
        raise LoweringError(f"stacked prefixes {missing} match no parameter leaf", where=f"module `{module}`",
                            fix=f"give prefixes of keys as `jax.tree_util.keystr` prints them, e.g. {keys[:3]}")


class KFACFactorsState(NamedTuple):
    """``sums``: key -> (Σ ema^i A_i of side d_in+1, Σ ema^i Γ_i), stacked by shape; ``weight``: Σ ema^i."""

    sums: BlockStore
    weight: jax.Array


class KFACFactors(Module):
    """Moving averages of the K-FAC factors, produced as ``%kron.kfac`` (key -> (A, Γ)); see the module doc.

    >>> from curvplan.modules.preconditioners._kfac import KFACFactors
    >>> [u.quantity.name for u in KFACFactors().uses()]
    ['%activations', '%out_cotangents']
    """

    kind: Literal["kfac_factors"] = "kfac_factors"
    ema: float = Field(0.95, ge=0.0, lt=1.0)
    labels: Literal["true", "sampled"] = "true"
    """Γ from the cotangents at the batch's labels (empirical Fisher) or at labels sampled from the model's
    predictive (the Fisher; needs ``model_fn``/``loss`` and an rng, and costs a second backward pass)."""
    out_axis: Literal[-1, 0] = -1
    stacked: tuple[str, ...] = ()
    """Key prefixes of stacked layers' leaves (leading axis = the stack; see the module doc)."""
    sink = True  # the averages must see every step's statistics, whether or not a refresh reads them

    def consumes(self):
        return {"acts": fresh(q.activations()), "cots": fresh(q.out_cotangents(labels=self.labels))}

    def produces(self):
        return {"factors": kfac_factors()}

    def init(self, params, ctx) -> KFACFactorsState:
        _check_stacked(params, self.stacked, ctx.module)
        dt = jnp.result_type(float)
        sums = {k: (jnp.zeros(_lead(s) + (i + 1, i + 1), dt), jnp.zeros(_lead(s) + (o, o), dt))
                for k, (s, i, o) in _allocation(params, ctx, self.out_axis, self.stacked).items()}
        return KFACFactorsState(BlockStore.of(sums), jnp.zeros((), dt))

    def apply(self, inputs, state: KFACFactorsState, ctx):
        acts, cots = inputs["acts"], inputs["cots"]  # `LayerArrays`: key -> array, with the layer report (.report)
        old = state.sums.blocks()
        layers = _covered(_report(acts, ctx.module), _allocated(old))
        sums, out = dict(old), {}
        weight = self.ema * state.weight + 1.0
        for key, layer in layers.items():
            terms = getattr(cots, "terms", None) or acts[key].shape[-2]
            A, G = _per_slice(lambda a, d: _layer_factors(a, d, terms), layer.stack)(
                acts[key].astype(weight.dtype), cots[key].astype(weight.dtype))
            sA, sG = old[key]
            sums[key] = (self.ema * sA + A, self.ema * sG + G)
            A_avg, G_avg = sums[key][0] / weight, sums[key][1] / weight
            out[key] = (A_avg if layer.bias else A_avg[..., :-1, :-1], G_avg)
        return {"factors": _Factors(out, acts.report)}, KFACFactorsState(BlockStore.of(sums), weight)


def _layer_factors(a: jax.Array, d: jax.Array, terms: int) -> tuple[jax.Array, jax.Array]:
    """One batch's (A, Γ) of one layer from its (N, d_in) inputs and (N, d_out) cotangents of a mean over
    ``terms`` loss terms (symmetrized where they are factorized, by `KFACInverse`, not every step)."""
    n = a.shape[0]
    a = jnp.concatenate([a, jnp.ones((n, 1), a.dtype)], axis=1)  # homogeneous column (always kept)
    return jnp.matmul(a.T, a, precision=_HI) / n, jnp.matmul(d.T, d, precision=_HI) * terms


@jax.tree_util.register_pytree_node_class
class _Factors(dict):
    """key -> (A, Γ) with the layer report attached (``.report``)."""

    def __init__(self, items, report):
        super().__init__(items)
        self.report = report

    def tree_flatten(self):
        keys = tuple(sorted(self))
        return tuple(self[k] for k in keys), (keys, self.report)

    @classmethod
    def tree_unflatten(cls, aux, values):
        return cls(dict(zip(aux[0], values)), aux[1])


def _safe_eigh(m: jax.Array) -> tuple[jax.Array, jax.Array]:
    lam, vec = _linalg.eigh(_linalg.symmetrize(m), symmetrize_input=False)
    return jnp.maximum(lam, 0.0), vec


class KFACInverseState(NamedTuple):
    """``failures``: refreshes that were not finite (and kept the previous value), cumulative."""

    failures: jax.Array


class KFACInverse(Module):
    """Eigendecompositions of the K-FAC factors, refreshed on its cadence (``every=k``) into the carried
    ``%eigbasis.kfac``: ``{"count": refreshes, "layers": key -> (Q_A, λ_A, Q_Γ, λ_Γ)}`` (eigenvalues clipped
    at 0; layers without a bias pad A's unused homogeneous slot with an identity block). A refresh that is not
    finite keeps the previous bases and is counted in ``kfac_inverse_failures``.

    With ``pi_damping=γ`` it stores the π-damped inverses ``(Â⁻¹, Γ̂⁻¹)`` instead, as ``%inverse.kfac``, from
    Cholesky factorizations (π needs only the traces): a refresh costs two Cholesky solves per layer instead of
    two eigendecompositions, and a direction two matrix products instead of four.

    >>> from curvplan.modules.preconditioners._kfac import KFACInverse
    >>> str(KFACInverse(every=5).cadence)
    '@every(5)'
    """

    kind: Literal["kfac_inverse"] = "kfac_inverse"
    blockwise = True
    out_axis: Literal[-1, 0] = -1
    stacked: tuple[str, ...] = ()
    pi_damping: float | None = Field(None, gt=0)
    info_fields = (("kfac_inverse_failures", "int"),)

    def _out(self):
        return kfac_eigbasis() if self.pi_damping is None else kfac_inverses(self.pi_damping)

    def consumes(self):  # its own carried output: the last good value, kept when a refresh fails
        return {"factors": fresh(kfac_factors()), "basis": carried(self._out())}

    def produces(self):
        return {"basis": self._out()}

    def init(self, params, ctx) -> KFACInverseState:
        return KFACInverseState(jnp.zeros((), jnp.int32))

    def init_carried(self, name, params, ctx):
        dt = jnp.result_type(float)
        layers = {}
        for k, (s, i, o) in _allocation(params, ctx, self.out_axis, self.stacked).items():
            if self.pi_damping is None:
                layers[k] = (_stack_eye(i + 1, s, dt), jnp.zeros(_lead(s) + (i + 1,), dt), _stack_eye(o, s, dt),
                             jnp.zeros(_lead(s) + (o,), dt))
            else:
                layers[k] = (_stack_eye(i + 1, s, dt), _stack_eye(o, s, dt))
        return {"count": jnp.zeros((), jnp.int32), "layers": BlockStore.of(layers)}

    def apply(self, inputs, state: KFACInverseState, ctx):
        factors, prev = inputs["factors"], inputs["basis"]
        layers, finite = dict(prev["layers"].blocks()), jnp.array(True)
        split = ctx.blocks.shares > 1  # stacked layers are cut into slices only when devices share them
        items, statics = [], []
        for key, (A, G) in factors.items():
            pad = layers[key][0].shape[-1] - A.shape[-1]
            parts = _slices((A, G), split and A.ndim == 3)
            items += parts
            statics += [(pad, A.ndim == 3 and not split)] * len(parts)
        done = iter(ctx.blocks.map(lambda f, st: _per_slice(lambda A, G: self._refresh(A, G, st[0]), st[1])(*f),
                                   items, statics))
        for key, (A, G) in factors.items():
            entry = _unslice([next(done) for _ in _slices((A, G), split and A.ndim == 3)], A.ndim == 3 and split)
            layers[key] = entry
            finite = finite & jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in entry]))
        new = {"count": prev["count"] + 1, "layers": BlockStore.of(layers)}
        out = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, prev)
        failures = state.failures + (~finite).astype(jnp.int32)
        return {"basis": out}, KFACInverseState(failures), {"kfac_inverse_failures": failures}

    def _refresh(self, A, G, pad: int):
        """One layer's entry: (Q_A, λ_A, Q_Γ, λ_Γ), or the π-damped inverses (Â⁻¹, Γ̂⁻¹)."""
        if self.pi_damping is None:
            lA, QA = _safe_eigh(A)
            lG, QG = _safe_eigh(G)
            if pad:
                QA = jax.scipy.linalg.block_diag(QA, jnp.eye(pad, dtype=QA.dtype))
                lA = jnp.concatenate([lA, jnp.zeros(pad, lA.dtype)])
            return QA, lA, QG, lG
        A, G = _linalg.symmetrize(A), _linalg.symmetrize(G)
        dA, dG = _pi_damped(jnp.trace(A) / A.shape[0], jnp.trace(G) / G.shape[0], self.pi_damping)
        Ainv = _spd_inverse(A + dA * jnp.eye(A.shape[0], dtype=A.dtype))
        Ginv = _spd_inverse(G + dG * jnp.eye(G.shape[0], dtype=G.dtype))
        if pad:
            Ainv = jax.scipy.linalg.block_diag(Ainv, jnp.eye(pad, dtype=Ainv.dtype))
        return Ainv, Ginv


class KFACDirectionState(NamedTuple):
    """``v``: EMA(g²) per parameter leaf for ``fallback="diagonal"`` (``()`` for ``"identity"``); ``count``:
    the steps seen (bias correction of ``v``)."""

    v: Any
    count: jax.Array


class KFACDirection(Module):
    """The K-FAC direction ``%direction.kfac``: per covered layer U solving (A ⊗ Γ + γ I) vec U = vec ∇
    (``damping_mode="exact"``) or with π-adjusted damping (``"pi"``), from the carried eigenbases; other leaves
    use ``fallback``. Until the first refresh (``burnin``) the covered layers' directions are zero. With
    ``adaptive=True`` the damping γ is the carried ``%lambda`` (e.g. from `TrustRegionDamping`) instead of
    ``damping``. With a fixed damping in ``"pi"`` mode it reads the inverses of ``KFACInverse(pi_damping=damping)``
    (``%inverse.kfac``); otherwise the eigenbases.

    >>> from curvplan.modules.preconditioners._kfac import KFACDirection
    >>> [u.quantity.name for u in KFACDirection().uses()]
    ['%grad', '%inverse.kfac', '%activations']
    >>> [u.quantity.name for u in KFACDirection(damping_mode="exact").uses()]
    ['%grad', '%eigbasis.kfac', '%activations']
    """

    kind: Literal["kfac_direction"] = "kfac_direction"
    blockwise = True
    damping: float = Field(1e-3, gt=0)
    damping_mode: Literal["pi", "exact"] = "pi"
    fallback: Literal["identity", "diagonal"] = "identity"
    fallback_ema: float = Field(0.99, ge=0.0, lt=1.0)
    out_axis: Literal[-1, 0] = -1
    stacked: tuple[str, ...] = ()
    adaptive: bool = False
    info_fields = (("kfac_layers", "int"), ("kfac_fallback_leaves", "int"))

    @property
    def _uses_inverses(self) -> bool:
        return self.damping_mode == "pi" and not self.adaptive

    def _basis(self):
        return kfac_inverses(self.damping) if self._uses_inverses else kfac_eigbasis()

    def consumes(self):
        uses = {"grad": fresh(q.grad()), "basis": carried(self._basis()), "acts": fresh(q.activations())}
        return uses | ({"lam": carried(q.lam())} if self.adaptive else {})

    def produces(self):
        return {"direction": q.direction("kfac")}

    def init(self, params, ctx) -> KFACDirectionState:
        v = optax.tree.zeros_like(params) if self.fallback == "diagonal" else ()  # EMA(g²) only if used
        return KFACDirectionState(v, jnp.zeros((), jnp.int32))

    def apply(self, inputs, state: KFACDirectionState, ctx):
        g, basis = inputs["grad"], inputs["basis"]
        gamma = inputs["lam"] if self.adaptive else self.damping
        report = _report(inputs["acts"], ctx.module)
        entries = basis["layers"].blocks()
        blocks = _allocated({k: (e[0], e[2] if len(e) == 4 else e[1]) for k, e in entries.items()})
        layers = _covered(report, blocks)
        matrices = {jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(g)[0] if x.ndim >= 2}
        _warn_uncovered(report, blocks, layers, matrices, self.out_axis, ctx.module)
        v, count = state.v, state.count + 1
        if self.fallback == "diagonal":
            v = optax.tree.update_moment(g, v, self.fallback_ema, 2)
            u = jax.tree.map(lambda x, vi: x / (vi + gamma), g,
                             optax.tree.bias_correction(v, self.fallback_ema, count))
        else:
            u = g
        flat_g = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(g)[0]}
        solved: dict[str, jax.Array] = {}
        ready = basis["count"] > 0
        split = ctx.blocks.shares > 1
        items, statics, keys = [], [], []
        for key, layer in layers.items():
            entry = entries[key]
            dt = entry[0].dtype
            grad_m = layer.to_matrix(flat_g[key]).astype(dt)
            n = layer.d_in
            if layer.bias:
                bias_row = flat_g[layer.bias].reshape(-1)[layer.bias_index][..., None, :].astype(dt)
                grad_m = jnp.concatenate([grad_m, bias_row], -2)
                n += 1
            if self._uses_inverses:
                Ainv, Ginv = entry
                item = (Ainv[..., :n, :n], Ginv, grad_m)
            else:
                QA, lA, QG, lG = entry
                item = (QA[..., :n, :n], lA[..., :n], QG, lG, grad_m)
            parts = _slices(item, split and bool(layer.stack))
            items += parts
            statics += [bool(layer.stack) and not split] * len(parts)
            keys.append((key, layer, len(parts)))

        def solve(item, stacked):
            if self._uses_inverses:
                Ainv, Ginv, m = item
                return jnp.matmul(jnp.matmul(Ainv, m, precision=_HI), Ginv, precision=_HI)
            return _per_slice(lambda QA, lA, QG, lG, m: self.solve(QA, lA, QG, lG, m, gamma), stacked)(*item)

        done = iter(ctx.blocks.map(solve, items, statics))
        for key, layer, n_parts in keys:
            U = _unslice([next(done) for _ in range(n_parts)], bool(layer.stack) and split)
            solved[key] = jnp.where(ready, layer.from_matrix(U[..., : layer.d_in, :]), 0.0).astype(flat_g[key].dtype)
            if layer.bias:
                b = jnp.zeros(flat_g[layer.bias].size, U.dtype).at[layer.bias_index].set(U[..., -1, :])
                solved[layer.bias] = jnp.where(ready, b.reshape(flat_g[layer.bias].shape), 0.0).astype(
                    flat_g[layer.bias].dtype)
        paths, treedef = jax.tree_util.tree_flatten_with_path(u)
        leaves = [solved.get(jax.tree_util.keystr(p), x) for p, x in paths]
        info = {"kfac_layers": len(layers), "kfac_fallback_leaves": len(leaves) - len(solved)}
        return {"direction": jax.tree.unflatten(treedef, leaves)}, KFACDirectionState(v, count), info

    def solve(self, QA, lA, QG, lG, grad_m, gamma):
        """U with (A ⊗ Γ + γ) vec U = vec ∇ for A = Q_A diag(λ_A) Q_Aᵀ, Γ likewise (row-major vec)."""
        V = jnp.matmul(jnp.matmul(QA.T, grad_m, precision=_HI), QG, precision=_HI)
        if self.damping_mode == "exact":
            V = V / (lA[:, None] * lG[None, :] + gamma)
        else:
            dA, dG = _pi_damped(jnp.mean(lA), jnp.mean(lG), gamma)  # mean eigenvalue = mean trace
            V = V / ((lA + dA)[:, None] * (lG + dG)[None, :])
        return jnp.matmul(jnp.matmul(QA, V, precision=_HI), QG.T, precision=_HI)


def kfac(
    learning_rate: Any = 0.1,
    *,
    damping: float = 0.1,
    inverse_every: int = 5,
    ema: float = 0.95,
    damping_mode: Literal["pi", "exact"] = "pi",
    fallback: Literal["identity", "diagonal"] = "identity",
    out_axis: Literal[-1, 0] = -1,
    stacked: tuple[str, ...] = (),
    burnin: int = 0,
    labels: Literal["true", "sampled"] = "true",
    adapt_damping_every: int | None = None,
    adaptive: bool = False,
    damping_decay: float | None = None,
    loss: Literal["ce", "mse"] = "ce",
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    clip_norm: float | None = None,
) -> list[Module]:
    """K-FAC: factors every step, π-damped inverses (Cholesky; eigendecompositions for ``damping_mode="exact"``
    or adaptive damping) every ``inverse_every`` steps (first at ``burnin``), then ``-lr·U`` through `UpdateTail`.
    Before the first refresh (the ``burnin`` steps, which still accumulate factors) the covered layers do not
    move.

    ``adapt_damping_every=k`` makes the damping adaptive as kfac-jax does (Martens & Grosse §6.5): every k steps
    the gain ratio ρ of the applied update under the GGN quadratic model of ``loss`` (`GainRatio`, without the
    λ term) drives `TrustRegionDamping` from ``damping``, λ ×= ω on ρ > 3/4 and λ /= ω on ρ < 1/4 with
    ω = ``damping_decay``^k (19/20 by default, the paper's). Those steps also linearize the model (one
    GGN-vector product and one extra forward).

    ``adaptive=True`` is kfac-jax's adaptive configuration (adaptive learning rate, momentum and damping): the
    step size α and momentum β of every step minimize the damped GGN quadratic model on span{−U, δ₋} with
    0 ≤ β ≤ 1 (`QuadraticStep`, two GGN-vector products a step), and the damping adapts every ``adapt_damping_every``
    steps (5 unless given) with ``damping_decay`` 0.9 unless given (kfac-jax's). On the digits MLP it reaches
    AdamW's 360-step held-out loss in 40-100 steps from any initial damping in [0.01, 1] (3 of 3 seeds each;
    ``python -m benchmarks.sweep kfac_adaptive``). ``learning_rate`` is then unused, and ``momentum``,
    ``weight_decay``, ``clip_norm`` are refused (the model chooses the step). On the char transformer it reaches
    AdamW's 200-step target from damping 0.1 (180-300 steps, 3 of 3 seeds) but not from 0.01.

    With the fixed step (``adaptive=False``) these defaults do not reach AdamW's time-to-target loss (0 of 5
    seeds on the digits MLP, 0 of 3 on the char transformer): ``-0.1·U`` under damping 0.1 is too short a
    step, and no fixed learning rate suits both the early, well-scaled steps and the later ones. Damping 0.01
    reaches it on the MLP (120-260 steps, 3 of 3) but not on the transformer (``python -m benchmarks.sweep
    kfac_adaptive`` / ``kfac_adaptive_w3``). Use ``adaptive=True`` to train to a target.

    The per-layer state is laid out at ``init``. Give init an example batch (``opt.init(params, batch=b)``,
    ``cp.as_optax(..., example_batch=b)``) and the layers are read off the traced model: flax ``(in, out)`` and
    equinox / torch ``(out, in)`` weights alike, and stacked (scanned-over, per-head) layers without
    ``stacked=``. Without one, every leaf with two or more axes is laid out with ``out_axis`` (``-1``: flax,
    plain ``x @ W``, HWIO convolutions; ``0``: ``(out, in)`` weights) and ``stacked``. Layers the layout does
    not match fall back to ``fallback``; a `FallbackWarning` names them once, with the fix, and
    ``StepInfo.kfac_fallback_leaves`` counts them.

    >>> import curvplan as cp
    >>> from curvplan.modules.preconditioners._kfac import kfac
    >>> cp.compile_plan(kfac(inverse_every=3)).period
    3
    """
    from curvplan.modules.curvature import GGN
    from curvplan.modules.damping import GainRatio, TrustRegionDamping
    from curvplan.modules.transforms import QuadraticStep, UpdateTail

    if adaptive:
        given = {k: v for k, v in (("momentum", momentum), ("weight_decay", weight_decay)) if v}
        if clip_norm is not None:
            given["clip_norm"] = clip_norm
        if given:
            raise ConfigError(f"kfac(adaptive=True) chooses its own step, so {', '.join(given)} would be ignored",
                              fix="drop " + ", ".join(f"{k}=" for k in given) + " or use adaptive=False")
        adapt_damping_every = adapt_damping_every or 5
    if damping_decay is None:
        damping_decay = 0.9 if adaptive else 19 / 20  # kfac-jax's / the paper's
    if not 0 < damping_decay < 1:
        raise ConfigError(f"kfac(damping_decay={damping_decay}) must lie in (0, 1)",
                          fix="give the per-step factor by which the damping may fall, e.g. 0.95")
    tail = QuadraticStep(source="kfac", beta_bounds=(0.0, 1.0)) if adaptive else UpdateTail(
        learning_rate=learning_rate, source="kfac", momentum=momentum, weight_decay=weight_decay,
        clip_norm=clip_norm)
    adaptive_damping = adapt_damping_every is not None
    mods: list[Module] = [
        KFACFactors(ema=ema, out_axis=out_axis, stacked=stacked, labels=labels, every=1),
        KFACInverse(every=inverse_every, start=burnin, out_axis=out_axis, stacked=stacked,
                    pi_damping=damping if damping_mode == "pi" and not adaptive_damping else None),
        KFACDirection(damping=damping, damping_mode=damping_mode, fallback=fallback, out_axis=out_axis,
                      stacked=stacked, adaptive=adaptive_damping),
        tail,
    ]
    if adaptive_damping:
        omega = damping_decay**adapt_damping_every
        mods += [GGN(loss=loss), GainRatio(every=adapt_damping_every, include_lambda=False),
                 TrustRegionDamping(lam0=damping, every=adapt_damping_every, increase=1 / omega, decrease=omega)]
    return mods
