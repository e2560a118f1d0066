"""Layer discovery and capture (DESIGN.md §7): find the dense / conv / embedding layers of any loss function by
reading its jaxpr, then compute loss, gradient, layer inputs and output cotangents in one backward pass.

Discovery follows each parameter leaf through layout-only ops (reshape, transpose, dtype casts, broadcasts) to
its uses. A leaf whose single use is the weight operand of ``dot_general`` / ``conv_general_dilated`` / a row
``gather`` is a layer; a leaf added once to a layer's output is its bias. Anything else (used twice, used
elementwise, inside ``while`` / ``cond``) is listed in ``report.skipped`` with the reason, so that consumers
fall back to a diagonal block for it instead of mis-handling it.

Inside ``scan`` (and ``fori_loop`` with a static trip count) a weight is either a loop constant, the same matrix
on every iteration (an RNN cell: its rows are the iterations' rows concatenated, as a convolution's are its
positions), or scanned over, one slice per iteration (stacked layers, ``nn.scan`` / ``eqx`` scan-over-layers):
then the layer is a *stack* of ``stack`` matrices, its index, activations and cotangents gain a leading stack
axis, and each slice is its own layer to the consumers. Batch dimensions of a ``dot_general`` (per-head weights
applied to per-head inputs, ``nhtd,hde->nhte``, or ``vmap`` over (weights, inputs) pairs) stack the same way.

>>> import jax, jax.numpy as jnp
>>> params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4), "scale": jnp.ones(4)}
>>> loss = lambda p, x: jnp.sum((x @ p["w"] + p["b"]) * p["scale"])
>>> report = discover_layers(loss, params, jnp.ones((2, 3)))
>>> print(report)
layer   kind   shape   d_in  d_out  bias
['w']   dense  (3, 4)  3     4      ['b']
skipped: ['scale'] (unknown use: mul)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore
from jax.extend.core import primitives as P

from curvplan.ir._errors import LoweringError

LayerKind = Literal["dense", "conv", "embedding"]
_TAGS = ("dense", "conv", "embedding", "skip")
# Primitives are matched as objects, never by name: names change between JAX releases (``call`` printed as
# ``eval_jaxpr`` from 0.12), the objects in `jax.extend.core.primitives` are the public handle.
# ops that only move or cast the elements of a parameter (followed, not counted as uses)
_LAYOUT = {P.reshape_p, P.transpose_p, P.convert_element_type_p, P.copy_p, P.squeeze_p, P.broadcast_in_dim_p}
# calls whose one sub-jaxpr takes the equation's operands and returns its results (jit, checkpoint, custom rules)
_CALLS = {P.jit_p, P.call_p, P.closed_call_p, P.remat_p, P.custom_jvp_call_p, P.custom_vjp_call_p}
_SCAN = P.scan_p


@dataclasses.dataclass(frozen=True, eq=False)
class Layer:
    """A discovered layer.

    Attributes:
        key: ``jax.tree_util.keystr`` of the weight leaf.
        kind: ``dense``, ``conv`` or ``embedding``.
        shape: the weight leaf's shape.
        d_in, d_out: the layer as a (d_in, d_out) matrix W with outputs = inputs @ W (conv: im2col patches).
        bias: key of the bias leaf added to the layer's output, or None.
        index: int array (d_in, d_out): W[i, j] = weight.ravel()[index[i, j]].
        bias_index: int array (d_out,): the bias entry of output feature j, or None.
        path: where the op sits in the jaxpr (equation indices, outer to inner).
        out_shape: shape of the op's output (the perturbation added to it).
        operand: which input of the op is the weight.
        loops: the enclosing ``scan`` levels, outer to inner, as (length, the weight is scanned over).
        heads: matrices along the dot's batch dimensions (per-head weights, vmapped stacks); 0 if none.
    """

    key: str
    kind: LayerKind
    shape: tuple[int, ...]
    d_in: int
    d_out: int
    bias: str | None
    index: np.ndarray
    bias_index: np.ndarray | None
    path: tuple[int, ...]
    out_shape: tuple[int, ...]
    operand: int = 1
    loops: tuple[tuple[int, bool], ...] = ()
    heads: int = 0

    @property
    def stack(self) -> int:
        """Number of stacked matrices (scanned-over loop lengths times heads); 0 for a single matrix."""
        sizes = [n for n, scanned in self.loops if scanned] + ([self.heads] if self.heads else [])
        return int(np.prod(sizes)) if sizes else 0

    def to_matrix(self, kernel: jax.Array) -> jax.Array:
        """The weight leaf (or its gradient) as the (d_in, d_out) matrix ((stack, d_in, d_out) if stacked)."""
        return kernel.reshape(-1)[self.index]

    def from_matrix(self, mat: jax.Array) -> jax.Array:
        """Inverse of `to_matrix`: a (d_in, d_out) matrix back in the leaf's shape."""
        flat = jnp.zeros(int(np.prod(self.shape)), mat.dtype).at[self.index.reshape(-1)].set(mat.reshape(-1))
        return flat.reshape(self.shape)


