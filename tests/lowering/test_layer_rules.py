"""One test per rule of the layer-discovery table (`curvplan.lowering._layers.RULES`).

Each test traces a tiny function whose jaxpr holds the rule's primitive (checked), and compares what discovery
reports with what the test knows independently: the weight layout it wrote (index maps built with numpy), the
layer input computed directly, and output cotangents from `jax.grad` of the same model with an explicit
perturbation added to the layer's output."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import checkpoint_name
from jax.extend import core as jcore
from jax.extend.core import primitives as P

from curvplan.lowering._layers import RULES
from curvplan.runtime import capture, discover_layers

COVERED: dict = {}  # primitive -> the test that exercises its rule
K = jax.random.split(jax.random.key(0), 6)
X = jax.random.normal(K[0], (5, 3))


def covers(*prims):
    def register(test):
        COVERED.update(dict.fromkeys(prims, test.__name__))
        return test
    return register


def primitives(jaxpr) -> set:
    """Every primitive of ``jaxpr`` and its sub-jaxprs."""
    found = set()
    for eqn in jaxpr.eqns:
        found.add(eqn.primitive)
        for sub in jcore.jaxprs_in_params(eqn.params):
            found |= primitives(sub)
    return found


def discover(fn, params, *args, uses=()):
    """`discover_layers`, after checking that ``fn``'s jaxpr holds the primitives ``uses``."""
    missing = set(uses) - primitives(jax.make_jaxpr(fn)(params, *args).jaxpr)
    assert not missing, f"the test function does not exercise {missing}"
    return discover_layers(fn, params, *args)


def grid(*shape) -> np.ndarray:
    return np.arange(int(np.prod(shape))).reshape(shape)


def with_call(prim, fn, *args):
    """``fn`` with its one ``jit`` equation re-emitted as a ``prim`` (``call`` / ``closed_call``) equation: no
    public function emits these in a forward trace, so the test builds the equation itself."""
    outer = jax.make_jaxpr(fn)(*args)
    (eqn,) = [e for e in outer.jaxpr.eqns if e.primitive is P.jit_p]
    inner = next(v for v in eqn.params.values() if isinstance(v, jcore.ClosedJaxpr))
    sub = inner if prim is P.closed_call_p else inner.jaxpr
    eqns = [e.replace(primitive=prim, params={"call_jaxpr": sub}) if e is eqn else e for e in outer.jaxpr.eqns]
    closed = jcore.ClosedJaxpr(outer.jaxpr.replace(eqns=eqns), outer.consts)
    return lambda *a: jcore.jaxpr_as_fun(closed)(*jax.tree.leaves(a))[0]


# -- layout-only primitives ------------------------------------------------------------------------------
@covers(P.reshape_p)
def test_reshape_moves_the_index_map():
    r = discover(lambda p, x: jnp.sum(jnp.sin(x @ p["w"].reshape(3, 4))), {"w": jnp.ones(12)}, X, uses=[P.reshape_p])
    np.testing.assert_array_equal(r.layers["['w']"].index, grid(3, 4))


@covers(P.transpose_p)
def test_transpose_moves_the_index_map():
    w = jax.random.normal(K[1], (4, 3))  # stored (out, in)
    loss = lambda p, x: jnp.sum(jnp.sin(x @ jnp.transpose(p["w"])))  # noqa: E731
    layer = discover(loss, {"w": w}, X, uses=[P.transpose_p]).layers["['w']"]
    np.testing.assert_array_equal(layer.index, grid(4, 3).T)
    np.testing.assert_array_equal(layer.to_matrix(w), w.T)


@covers(P.squeeze_p)
def test_squeeze_moves_the_index_map():
    loss = lambda p, x: jnp.sum(jnp.sin(x @ jnp.squeeze(p["w"], 0)))  # noqa: E731
    r = discover(loss, {"w": jnp.ones((1, 3, 4))}, X, uses=[P.squeeze_p])
    np.testing.assert_array_equal(r.layers["['w']"].index, grid(3, 4))


@covers(P.broadcast_in_dim_p)
def test_broadcast_in_dim_moves_a_bias_onto_the_output():
    loss = lambda p, x: jnp.sum(jnp.sin(x @ p["w"] + p["b"]))  # noqa: E731
    r = discover(loss, {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}, X, uses=[P.broadcast_in_dim_p])
    assert r.layers["['w']"].bias == "['b']"
    np.testing.assert_array_equal(r.layers["['w']"].bias_index, np.arange(4))


