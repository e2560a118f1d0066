"""Layer discovery and capture (docs/architecture.md, "Layer discovery"): find the dense / conv / embedding
layers of any loss function by reading its jaxpr, then compute loss, gradient, layer inputs and output
cotangents in one backward pass.

Discovery follows each parameter leaf through layout-only ops (reshape, transpose, dtype casts, broadcasts) to
its uses, one rule per primitive (`RULES`, keyed by the objects of `jax.extend.core.primitives`, never by name),
entering calls (``jit``, ``checkpoint``, custom derivative rules) and ``scan`` bodies. A leaf whose single use is
the weight operand of ``dot_general`` / ``conv_general_dilated`` / a row ``gather`` is a layer; a leaf added
once to a layer's output is its bias. Anything else (used twice, used elementwise, inside ``while`` / ``cond``)
is listed in ``report.skipped`` with the reason, so that consumers fall back to a diagonal block for it instead
of mis-handling it.

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
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore
from jax.extend.core import primitives as P

from curvplan.ir._errors import LoweringError

LayerKind = Literal["dense", "conv", "embedding"]
_TAGS = ("dense", "conv", "embedding", "skip")


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

    def moved(self, idx: np.ndarray) -> _Origin:
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


def _sub(eqn) -> tuple[Any, list] | None:
    """(jaxpr, consts) of the one sub-jaxpr of a call or ``scan`` equation, if its inputs and outputs match the
    equation's one to one; else None."""
    subs = list(jcore.jaxprs_in_params(eqn.params))
    if len(subs) != 1 or len(subs[0].invars) != len(eqn.invars) or len(subs[0].outvars) != len(eqn.outvars):
        return None
    jaxpr = subs[0]
    consts = getattr(jaxpr, "consts", None)  # JAX 0.12 keeps a jaxpr's constants on it
    if consts is None:  # before: on the ClosedJaxpr parameter that `jaxprs_in_params` unwrapped
        consts = next((p.consts for p in eqn.params.values() if isinstance(p, jcore.ClosedJaxpr) and p.jaxpr is jaxpr),
                      [])
    return jaxpr, list(consts)


def _scan_body(eqn) -> tuple[Any, list, int, int]:
    """(body jaxpr, consts, num_consts, num_carry) of a ``scan`` equation.

    The split of the operands is read off the avals, not the equation's parameters (whose names change
    between JAX releases): the body maps (consts, carry, x) to (carry, y), and a scanned-over operand or a
    stacked output has one more axis than its body variable, while consts and carries keep their rank."""
    body_jaxpr, body_consts = _sub(eqn)
    same = [w.aval.ndim == v.aval.ndim for w, v in zip(eqn.outvars, body_jaxpr.outvars)]
    num_carry = same.index(False) if False in same else len(same)
    same_in = [w.aval.ndim == v.aval.ndim for w, v in zip(eqn.invars, body_jaxpr.invars)]
    num_consts = (same_in.index(False) if False in same_in else len(same_in)) - num_carry
    return body_jaxpr, body_consts, num_consts, num_carry


def _moved(eqn, idx: np.ndarray, lead: int) -> np.ndarray:
    """``idx`` (``lead`` stack axes + the input's shape) moved as the layout op moves the input's elements."""
    p, prim = eqn.params, eqn.primitive
    stack, shape = idx.shape[:lead], tuple(eqn.outvars[0].aval.shape)
    if prim is P.transpose_p:
        return idx.transpose(tuple(range(lead)) + tuple(lead + d for d in p["permutation"]))
    if prim is P.broadcast_in_dim_p:
        expanded = np.ones(len(shape), int)
        for src, dst in enumerate(p["broadcast_dimensions"]):
            expanded[dst] = idx.shape[lead + src]
        return np.broadcast_to(idx.reshape(stack + tuple(expanded)), stack + shape)
    return idx.reshape(stack + shape)  # reshape / squeeze / casts / names


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