@dataclasses.dataclass(frozen=True, eq=False)
class LayerReport:
    """What `discover_layers` found: ``layers`` (weight key -> `Layer`) and ``skipped`` (leaf key -> reason).

    Bias leaves appear as ``layer.bias``; every other floating leaf is in ``layers`` or ``skipped``.
    """

    layers: Mapping[str, Layer]
    skipped: Mapping[str, str]

    def __str__(self) -> str:
        rows = [("layer", "kind", "shape", "d_in", "d_out", "bias")]
        rows += [(k, l.kind + (f"×{l.stack}" if l.stack else ""), str(l.shape), str(l.d_in), str(l.d_out),
                  l.bias or "-") for k, l in self.layers.items()]
        widths = [max(len(r[i]) for r in rows) for i in range(6)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        if self.skipped:
            lines.append("skipped: " + ", ".join(f"{k} ({why})" for k, why in self.skipped.items()))
        return "\n".join(lines)


# -- analysis -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Origin:
    leaf: int
    idx: np.ndarray  # flat positions in the leaf: (one axis per scanned-over loop level) + the var's shape
    loops: tuple[tuple[int, bool], ...] = ()  # enclosing scan levels: (length, scanned over)

    @property
    def lead(self) -> int:
        return sum(scanned for _, scanned in self.loops)

    def moved(self, idx: np.ndarray) -> "_Origin":
        return _Origin(self.leaf, idx, self.loops)


@dataclasses.dataclass
class _Use:
    kind: str  # dense / conv / embedding / bias / unknown reason
    path: tuple[int, ...] = ()
    eqn: Any = None
    operand: int = 0  # which invar is the parameter
    idx: np.ndarray | None = None
    feat: np.ndarray | None = None  # bias: output feature of each element
    layer_path: tuple[int, ...] = ()
    loops: tuple[tuple[int, bool], ...] = ()


def _sub_jaxpr(eqn) -> tuple[Any, list] | None:
    """(jaxpr, consts) of a call-like equation whose sub-jaxpr invars/outvars match the eqn's 1-1."""
    if eqn.primitive not in _CALLS:
        return None
    return _param_jaxpr(eqn)


def _param_jaxpr(eqn) -> tuple[Any, list] | None:
    """(jaxpr, consts) of the one sub-jaxpr among an equation's parameters, found by type, not by name."""
    for sub in eqn.params.values():
        if isinstance(sub, jcore.ClosedJaxpr):
            return sub.jaxpr, list(sub.consts)
        if isinstance(sub, jcore.Jaxpr):
            return sub, []
    return None


def _layout(eqn, idx: np.ndarray, lead: int) -> np.ndarray:
    """``idx`` (``lead`` stack axes + the input's shape) moved as the op moves the input's elements."""
    p, prim = eqn.params, eqn.primitive
    stack, shape = idx.shape[:lead], tuple(eqn.outvars[0].aval.shape)
    if prim is P.transpose_p:
        return idx.transpose(tuple(range(lead)) + tuple(lead + d for d in p["permutation"]))
    if prim is P.broadcast_in_dim_p:
        expanded = np.ones(len(shape), int)
        for src, dst in enumerate(p["broadcast_dimensions"]):
            expanded[dst] = idx.shape[lead + src]
        return np.broadcast_to(idx.reshape(stack + tuple(expanded)), stack + shape)
    return idx.reshape(stack + shape)  # reshape / squeeze / expand_dims / casts


def _stacked_matrix(idx: np.ndarray, lead: int, rows: list[int], cols: list[int]) -> np.ndarray:
    """``idx`` as (d_in, d_out) from the var axes ``rows`` and ``cols``, after one flat stack axis if ``lead``."""
    d_in = int(np.prod([idx.shape[lead + d] for d in rows]))
    d_out = int(np.prod([idx.shape[lead + d] for d in cols]))
    perm = tuple(range(lead)) + tuple(lead + d for d in list(rows) + list(cols))
    mat = idx.transpose(perm)
    return mat.reshape((-1, d_in, d_out) if lead else (d_in, d_out))


def _dense_index(eqn, k: int, o: _Origin) -> np.ndarray:
    """The index matrix of a dot_general whose operand k is the weight. Batch dimensions of the dot (a weight
    with one matrix per head / ensemble member, or vmapped over stacked parameters) are stack axes, after the
    scan ones."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    kc, kb = (lc, rc)[k], (lb, rb)[k]
    kfree = [d for d in range(o.idx.ndim - o.lead) if d not in kc and d not in kb]
    if not kb:
        return _stacked_matrix(o.idx, o.lead, list(kc), kfree)
    idx = o.idx.transpose(tuple(range(o.lead)) + tuple(o.lead + d for d in list(kb) + list(kc) + kfree))
    stack = o.idx.shape[:o.lead] + tuple(o.idx.shape[o.lead + d] for d in kb)
    return _stacked_matrix(idx.reshape((int(np.prod(stack)),) + idx.shape[len(stack):]), 1,
                           list(range(len(kc))), list(range(len(kc), len(kc) + len(kfree))))


def _scan_body(eqn):
    """(body jaxpr, consts, num_consts, num_carry) of a ``scan`` equation, else None.

    The split of the operands is read off the avals, not the equation's parameters (whose names change
    between JAX releases): the body maps (consts, carry, x) to (carry, y), and a scanned-over operand or a
    stacked output has one more axis than its body variable, while consts and carries keep their rank."""
    if eqn.primitive is not _SCAN:
        return None
    body_jaxpr, body_consts = _param_jaxpr(eqn)
    same = [w.aval.ndim == v.aval.ndim for w, v in zip(eqn.outvars, body_jaxpr.outvars)]
    num_carry = same.index(False) if False in same else len(same)
    same_in = [w.aval.ndim == v.aval.ndim for w, v in zip(eqn.invars, body_jaxpr.invars)]
    num_consts = (same_in.index(False) if False in same_in else len(same_in)) - num_carry
    return body_jaxpr, body_consts, num_consts, num_carry


def _analyze(jaxpr, origins: dict, uses: dict, outs: dict, path: tuple[int, ...]) -> None:
    """Walks ``jaxpr`` recording parameter uses; ``origins`` maps vars to parameter provenance, ``outs`` maps
    layer output vars to (layer path, output feature array)."""

    def use(leaf, u):
        uses.setdefault(leaf, []).append(u)

    for i, eqn in enumerate(jaxpr.eqns):
        here = path + (i,)
        prim, name = eqn.primitive, eqn.primitive.name
        for v in eqn.outvars:  # a sub-jaxpr shared by two calls is walked twice: forget the first walk
            origins.pop(v, None)
            outs.pop(v, None)
        ins = [origins.get(v) if isinstance(v, jcore.Var) else None for v in eqn.invars]
        sub = _sub_jaxpr(eqn)
        if sub is not None:
            inner, _ = sub
            off = len(inner.invars) - len(eqn.invars)
            for v, o, w in zip(inner.invars[off:], ins, eqn.invars):
                origins.pop(v, None)
                outs.pop(v, None)
                if o is not None:
                    origins[v] = o
                if isinstance(w, jcore.Var) and w in outs:
                    outs[v] = outs[w]
            _analyze(inner, origins, uses, outs, here)
            for v, w in zip(eqn.outvars, inner.outvars):
                if isinstance(w, jcore.Var) and w in origins:
                    origins[v] = origins[w]
                if isinstance(w, jcore.Var) and w in outs:
                    outs[v] = outs[w]
            continue
        scan = _scan_body(eqn)
        if scan is not None:
            body, _, nc, nk = scan
            length = int(eqn.params["length"])
            for j, (v, o) in enumerate(zip(body.invars, ins)):
                origins.pop(v, None)
                outs.pop(v, None)
                if o is None:
                    continue
                if nc <= j < nc + nk:
                    use(o.leaf, _Use("unknown use: carried through scan"))
                else:  # a loop constant is the same weight every iteration; a scanned-over one is sliced
                    origins[v] = _Origin(o.leaf, o.idx, o.loops + ((length, j >= nc + nk),))
            _analyze(body, origins, uses, outs, here)
            continue
        params_in = [(j, o) for j, o in enumerate(ins) if o is not None]
        if prim in _LAYOUT and len(eqn.invars) == 1:
            if ins[0] is not None:
                origins[eqn.outvars[0]] = ins[0].moved(_layout(eqn, ins[0].idx, ins[0].lead))
            elif isinstance(eqn.invars[0], jcore.Var) and eqn.invars[0] in outs:
                lp, feat = outs[eqn.invars[0]]
                outs[eqn.outvars[0]] = (lp, _layout(eqn, feat, 0))
            continue
        if not params_in:
            carried_outs = [v for v in eqn.invars if isinstance(v, jcore.Var) and v in outs]
            if prim in (P.add_p, P.sub_p) and len(carried_outs) == 1 and (
                    eqn.outvars[0].aval.shape == carried_outs[0].aval.shape):  # a residual added to a layer output
                outs[eqn.outvars[0]] = outs[carried_outs[0]]
            continue
        if prim is P.dot_general_p and len(params_in) == 1:
            k, o = params_in[0]
            use(o.leaf, _Use("dense", here, eqn, k, _dense_index(eqn, k, o), loops=o.loops))
            if not eqn.params["dimension_numbers"][1][k]:  # a per-head bias is not followed (reported instead)
                outs[eqn.outvars[0]] = (here, _dense_feat(eqn, k))
        elif prim is P.conv_general_dilated_p and [j for j, _ in params_in] == [1]:
            o = ins[1]
            p = eqn.params
            if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
                use(o.leaf, _Use("unknown use: grouped convolution"))
                continue
            rhs = p["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
            mat = _stacked_matrix(o.idx, o.lead, [rhs[1], *rhs[2:]], [rhs[0]])
            use(o.leaf, _Use("conv", here, eqn, 1, mat, loops=o.loops))
            outs[eqn.outvars[0]] = (here, _conv_feat(eqn))
        elif prim is P.gather_p and [j for j, _ in params_in] == [0] and _is_row_gather(eqn, ins[0]):
            o = ins[0]
            use(o.leaf, _Use("embedding", here, eqn, 0, _stacked_matrix(o.idx, o.lead, [0], [1]), loops=o.loops))
            outs[eqn.outvars[0]] = (here, np.broadcast_to(np.arange(o.idx.shape[-1]), eqn.outvars[0].aval.shape))
        elif prim is P.add_p and len(params_in) == 1 and any(
            isinstance(v, jcore.Var) and v in outs for v in eqn.invars
        ):
            k, o = params_in[0]
            other = eqn.invars[1 - k]
            lp, feat = outs[other]
            stack, own = o.idx.shape[:o.lead], o.idx.shape[o.lead:]
            try:
                lifted = o.idx.reshape(stack + (1,) * (feat.ndim - len(own)) + own)
                bidx = np.broadcast_to(lifted, stack + feat.shape)
            except ValueError:
                use(o.leaf, _Use("unknown use: add with broadcasting"))
                continue
            use(o.leaf, _Use("bias", here, eqn, k, bidx.reshape((-1,) + feat.shape) if o.lead else bidx, feat, lp,
                             o.loops))
        else:
            why = f"used inside {name}" if prim in (P.while_p, P.cond_p) else f"unknown use: {name}"
            for _, o in params_in:
                use(o.leaf, _Use(why))


def _dense_feat(eqn, k: int) -> np.ndarray:
    """Output feature index of every element of a dot_general output (weight operand k)."""
    (lc, rc), _ = eqn.params["dimension_numbers"]
    shapes = [v.aval.shape for v in eqn.invars]
    kfree = [shapes[k][d] for d in range(len(shapes[k])) if d not in (lc, rc)[k]]
    xfree = [shapes[1 - k][d] for d in range(len(shapes[1 - k])) if d not in (lc, rc)[1 - k]]
    feat = np.arange(int(np.prod(kfree))).reshape(kfree)
    if k == 1:  # output dims: x free, then weight free
        return np.broadcast_to(feat, tuple(xfree) + tuple(kfree))
    return np.broadcast_to(feat.reshape(tuple(kfree) + (1,) * len(xfree)), tuple(kfree) + tuple(xfree))


def _conv_feat(eqn) -> np.ndarray:
    out = eqn.params["dimension_numbers"].out_spec
    shape = eqn.outvars[0].aval.shape
    ones = [1] * len(shape)
    ones[out[1]] = shape[out[1]]
    return np.broadcast_to(np.arange(shape[out[1]]).reshape(ones), shape)


def _is_row_gather(eqn, o: _Origin) -> bool:
    dn, idx = eqn.params["dimension_numbers"], o.idx[(0,) * o.lead]
    return (idx.ndim == 2 and tuple(dn.collapsed_slice_dims) == (0,) and tuple(dn.start_index_map) == (0,)
            and tuple(eqn.params["slice_sizes"]) == (1, idx.shape[1])
            and tuple(dn.offset_dims) == (eqn.outvars[0].aval.ndim - 1,))


def discover_layers(fn: Callable, params: Any, *args: Any, tags: Mapping[str, str] | None = None) -> LayerReport:
    """Finds the layers of ``fn(params, *args)`` by tracing it to a jaxpr (nothing is computed).

    Args:
        fn: any function of the parameters (a loss or a model).
        params: the parameter pytree (arrays or shape-dtype structs).
        *args: the other arguments of ``fn`` (e.g. the batch).
        tags: optional overrides, leaf key -> ``"skip"`` (treat as not a layer) or the expected kind
            (``"dense"``, ``"conv"``, ``"embedding"``; a mismatch raises `LoweringError`).

    Returns:
        A `LayerReport`.
    """
    tags = dict(tags or {})
    for key, tag in tags.items():
        if tag not in _TAGS:
            raise LoweringError(f"unknown layer tag {tag!r} for {key}", where="discover_layers(tags=...)",
                                fix=f"use one of {_TAGS}")
    closed = jax.make_jaxpr(fn)(params, *args)
    paths, _ = jax.tree_util.tree_flatten_with_path(params)
    keys = [jax.tree_util.keystr(p) for p, _ in paths]
    unknown = sorted(set(tags) - set(keys))
    if unknown:
        raise LoweringError(f"tags name leaves that are not in params: {unknown}", where="discover_layers(tags=...)",
                            fix=f"use keys as `jax.tree_util.keystr` prints them, e.g. {keys[:3]}")
    origins = {}
    for i, (v, (_, leaf)) in enumerate(zip(closed.jaxpr.invars, paths)):
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            origins[v] = _Origin(i, np.arange(int(np.prod(np.shape(leaf))), dtype=np.int64).reshape(np.shape(leaf)))
    uses: dict[int, list[_Use]] = {}
    _analyze(closed.jaxpr, origins, uses, {}, ())
    layers, skipped, biases = {}, {}, {}
    for leaf in sorted({o.leaf for o in origins.values()}):
        key, us = keys[leaf], uses.get(leaf, [])
        if tags.get(key) == "skip":
            skipped[key] = "tagged skip"
        elif not us:
            skipped[key] = "unused"
        elif len(us) > 1:
            skipped[key] = f"used {len(us)} times ({', '.join(sorted({u.kind for u in us}))})"
        elif us[0].kind == "bias":
            biases[leaf] = us[0]
        elif us[0].kind in ("dense", "conv", "embedding"):
            u = us[0]
            if len(np.unique(u.idx)) != u.idx.size or u.idx.size != np.prod(np.shape(paths[leaf][1])):
                skipped[key] = f"{u.kind} weight is not a permutation of the leaf (sliced or broadcast)"
                continue
            if tags.get(key, u.kind) != u.kind:
                raise LoweringError(f"{key} is tagged {tags[key]!r} but is used as a {u.kind} layer",
                                    where=f"discover_layers, leaf {key}", fix=f"tag it {u.kind!r} or 'skip'")
            heads = _heads(u.eqn, u.operand) if u.kind == "dense" else 0
            layers[key] = Layer(key, u.kind, tuple(np.shape(paths[leaf][1])), u.idx.shape[-2], u.idx.shape[-1], None,
                                u.idx, None, u.path, tuple(u.eqn.outvars[0].aval.shape), u.operand, u.loops, heads)
        else:
            skipped[key] = us[0].kind
    by_path = {l.path: k for k, l in layers.items()}
    for leaf, u in biases.items():
        key, owner = keys[leaf], by_path.get(u.layer_path)
        ok = owner and [sc for _, sc in u.loops] == [sc for _, sc in layers[owner].loops]
        bias_index = _bias_index(u, layers[owner].d_out, layers[owner].stack) if ok else None
        if tags.get(key) == "skip":
            skipped[key] = "tagged skip"
        elif bias_index is None or layers[owner].bias is not None:
            skipped[key] = "added to a layer output in a way that is not a per-feature bias"
        else:
            layers[owner] = dataclasses.replace(layers[owner], bias=key, bias_index=bias_index)
    for key, tag in tags.items():
        if tag != "skip" and key not in layers:
            raise LoweringError(f"{key} is tagged {tag!r} but discovery found no such layer "
                                f"({skipped.get(key, 'it is a bias')})", where=f"discover_layers, leaf {key}",
                                fix="check the key, or tag it 'skip'")
    return LayerReport(dict(sorted(layers.items())), dict(sorted(skipped.items())))


def _heads(eqn, k: int) -> int:
    kb = eqn.params["dimension_numbers"][1][k]
    return int(np.prod([eqn.invars[k].aval.shape[d] for d in kb])) if kb else 0


def _bias_index(u: _Use, d_out: int, stack: int) -> np.ndarray | None:
    """The bias entry of each output feature ((stack, d_out) if stacked), or None if it is not a bias."""
    n = max(stack, 1)
    out = np.full((n, d_out), -1, np.int64)
    feat, idx = u.feat.reshape(-1), u.idx.reshape(n, -1)
    out[:, feat] = idx
    if (out < 0).any() or not np.array_equal(out[:, feat], idx) or len(np.unique(out)) != out.size or (
            idx.max() >= out.size):
        return None
    return out if stack else out[0]


# -- capture --------------------------------------------------------------------------------------------
def _read(env, v):
    return v.val if isinstance(v, jcore.Literal) else env[v]


def _layer_values(layer: Layer, eqn, invals, out) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
    """(activations (N, d_in), map from output-shaped cotangent to (N, d_out))."""
    if layer.kind == "dense":
        k = layer.operand
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        x, xc, xb = invals[1 - k], (lc, rc)[1 - k], list((lb, rb)[1 - k])
        xfree = [d for d in range(x.ndim) if d not in xc and d not in xb]
        lead = (layer.heads, -1) if layer.heads else (-1,)
        acts = jnp.transpose(x, xb + xfree + list(xc)).reshape(lead + (layer.d_in,))
        nb, nx = len(xb), len(xfree)  # output dims: batch, then lhs free, then rhs free
        perm = list(range(out.ndim)) if k == 1 else (
            list(range(nb)) + list(range(out.ndim - nx, out.ndim)) + list(range(nb, out.ndim - nx)))
        return acts, lambda c: jnp.transpose(c, perm).reshape(lead + (layer.d_out,))
    if layer.kind == "conv":
        p = eqn.params
        dn = p["dimension_numbers"]
        x = jnp.transpose(invals[0], dn.lhs_spec)  # (N, C, spatial...)
        rhs = dn.rhs_spec
        patches = jax.lax.conv_general_dilated_patches(
            x, tuple(invals[1].shape[d] for d in rhs[2:]), p["window_strides"], p["padding"],
            lhs_dilation=p["lhs_dilation"], rhs_dilation=p["rhs_dilation"], precision=jax.lax.Precision.HIGHEST)
        nd = patches.ndim
        acts = jnp.transpose(patches, (0,) + tuple(range(2, nd)) + (1,)).reshape(-1, layer.d_in)
        operm = (dn.out_spec[0],) + tuple(dn.out_spec[2:]) + (dn.out_spec[1],)
        return acts, lambda c: jnp.transpose(c, operm).reshape(-1, layer.d_out)
    ids = invals[1][..., 0].reshape(-1)  # embedding: one-hot rows
    acts = jax.nn.one_hot(ids, layer.d_in, dtype=out.dtype)
    return acts, lambda c: c.reshape(-1, layer.d_out)


def _bind(eqn, invals):
    with eqn.ctx.manager:
        return eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))


def _eval(jaxpr, consts, args, layers: dict, perts: dict, acts: dict, path: tuple[int, ...], depth: int = 0):
    env = {}
    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    prefixes = {p[: len(path) + 1] for p in layers}
    for i, eqn in enumerate(jaxpr.eqns):
        here = path + (i,)
        invals = [_read(env, v) for v in eqn.invars]
        if here in layers:
            key, layer = layers[here]
            out = _bind(eqn, invals)
            a, to_rows = _layer_values(layer, eqn, invals, out)
            acts[key] = (a, to_rows)
            outs = [out + perts[key]]
        elif here in prefixes and _sub_jaxpr(eqn) is not None:
            inner, inner_consts = _sub_jaxpr(eqn)
            off = len(inner.invars) - len(invals)
            outs = _eval(inner, inner_consts, [None] * off + invals, layers, perts, acts, here, depth)
        elif here in prefixes and _scan_body(eqn) is not None:
            outs = _eval_scan(eqn, invals, layers, perts, acts, here, depth)
        else:
            outs = _bind(eqn, invals)
            outs = outs if eqn.primitive.multiple_results else [outs]
        for v, x in zip(eqn.outvars, outs):
            env[v] = x
    return [_read(env, v) for v in jaxpr.outvars]


def _merge_loop(x: jax.Array, scanned: bool) -> jax.Array:
    """Rows gathered over one scan level, (T, [S,] N, d): a loop constant's iterations become more rows
    (([S,] T·N, d)); a scanned-over weight's become more stack entries ((T·S, N, d))."""
    if scanned:
        return x if x.ndim == 3 else x.reshape((-1,) + x.shape[2:])
    if x.ndim == 3:
        return x.reshape(-1, x.shape[-1])
    return jnp.swapaxes(x, 0, 1).reshape(x.shape[1], -1, x.shape[-1])