@covers(P.convert_element_type_p)
def test_dtype_cast_is_followed():
    loss = lambda p, x: jnp.sum(jnp.sin(x.astype(jnp.bfloat16) @ p["w"].astype(jnp.bfloat16)))  # noqa: E731
    r = discover(loss, {"w": jnp.ones((3, 4))}, X, uses=[P.convert_element_type_p])
    assert r.layers["['w']"].kind == "dense" and not r.skipped


@covers(P.copy_p)
def test_copy_is_followed():
    loss = lambda p, x: jnp.sum(jnp.sin(x @ jnp.copy(p["w"])))  # noqa: E731
    r = discover(loss, {"w": jnp.ones((3, 4))}, X, uses=[P.copy_p])
    np.testing.assert_array_equal(r.layers["['w']"].index, grid(3, 4))


@covers(P.name_p)
def test_checkpoint_name_on_a_weight_and_on_a_layer_output():
    loss = lambda p, x: jnp.sum(jnp.sin(checkpoint_name(x @ checkpoint_name(p["w"], "w"), "h") + p["b"]))  # noqa: E731
    r = discover(loss, {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}, X, uses=[P.name_p])
    assert r.layers["['w']"].bias == "['b']" and not r.skipped


# -- uses ------------------------------------------------------------------------------------------------
@covers(P.dot_general_p)
def test_dot_general_with_one_parameter_is_dense():
    params = {"w": jnp.ones((3, 4)), "a": jnp.ones((3, 3)), "c": jnp.ones((3, 2)), "oi": jnp.ones((6, 2))}

    def loss(p, x):
        h = jnp.einsum("ni,oi->no", x @ p["w"][:, :2] @ jnp.ones((2, 2)), p["oi"])  # w sliced: not a layer
        return jnp.sum(jnp.sin(h)) + jnp.sum(p["a"] @ p["c"])  # two parameter operands: no layer

    r = discover(loss, params, X, uses=[P.dot_general_p])
    layer = r.layers["['oi']"]
    assert (layer.kind, layer.shape, layer.d_in, layer.d_out) == ("dense", (6, 2), 2, 6)
    np.testing.assert_array_equal(layer.index, grid(6, 2).T)  # stored (out, in)
    assert r.skipped["['a']"] == r.skipped["['c']"] == "unknown use: dot_general"
    assert r.skipped["['w']"] == "unknown use: slice"


@covers(P.conv_general_dilated_p)
def test_conv_kernel_is_an_im2col_matrix():
    kernel = jax.random.normal(K[1], (2, 2, 3, 5))  # HWIO
    x = jax.random.normal(K[2], (2, 6, 6, 3))  # NHWC
    conv = lambda k, x, groups=1: jax.lax.conv_general_dilated(  # noqa: E731
        x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
    params = {"k": kernel, "g": jnp.ones((2, 2, 1, 3)), "b": jnp.ones(5)}
    loss = lambda p, x: jnp.sum(jnp.sin(conv(p["k"], x) + p["b"])) + jnp.sum(conv(p["g"], x, 3))  # noqa: E731
    r = discover(loss, params, x, uses=[P.conv_general_dilated_p])
    layer = r.layers["['k']"]
    assert (layer.kind, layer.d_in, layer.d_out, layer.bias) == ("conv", 3 * 2 * 2, 5, "['b']")
    np.testing.assert_array_equal(layer.index, grid(2, 2, 3, 5).transpose(2, 0, 1, 3).reshape(12, 5))  # rows (I, H, W)
    assert r.skipped["['g']"] == "unknown use: grouped convolution"
    _, _, acts, _ = capture(loss, r, params, x)
    np.testing.assert_allclose(acts["['k']"] @ layer.to_matrix(kernel), conv(kernel, x).reshape(-1, 5), rtol=1e-4,
                               atol=1e-5)


@covers(P.gather_p)
def test_gather_of_rows_is_an_embedding():
    params = {"emb": jax.random.normal(K[1], (6, 4)), "cols": jnp.ones((4, 6))}
    ids = jnp.array([[0, 3, 3], [5, 1, 0]])
    loss = lambda p, ids: jnp.sum(jnp.sin(p["emb"][ids])) + jnp.sum(p["cols"][:, ids])  # noqa: E731
    r = discover(loss, params, ids, uses=[P.gather_p])
    layer = r.layers["['emb']"]
    assert (layer.kind, layer.d_in, layer.d_out) == ("embedding", 6, 4)
    np.testing.assert_array_equal(layer.index, grid(6, 4))
    assert r.skipped["['cols']"] == "unknown use: gather"
    _, _, acts, _ = capture(loss, r, params, ids)
    np.testing.assert_array_equal(acts["['emb']"], jax.nn.one_hot(ids.reshape(-1), 6))


@covers(P.add_p)
def test_add_of_a_broadcast_parameter_is_a_bias():
    params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4), "v": jnp.ones((3, 5)), "rows": jnp.ones((5, 1)),
              "c": jnp.ones(3)}
    loss = lambda p, x: (jnp.sum(jnp.sin(x @ p["w"] + p["b"])) + jnp.sum(jnp.sin(x @ p["v"] + p["rows"]))  # noqa: E731
                         + jnp.sum(jnp.sin(x + p["c"])))
    r = discover(loss, params, X, uses=[P.add_p])
    assert r.layers["['w']"].bias == "['b']" and r.layers["['v']"].bias is None
    assert r.skipped["['rows']"] == "added to a layer output in a way that is not a per-feature bias"
    assert r.skipped["['c']"] == "unknown use: add"