@dataclasses.dataclass
class _Walk:
    """One discovery walk: ``origins`` maps vars holding parameter elements to their `_Origin`, ``uses`` maps
    leaves to their `_Use` list, ``outs`` maps layer output vars to (layer path, output feature of each
    element)."""

    origins: dict
    uses: dict = dataclasses.field(default_factory=dict)
    outs: dict = dataclasses.field(default_factory=dict)

    def walk(self, jaxpr, path: tuple[int, ...]) -> None:
        for i, eqn in enumerate(jaxpr.eqns):
            for v in eqn.outvars:  # a sub-jaxpr shared by two calls is walked twice: forget the first walk
                self.forget(v)
            ins = [self.origins.get(v) if isinstance(v, jcore.Var) else None for v in eqn.invars]
            RULES.get(eqn.primitive, _unknown)(self, eqn, path + (i,), ins)

    def forget(self, v) -> None:
        self.origins.pop(v, None)
        self.outs.pop(v, None)

    def out(self, v) -> tuple[tuple[int, ...], np.ndarray] | None:
        return self.outs.get(v) if isinstance(v, jcore.Var) else None

    def use(self, o: _Origin, kind: str, **kw) -> None:
        self.uses.setdefault(o.leaf, []).append(_Use(kind, loops=o.loops, **kw))


# -- the rule table: what each primitive makes of the parameter elements it reads ---------------------------
Rule = Callable[[_Walk, Any, tuple[int, ...], list], None]
"""``rule(walk, eqn, path, ins)``: ``ins`` holds the `_Origin` of each operand, None where it holds no parameter."""
RULES: dict[jcore.Primitive, Rule] = {}


def _rule(*prims: jcore.Primitive) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        RULES.update(dict.fromkeys(prims, fn))
        return fn
    return register


def _unknown(w: _Walk, eqn, here, ins, why: str | None = None) -> None:
    """Any primitive without a rule: each parameter operand is a use that is not a layer."""
    for o in ins:
        if o is not None:
            w.use(o, why or f"unknown use: {eqn.primitive.name}")


@_rule(P.reshape_p, P.transpose_p, P.squeeze_p, P.broadcast_in_dim_p, P.convert_element_type_p, P.copy_p, P.name_p)
def _layout(w: _Walk, eqn, here, ins) -> None:
    """Layout only (reshape, transpose, squeeze, broadcast, dtype cast, copy, `checkpoint_name`), one operand:
    the output holds the operand's elements moved, so a parameter's index map, or a layer output's feature
    map, is moved with them; not a use."""
    if len(eqn.invars) != 1:
        return _unknown(w, eqn, here, ins)
    if ins[0] is not None:
        w.origins[eqn.outvars[0]] = ins[0].moved(_moved(eqn, ins[0].idx, ins[0].lead))
    elif (out := w.out(eqn.invars[0])) is not None:
        w.outs[eqn.outvars[0]] = (out[0], _moved(eqn, out[1], 0))


@_rule(P.dot_general_p)
def _dense(w: _Walk, eqn, here, ins) -> None:
    """``dot_general`` with exactly one parameter operand: a dense use. The weight's contracted axes are W's
    rows, its free axes the columns, its batch axes (per-head weights) stack matrices; the output of a dot
    without batch axes is followed, so that an ``add`` can find its bias."""
    params = [k for k, o in enumerate(ins) if o is not None]
    if len(params) != 1:
        return _unknown(w, eqn, here, ins)
    k, o = params[0], ins[params[0]]
    w.use(o, "dense", path=here, eqn=eqn, operand=k, idx=_dense_index(eqn, k, o))
    if not eqn.params["dimension_numbers"][1][k]:  # a per-head bias is not followed (reported instead)
        w.outs[eqn.outvars[0]] = (here, _dense_feat(eqn, k))


