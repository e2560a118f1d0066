"""Gradient Gram factors ``%kron.grad_gram`` and their eigendecomposition ``%eigbasis.grad_gram``.

Shampoo, SOAP and SCAO all start from the same two quantities, so a plan that combines them computes each once:

- `GradGram` keeps, per matrix parameter (viewed as ``(prod(shape[:-1]), shape[-1])``, optionally cut into
  blocks), L = Σ G Gᵀ and R = Σ Gᵀ G (a sum, AdaGrad style, or an EMA). Vectors and matrices with a side above
  ``max_dim`` get a diagonal statistic Σ g² instead (the per-element fallback).
- `GramEigbasis` refreshes an eigendecomposition of every factor (``eigh``, or SOAP's one power iteration +
  QR), eigenvalues descending and clipped at 0. A non-finite refresh keeps the previous basis and is counted.

>>> from curvplan.modules.preconditioners._grad_gram import GradGram, GramEigbasis, gram_layout
>>> gram = GradGram(beta=0.95, every=1)
>>> [x.name for x in gram.outputs()], [x.name for x in GramEigbasis(gram=gram.spec, every=10).outputs()]
(['%kron.grad_gram'], ['%eigbasis.grad_gram'])
>>> gram_layout((300, 10), block_size=128, max_dim=4096)
((0, 128, 0, 10), (128, 256, 0, 10), (256, 300, 0, 10))
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from pydantic import Field

from curvplan.ir import carried, fresh
from curvplan.ir import quantities as q
from curvplan.modules import _linalg
from curvplan.modules._base import Module
from curvplan.modules._linalg import HIGHEST, mm, symmetrize

Spec = tuple[tuple[str, Any], ...]


# -- layout: which leaves get Kronecker factors, and their blocks ----------------------------------------
def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """The 2-D view ``(prod(shape[:-1]), shape[-1])`` of a parameter, ``None`` for scalars and vectors."""
    if len(shape) < 2:
        return None
    return (math.prod(shape[:-1]), shape[-1])


def gram_layout(shape: tuple[int, ...], block_size: int | None, max_dim: int) -> tuple | None:
    """Blocks ``(r0, r1, c0, c1)`` of a parameter's matrix view, or ``None`` for the diagonal fallback.

    The fallback covers vectors, matrices with a side of 1 and matrices with a side above ``max_dim``;
    sides above ``block_size`` are cut into blocks of at most ``block_size``.
    """
    mk = matrix_shape(tuple(shape))
    if mk is None or min(mk) == 1 or max(mk) > max_dim:
        return None
    b = block_size or max(mk)
    rows = [(i, min(i + b, mk[0])) for i in range(0, mk[0], b)]
    cols = [(j, min(j + b, mk[1])) for j in range(0, mk[1], b)]
    return tuple((r0, r1, c0, c1) for r0, r1 in rows for c0, c1 in cols)


def spec_layout(spec: Spec, shape: tuple[int, ...]) -> tuple | None:
    """`gram_layout` of a leaf under a `GradGram.spec` (None: the leaf takes the diagonal fallback)."""
    s = dict(spec)
    return gram_layout(shape, s.get("block_size"), s.get("max_dim", 4096))


def stat_dtype(x) -> Any:
    """float32 for low-precision parameters, float64 under x64."""
    return jnp.promote_types(x.dtype, jnp.float32)


def blocks_of(g: jax.Array, layout) -> list[jax.Array]:
    m = g.reshape(matrix_shape(g.shape))
    return [m[r0:r1, c0:c1] for r0, r1, c0, c1 in layout]


def assemble(blocks: list[jax.Array], layout, shape) -> jax.Array:
    """Inverse of `blocks_of`."""
    mk = matrix_shape(tuple(shape))
    out = jnp.zeros(mk, blocks[0].dtype)
    for b, (r0, r1, c0, c1) in zip(blocks, layout):
        out = out.at[r0:r1, c0:c1].set(b)
    return out.reshape(shape)


def layout_report(params, spec: Spec) -> dict[str, str]:
    """Layer key -> ``"kron 2 blocks (64x64, 64x64)"`` or ``"diagonal"``: how `GradGram` treats each leaf."""
    out = {}
    for path, p in jax.tree_util.tree_leaves_with_path(params):
        lay = spec_layout(spec, p.shape)
        if lay is None:
            out[jax.tree_util.keystr(path)] = "diagonal"
        else:
            sizes = ", ".join(f"{r1 - r0}x{c1 - c0}" for r0, r1, c0, c1 in lay)
            out[jax.tree_util.keystr(path)] = f"kron {len(lay)} block{'s' * (len(lay) > 1)} ({sizes})"
    return out


def per_leaf(fn, tree) -> tuple:
    """``fn`` of every leaf of ``tree``, as a flat tuple in leaf order.

    State kept per parameter leaf that is itself a container (a tuple of blocks, each a pair of factors) lives
    in such a tuple, never inside the parameters' own pytree: frameworks rebuild what sits inside their nodes
    (flax nnx turns a tuple held by a ``Param`` into a ``State`` dict on the next update), so a state shaped
    like ``params`` would not survive their round trip. Consumers zip it with ``jax.tree.leaves(grads)``.
    """
    return tuple(fn(x) for x in jax.tree.leaves(tree))


def count_fallback(params, spec: Spec) -> int:
    return sum(v == "diagonal" for v in layout_report(params, spec).values())


# -- the factors -----------------------------------------------------------------------------------------
def grad_gram(spec: Spec) -> q.Quantity:
    """The ``%kron.grad_gram`` quantity with the given settings (see `GradGram.spec`)."""
    return q.kron("grad_gram", **dict(spec))


class GramFactors(NamedTuple):
    """Value of ``%kron.grad_gram``.

    Attributes:
        factors: one entry per parameter leaf (in leaf order, see `per_leaf`): a tuple of ``(L, R)`` per
            block, or (fallback leaves) the diagonal statistic Σ g² (same shape as the leaf).
        count: number of updates so far (for bias corrections: ``1 - beta**count``).
    """

    factors: Any
    count: jax.Array


class GradGram(Module):
    """Per-matrix gradient Gram factors L = GGᵀ, R = GᵀG, accumulated (``beta=None``) or EMA'd; ``%kron.grad_gram``.

    Factors start at ``init_scale · I`` and are formed in float32 (float64 under x64) with
    ``precision=HIGHEST``. Give it ``every=1`` to accumulate every step (Shampoo, SOAP); without a cadence it
    runs whenever its fresh consumer (the eigendecomposition) runs (SCAO's "EMA only on curvature steps").

    Args:
        beta: EMA decay; ``None`` sums (AdaGrad-style Shampoo).
        init_scale: initial factors ``init_scale · I`` (SCAO uses 1e-4).
        block_size: cut matrix sides longer than this into blocks (Shampoo blocking).
        max_dim: a matrix with a side above this gets the diagonal statistic instead.
    """

    kind: Literal["grad_gram"] = "grad_gram"
    blockwise = True
    beta: float | None = Field(0.95, ge=0.0, lt=1.0)
    init_scale: float = Field(0.0, ge=0.0)
    block_size: int | None = Field(None, ge=1)
    max_dim: int = Field(4096, ge=1)

    @property
    def spec(self) -> Spec:
        """The quantity attributes, for consumers: ``GramEigbasis(gram=gram.spec)``."""
        return (("beta", self.beta), ("block_size", self.block_size), ("init_scale", self.init_scale),
                ("max_dim", self.max_dim))

    def consumes(self):
        return {"grad": fresh(q.grad())}

    def produces(self):
        return {"factors": grad_gram(self.spec)}

    def init(self, params, ctx) -> GramFactors:
        def leaf(p):
            lay = gram_layout(p.shape, self.block_size, self.max_dim)
            dt = stat_dtype(p)
            if lay is None:
                return jnp.zeros(p.shape, dt)
            return tuple((self.init_scale * jnp.eye(r1 - r0, dtype=dt), self.init_scale * jnp.eye(c1 - c0, dtype=dt))
                         for r0, r1, c0, c1 in lay)

        return GramFactors(per_leaf(leaf, params), jnp.zeros((), jnp.int32))

    def apply(self, inputs, state: GramFactors, ctx):
        leaves = [g.astype(stat_dtype(g)) for g in jax.tree.leaves(inputs.grad)]
        lays = [gram_layout(g.shape, self.block_size, self.max_dim) for g in leaves]
        blocks = [gb for g, lay in zip(leaves, lays) if lay is not None for gb in blocks_of(g, lay)]
        grams = iter(ctx.blocks.map(lambda gb: (symmetrize(mm(gb, gb.T)), symmetrize(mm(gb.T, gb))), blocks))
        # this step's statistics, laid out like the factors
        stats = tuple(g * g if lay is None else tuple(next(grams) for _ in lay) for g, lay in zip(leaves, lays))
        if self.beta is None:
            factors = optax.tree.add(state.factors, stats)
        else:
            factors = optax.tree.update_moment(stats, state.factors, self.beta, 1)
        new = GramFactors(factors, state.count + 1)
        return {"factors": new}, new


# -- the eigendecomposition ------------------------------------------------------------------------------
class Eigen(NamedTuple):
    """One factor's eigendecomposition: ``Q`` (columns = eigenvectors), ``lam`` descending and >= 0, and
    ``perm``: how the columns of the previous basis were reordered before this refresh (power-QR; identity
    for eigh). Consumers that keep moments in the basis permute them with it (SOAP's v)."""

    Q: jax.Array
    lam: jax.Array
    perm: jax.Array


class Eigbasis(NamedTuple):
    """Value of ``%eigbasis.grad_gram``: ``bases``, one entry per parameter leaf (`per_leaf`): a tuple of
    ``(Eigen_L, Eigen_R)`` per block, ``()`` for fallback leaves; and ``count``, the number of refreshes
    (0: never refreshed, identity)."""

    bases: Any
    count: jax.Array


def eigbasis_of(spec: Spec, method: str = "eigh") -> q.Quantity:
    """The ``%eigbasis.grad_gram`` quantity of the factors ``grad_gram(spec)`` refreshed by ``method``."""
    return q.eigbasis(grad_gram(spec), method=method, **{f"gram_{k}": v for k, v in spec})


def eigh_desc(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigenpairs of the symmetrized ``a``, eigenvalues descending and clipped at 0."""
    lam, Q = _linalg.eigh(symmetrize(a))
    return Q[:, ::-1], jnp.maximum(lam[::-1], 0.0)


def power_qr(a: jax.Array, prev: Eigen) -> Eigen:
    """SOAP's refresh: sort the previous columns by their Rayleigh quotients, then one power step + QR."""
    est = jnp.einsum("ij,ij->j", prev.Q, mm(a, prev.Q), precision=HIGHEST)
    order = jnp.argsort(-est)
    Q, _ = _linalg.qr(mm(symmetrize(a), prev.Q[:, order]))
    return Eigen(Q, jnp.maximum(est[order], 0.0), order.astype(jnp.int32))


def _identity_eigen(n: int, dtype) -> Eigen:
    return Eigen(jnp.eye(n, dtype=dtype), jnp.zeros((n,), dtype), jnp.arange(n, dtype=jnp.int32))


class GramConsumer(Module):
    """Base of modules configured by a `GradGram.spec` (``gram``): plan text omits it (the input names it)."""

    def config(self):
        return tuple((k, v) for k, v in super().config() if k != "gram")

    def _basis(self):
        """The ``%eigbasis.grad_gram`` of this module's factors refreshed by its ``method`` (SCAO: always eigh)."""
        return eigbasis_of(self.gram, getattr(self, "method", "eigh"))


class GramEigbasisState(NamedTuple):
    """``failures``: blocks whose refresh was not finite, cumulative."""

    failures: jax.Array


class GramEigbasis(GramConsumer):
    """Eigendecomposition of every factor of ``%kron.grad_gram``; produces ``%eigbasis.grad_gram`` (carried).

    ``method="eigh"``: a full symmetric eigendecomposition. ``method="power_qr"``: SOAP's cheaper refresh
    (eigh on the first refresh, then one power iteration and a QR per refresh, columns kept sorted by their
    Rayleigh quotients). Eigenvalues are descending and clipped at 0. A block whose refresh is not finite keeps
    its previous basis; ``eig_failures`` counts such blocks (cumulative).

    Args:
        gram: the settings of the factors (`GradGram.spec`).
        method: ``"eigh"`` or ``"power_qr"``.
    """

    kind: Literal["gram_eigbasis"] = "gram_eigbasis"
    blockwise = True
    gram: Spec = GradGram().spec
    method: Literal["eigh", "power_qr"] = "eigh"
    info_fields = (("eig_failures", "int"),)

    def consumes(self):
        return {"factors": fresh(grad_gram(self.gram)), "basis": carried(self._basis())}

    def produces(self):
        return {"basis": self._basis()}

    def init(self, params, ctx) -> GramEigbasisState:
        return GramEigbasisState(jnp.zeros((), jnp.int32))

    def init_carried(self, name, params, ctx):
        def leaf(p):
            lay = spec_layout(self.gram, p.shape)
            dt = stat_dtype(p)
            return () if lay is None else tuple(
                (_identity_eigen(r1 - r0, dt), _identity_eigen(c1 - c0, dt)) for r0, r1, c0, c1 in lay)

        return Eigbasis(per_leaf(leaf, params), jnp.zeros((), jnp.int32))

    def apply(self, inputs, state: GramEigbasisState, ctx):
        gram: GramFactors = inputs.factors
        prev: Eigbasis = inputs.basis
        first = prev.count == 0

        def refresh(item) -> tuple[Eigen, jax.Array]:
            a, old = item
            if self.method == "eigh":
                Q, lam = eigh_desc(a)
                new = Eigen(Q, lam, jnp.arange(a.shape[0], dtype=jnp.int32))
            else:
                # Inside ``shard_map`` both branches' permutations take the factor's per-device type (adding a
                # zero built from ``a``): a bare ``arange`` and the carried permutation may differ in it.
                zero = jnp.zeros_like(a[:, 0], dtype=jnp.int32)
                new = jax.lax.cond(first, lambda: Eigen(*eigh_desc(a), zero + jnp.arange(a.shape[0], dtype=jnp.int32)),
                                   lambda: (lambda e: e._replace(perm=e.perm + zero))(power_qr(a, old)))
            ok = jnp.all(jnp.isfinite(new.Q)) & jnp.all(jnp.isfinite(new.lam))
            return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old), (~ok).astype(jnp.int32)

        pairs = [(fac, old) for fac, old in zip(gram.factors, prev.bases) if isinstance(fac, tuple)]
        items = [(a, e) for fac, old in pairs for (L, R), (eL, eR) in zip(fac, old) for a, e in ((L, eL), (R, eR))]
        done = iter(ctx.blocks.map(refresh, items))
        bases = tuple(
            () if not isinstance(fac, tuple) else tuple((next(done), next(done)) for _ in fac)
            for fac in gram.factors
        )
        n_failed = sum((f for blk in bases for pair in blk for _, f in pair), jnp.zeros((), jnp.int32))
        bases = tuple(tuple((eL, eR) for (eL, _), (eR, _) in blk) for blk in bases)
        state = GramEigbasisState(state.failures + n_failed)
        return {"basis": Eigbasis(bases, prev.count + 1)}, state, {"eig_failures": state.failures}