def _eval_scan(eqn, invals, layers: dict, perts: dict, acts: dict, here: tuple[int, ...], depth: int):
    """A ``scan`` equation that holds layers: its body evaluated by `_eval` under `jax.lax.scan`, each layer's
    perturbation scanned over and its activations stacked, then merged per `_merge_loop`."""
    body, body_consts, nc, nk = _scan_body(eqn)
    inside = {key: layer for path, (key, layer) in layers.items() if path[: len(here)] == here and len(path) > len(here)}
    consts, init, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]
    to_rows: dict[str, Callable] = {}

    def step(carry, x):
        x_vals, pert = x
        inner: dict = {}
        outs = _eval(body, body_consts, list(consts) + list(carry) + list(x_vals), layers, pert, inner, here,
                     depth + 1)
        to_rows.update({k: f for k, (_, f) in inner.items()})
        return outs[:nk], (outs[nk:], {k: a for k, (a, _) in inner.items()})

    p = eqn.params
    carry, (ys, stacked) = jax.lax.scan(step, list(init), (list(xs), {k: perts[k] for k in inside}),
                                        length=p["length"], reverse=p["reverse"], unroll=p["unroll"])
    for key, layer in inside.items():
        scanned = layer.loops[depth][1]
        acts[key] = (_merge_loop(stacked[key], scanned),
                     lambda c, f=to_rows[key], sc=scanned: _merge_loop(jax.vmap(f)(c), sc))
    return list(carry) + list(ys)