@covers(P.sub_p)
def test_residual_sum_is_still_the_layer_output():
    params = {"w": jnp.ones((3, 3)), "b": jnp.ones(3), "v": jnp.ones((3, 3)), "c": jnp.ones(3)}
    loss = lambda p, x: jnp.sum(jnp.sin(x @ p["w"] - x + p["b"])) + jnp.sum(jnp.sin(x @ p["v"] - p["c"]))  # noqa: E731
    r = discover(loss, params, X, uses=[P.sub_p])
    assert r.layers["['w']"].bias == "['b']" and r.skipped == {"['c']": "unknown use: sub"}


# -- calls and loops -------------------------------------------------------------------------------------
def mlp_params():
    return {"w1": jax.random.normal(K[1], (3, 4)), "b1": jax.random.normal(K[2], (4,)),
            "w2": jax.random.normal(K[3], (4, 2))}


def check_two_layers(block, uses):
    """``block(w, b, x)`` is a dense layer with bias wrapped in some call; the loss stacks two of them. Both are
    found, and capture's activations and cotangents match the layer inputs computed here and the gradient
    of a copy of the model with explicit output perturbations."""
    def loss(p, x, e1=0.0, e2=0.0):
        h = block(p["w1"], p["b1"], x, e1)
        return jnp.sum(jnp.sin(block(p["w2"], jnp.zeros(2), h, e2)))

    params = mlp_params()
    r = discover(loss, params, X, uses=uses)
    assert set(r.layers) == {"['w1']", "['w2']"} and r.layers["['w1']"].bias == "['b1']" and not r.skipped
    _, grad, acts, cots = capture(loss, r, params, X)
    h = jnp.tanh(X @ params["w1"] + params["b1"])
    np.testing.assert_allclose(acts["['w1']"], X, rtol=1e-6)
    np.testing.assert_allclose(acts["['w2']"], h, rtol=1e-5, atol=1e-6)
    e1, e2 = jax.grad(loss, argnums=(2, 3))(params, X, jnp.zeros((5, 4)), jnp.zeros((5, 2)))
    np.testing.assert_allclose(cots["['w1']"], e1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cots["['w2']"], e2, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grad, jax.grad(loss)(params, X))
    return loss, params, r


def dense(w, b, x, e):
    return jnp.tanh(x @ w + e + b)


@covers(P.jit_p)
def test_dense_inside_jit():
    check_two_layers(jax.jit(dense), [P.jit_p])


@covers(P.remat_p)
def test_dense_inside_checkpoint_and_capture_keeps_the_checkpoint():
    loss, params, r = check_two_layers(jax.checkpoint(dense), [P.remat_p])
    traced = jax.make_jaxpr(lambda p, x: capture(loss, r, p, x))(params, X)
    assert P.remat_p in primitives(traced.jaxpr)  # the backward pass recomputes the region