@_rule(P.conv_general_dilated_p)
def _conv(w: _Walk, eqn, here, ins) -> None:
    """``conv_general_dilated`` whose kernel (operand 1) is the only parameter: with one feature group and one
    batch group, a conv use, W the kernel as (in features × window, out features) so that im2col patches @ W
    is the output; its channel axis is followed for a bias."""
    o, p = ins[1], eqn.params
    if o is None or ins[0] is not None:
        return _unknown(w, eqn, here, ins)
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        return w.use(o, "unknown use: grouped convolution")
    rhs = p["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
    w.use(o, "conv", path=here, eqn=eqn, operand=1, idx=_stacked_matrix(o.idx, o.lead, [rhs[1], *rhs[2:]], [rhs[0]]))
    w.outs[eqn.outvars[0]] = (here, _conv_feat(eqn))


@_rule(P.gather_p)
def _embedding(w: _Walk, eqn, here, ins) -> None:
    """``gather`` of whole rows of a 2-D parameter table (operand 0, ``table[ids]``): an embedding use, the
    output = one_hot(ids) @ table; its last axis (the table's columns) is followed for a bias."""
    o = ins[0]
    if o is None or any(x is not None for x in ins[1:]) or not _is_row_gather(eqn, o):
        return _unknown(w, eqn, here, ins)
    w.use(o, "embedding", path=here, eqn=eqn, operand=0, idx=_stacked_matrix(o.idx, o.lead, [0], [1]))
    w.outs[eqn.outvars[0]] = (here, np.broadcast_to(np.arange(o.idx.shape[-1]), eqn.outvars[0].aval.shape))


@_rule(P.add_p)
def _bias(w: _Walk, eqn, here, ins) -> None:
    """``add`` of a followed layer output and one parameter broadcast to its shape: a bias use, with the output
    feature of each of its elements (whether that is one entry per feature is checked once the layer is
    known). With no parameter operand it is a residual sum, `_residual`."""
    params = [k for k, o in enumerate(ins) if o is not None]
    if not params:
        return _residual(w, eqn, here, ins)
    k = params[0]
    if len(params) != 1 or w.out(eqn.invars[1 - k]) is None:
        return _unknown(w, eqn, here, ins)
    o, (layer_path, feat) = ins[k], w.out(eqn.invars[1 - k])
    stack, own = o.idx.shape[:o.lead], o.idx.shape[o.lead:]
    try:
        idx = np.broadcast_to(o.idx.reshape(stack + (1,) * (feat.ndim - len(own)) + own), stack + feat.shape)
    except ValueError:
        return w.use(o, "unknown use: add with broadcasting")
    w.use(o, "bias", path=here, eqn=eqn, operand=k, idx=idx.reshape((-1,) + feat.shape) if o.lead else idx,
          feat=feat, layer_path=layer_path)


@_rule(P.sub_p)
def _residual(w: _Walk, eqn, here, ins) -> None:
    """``add`` / ``sub`` of one followed layer output and a value of its shape that holds no parameter (a
    residual branch): the result is still followed as that layer's output, for a bias added after it. A
    parameter operand of ``sub`` is an unknown use."""
    if any(o is not None for o in ins):
        return _unknown(w, eqn, here, ins)
    outs = [(v, w.out(v)) for v in eqn.invars if w.out(v) is not None]
    if len(outs) == 1 and eqn.outvars[0].aval.shape == outs[0][0].aval.shape:
        w.outs[eqn.outvars[0]] = outs[0][1]


@_rule(P.jit_p, P.call_p, P.closed_call_p, P.remat_p, P.custom_jvp_call_p, P.custom_vjp_call_p)
def _call(w: _Walk, eqn, here, ins) -> None:
    """Calls (``jit``, ``checkpoint`` / ``remat``, ``custom_jvp`` / ``custom_vjp`` functions, closed calls): the
    sub-jaxpr takes the equation's operands and returns its results, so it is walked as if inlined, its
    equations' paths under ``here``; parameter origins and layer outputs go in and come back out."""
    sub = _sub(eqn)
    if sub is None:
        return _unknown(w, eqn, here, ins, f"used inside {eqn.primitive.name}")
    inner = sub[0]
    for v, o, x in zip(inner.invars, ins, eqn.invars):
        w.forget(v)
        if o is not None:
            w.origins[v] = o
        if (out := w.out(x)) is not None:
            w.outs[v] = out
    w.walk(inner, here)
    for v, x in zip(eqn.outvars, inner.outvars):
        if isinstance(x, jcore.Var) and x in w.origins:
            w.origins[v] = w.origins[x]
        if (out := w.out(x)) is not None:
            w.outs[v] = out


@_rule(P.scan_p)
def _scan(w: _Walk, eqn, here, ins) -> None:
    """``scan`` (and ``fori_loop`` with a static trip count), body walked under ``here``: a parameter passed as a
    loop constant is the same weight on every iteration, one scanned over is sliced, one per iteration (a
    stack), one carried is an unknown use. Layer outputs are not followed into or out of the loop."""
    body, _, nc, nk = _scan_body(eqn)
    length = int(eqn.params["length"])
    for j, (v, o) in enumerate(zip(body.invars, ins)):
        w.forget(v)
        if o is not None and nc <= j < nc + nk:
            w.use(o, "unknown use: carried through scan")
        elif o is not None:
            w.origins[v] = _Origin(o.leaf, o.idx, o.loops + ((length, j >= nc + nk),))
    w.walk(body, here)


@_rule(P.cond_p, P.while_p)
def _opaque(w: _Walk, eqn, here, ins) -> None:
    """``cond`` / ``while``: a layer that runs on one branch, or an unknown number of times, has no fixed rows,
    so each parameter operand is a use ``used inside cond`` (``while``), not followed."""
    _unknown(w, eqn, here, ins, f"used inside {eqn.primitive.name}")


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
    leaves = sorted({o.leaf for o in origins.values()})
    walk = _Walk(origins)
    walk.walk(closed.jaxpr, ())
    uses, layers, skipped, biases = walk.uses, {}, {}, {}
    for leaf in leaves:
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
    """Evaluates ``jaxpr`` adding ``perts[key]`` to the output of each layer (``layers``: path -> (key, layer)) and
    recording its activations in ``acts``; calls and scans that hold layers are entered, all else is bound."""
    env = dict(zip(jaxpr.constvars, consts)) | dict(zip(jaxpr.invars, args))
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
        elif here in prefixes:  # a call or scan that holds layers (discovery enters nothing else)
            enter = _eval_scan if eqn.primitive is P.scan_p else _eval_call
            outs = enter(eqn, invals, layers, perts, acts, here, depth)
        else:
            outs = _bind(eqn, invals)
            outs = outs if eqn.primitive.multiple_results else [outs]
        for v, x in zip(eqn.outvars, outs):
            env[v] = x
    return [_read(env, v) for v in jaxpr.outvars]


def _inside(layers: dict, here: tuple[int, ...]) -> dict:
    """The layers (key -> layer) that sit in the sub-jaxpr of the equation at ``here``."""
    return {key: layer for path, (key, layer) in layers.items() if path[: len(here)] == here and len(path) > len(here)}


def _eval_call(eqn, invals, layers: dict, perts: dict, acts: dict, here: tuple[int, ...], depth: int):
    """A call that holds layers, evaluated by `_eval` in its place: its gradient is that of its body (a custom
    derivative rule around a layer is not used). A ``checkpoint`` region is evaluated under `jax.checkpoint`
    (default policy), so the backward pass still recomputes it instead of storing its intermediates."""
    inner, consts = _sub(eqn)
    if eqn.primitive is not P.remat_p:
        return _eval(inner, consts, invals, layers, perts, acts, here, depth)
    to_rows: dict[str, Callable] = {}

    def region(invals, perts):
        got: dict = {}
        outs = _eval(inner, consts, invals, layers, perts, got, here, depth)
        to_rows.update({k: f for k, (_, f) in got.items()})
        return outs, {k: a for k, (a, _) in got.items()}

    outs, got = jax.checkpoint(region)(list(invals), {k: perts[k] for k in _inside(layers, here)})
    acts.update({k: (a, to_rows[k]) for k, a in got.items()})
    return outs


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
    inside = _inside(layers, here)
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
    for i in path[:-1]:
        jaxpr = _sub(jaxpr.eqns[i])[0]
    return jaxpr.eqns[path[-1]]


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