def capture(fn: Callable, report: LayerReport, params: Any, *args: Any):
    """Loss, gradient, layer inputs and output cotangents of ``fn(params, *args)`` in one backward pass.

    Zero perturbations are added to the output of every layer in ``report``; differentiating with respect to
    them gives the output cotangents.

    Returns:
        ``(loss, grad, activations, out_cotangents)`` with activations ``{key: (N, d_in)}`` and out_cotangents
        ``{key: (N, d_out)}`` (``acts.T @ cots`` is the weight gradient as a (d_in, d_out) matrix); a stacked
        layer's have a leading stack axis, ``(stack, N, d)``.
    """
    closed = jax.make_jaxpr(fn)(params, *args)
    located = _locate(report)
    flat_args = jax.tree.leaves((params,) + args)
    n_params = len(jax.tree.leaves(params))
    _, treedef = jax.tree.flatten(params)
    perts = {layer.key: jnp.zeros(tuple(n for n, _ in layer.loops) + layer.out_shape,
                                  _eqn_at(closed.jaxpr, layer.path).outvars[0].aval.dtype)
             for layer in report.layers.values()}

    def run(p_leaves, perts):
        acts = {}
        (out,) = _eval(closed.jaxpr, closed.consts, list(p_leaves) + flat_args[n_params:], located, perts, acts, ())
        return out, acts

    (loss, acts), (g_leaves, cots) = jax.value_and_grad(run, argnums=(0, 1), has_aux=True)(
        flat_args[:n_params], perts)
    grad = jax.tree.unflatten(treedef, g_leaves)
    activations = {k: a for k, (a, _) in acts.items()}
    out_cotangents = {k: acts[k][1](cots[k]) for k in acts}
    return loss, grad, activations, out_cotangents