@covers(P.custom_jvp_call_p)
def test_dense_inside_custom_jvp_and_a_custom_jvp_activation():
    block = jax.custom_jvp(dense)
    block.defjvp(lambda primals, tangents: jax.jvp(dense, primals, tangents))
    check_two_layers(block, [P.custom_jvp_call_p])

    params = mlp_params()  # relu is a custom_jvp function between two layers
    loss = lambda p, x: jnp.sum(jnp.sin(jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"]))  # noqa: E731
    r = discover(loss, params, X, uses=[P.custom_jvp_call_p])
    assert set(r.layers) == {"['w1']", "['w2']"} and not r.skipped
    _, _, acts, _ = capture(loss, r, params, X)
    np.testing.assert_allclose(acts["['w2']"], np.maximum(X @ params["w1"] + params["b1"], 0), rtol=1e-5, atol=1e-6)


@covers(P.custom_vjp_call_p)
def test_dense_inside_custom_vjp():
    block = jax.custom_vjp(dense)
    block.defvjp(lambda *args: jax.vjp(dense, *args), lambda vjp, g: vjp(g))
    check_two_layers(block, [P.custom_vjp_call_p])


@pytest.mark.parametrize("prim", sorted({P.call_p, P.closed_call_p}, key=str), ids=str)
def test_dense_inside_call_and_closed_call(prim):
    params = mlp_params()
    loss = with_call(prim, lambda p, x: jnp.sum(jnp.sin(jax.jit(dense)(p["w1"], p["b1"], x, 0.0) @ p["w2"])), params, X)
    r = discover(loss, params, X, uses=[prim])
    assert set(r.layers) == {"['w1']", "['w2']"} and r.layers["['w1']"].bias == "['b1']" and not r.skipped
    _, _, acts, _ = capture(loss, r, params, X)
    np.testing.assert_allclose(acts["['w2']"], jnp.tanh(X @ params["w1"] + params["b1"]), rtol=1e-5, atol=1e-6)


COVERED.update(dict.fromkeys([P.call_p, P.closed_call_p], test_dense_inside_call_and_closed_call.__name__))


def test_nested_calls():
    inner = jax.custom_jvp(dense)
    inner.defjvp(lambda primals, tangents: jax.jvp(dense, primals, tangents))
    check_two_layers(jax.jit(jax.checkpoint(lambda w, b, x, e: inner(w, b, x, e))),
                     [P.jit_p, P.remat_p, P.custom_jvp_call_p])


@covers(P.scan_p)
def test_scan_over_stacked_weights():
    ws = jax.random.normal(K[1], (3, 3, 3))
    params = {"ws": ws, "carried": jnp.eye(3)}

    def loss(p, x, e=None):
        e = jnp.zeros((3,) + x.shape) if e is None else e
        (h, m), _ = jax.lax.scan(lambda c, we: ((jnp.tanh(c[0] @ we[0] + we[1]), c[1] @ c[1]), None),
                                 (x, p["carried"]), (p["ws"], e))
        return jnp.sum(jnp.sin(h)) + jnp.sum(m)

    r = discover(loss, params, X, uses=[P.scan_p])
    layer = r.layers["['ws']"]
    assert (layer.stack, layer.loops, layer.d_in, layer.d_out) == (3, ((3, True),), 3, 3)
    np.testing.assert_array_equal(layer.index, grid(3, 3, 3))
    assert r.skipped == {"['carried']": "unknown use: carried through scan"}
    _, _, acts, cots = capture(loss, r, params, X)
    hs = [X]
    for i in range(2):
        hs.append(jnp.tanh(hs[-1] @ ws[i]))
    np.testing.assert_allclose(acts["['ws']"], jnp.stack(hs), rtol=1e-5, atol=1e-6)
    e = jax.grad(loss, argnums=2)(params, X, jnp.zeros((3, 5, 3)))
    np.testing.assert_allclose(cots["['ws']"], e, rtol=1e-5, atol=1e-6)


@covers(P.cond_p, P.while_p)
def test_cond_and_while_are_not_entered():
    params = {"v": jnp.ones((3, 3)), "u": jnp.ones((3, 3)) * 0.1}

    def loss(p, x):
        h = jax.lax.cond(jnp.sum(x) > 0, lambda c: c @ p["v"], lambda c: c, x)
        _, h = jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, c[1] @ p["u"]), (0, h))
        return jnp.sum(h)

    r = discover(loss, params, X, uses=[P.cond_p, P.while_p])
    assert not r.layers and r.skipped == {"['v']": "used inside cond", "['u']": "used inside while"}


def test_primitives_without_a_rule_are_unknown_uses():
    r = discover(lambda p, x: jnp.sum(x @ (p["w"] * 2.0)), {"w": jnp.ones((3, 3))}, X, uses=[P.mul_p])
    assert P.mul_p not in RULES and r.skipped == {"['w']": "unknown use: mul"}


@pytest.mark.parametrize("prim", list(RULES), ids=str)
def test_every_rule_is_documented_and_tested(prim):
    assert RULES[prim].__doc__, f"the rule for {prim} has no docstring"
    assert prim in COVERED, f"no test exercises the rule for {prim}"