def _eqn_at(jaxpr, path):
    eqn = None
    for i in path:
        if eqn is not None:
            jaxpr = (_sub_jaxpr(eqn) or _scan_body(eqn))[0]
        eqn = jaxpr.eqns[i]
    return eqn


def _locate(report: LayerReport) -> dict:
    return {layer.path: (layer.key, layer) for layer in report.layers.values()}


@jax.tree_util.register_pytree_node_class
class LayerArrays(dict):
    """A dict layer key -> array that also carries the `LayerReport` it was captured with (``.report``) and, for
    output cotangents, the number of loss terms the loss averages (``.terms``; None if unknown). Rows are
    examples × positions (conv locations, sequence tokens, loop iterations); terms are what the loss averages.

    >>> LayerArrays({"w": 1}, LayerReport({}, {})).report.skipped
    {}
    """

    def __init__(self, arrays: Mapping[str, Any], report: LayerReport, terms: int | None = None):
        super().__init__(arrays)
        self.report = report
        self.terms = terms

    def tree_flatten(self):
        keys = tuple(sorted(self))
        return tuple(self[k] for k in keys), (keys, self.report, self.terms)

    @classmethod
    def tree_unflatten(cls, aux, values):
        keys, report, terms = aux
        return cls(dict(zip(keys, values)), report, terms)
