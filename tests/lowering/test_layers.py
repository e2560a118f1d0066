"""Layer discovery and capture (`curvplan.runtime.discover_layers` / `capture`, the layer_io provider).

References: `jax.grad` for the gradient; the kernel gradient from `jax.grad` against activations.T @ cotangents
(dense and im2col conv; per stack entry for scanned-over layers); the bias gradient against the column sums of
the cotangents; scanned layers' rows against the same model unrolled in Python."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curvplan.ir import quantities as q
from curvplan.ir._errors import LoweringError
from curvplan.lowering import Objective
from curvplan.lowering._objective import PROVIDER_IMPLS
from curvplan.runtime import capture, discover_layers


def by_key(tree):
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_capture(fn, params, *args, rtol=1e-4):
    """Discovers, captures, and checks loss / grad / acts.T @ cots / bias sums against jax.grad."""
    report = discover_layers(fn, params, *args)
    loss, grad, acts, cots = capture(fn, report, params, *args)
    ref_loss, ref_grad = jax.value_and_grad(fn)(params, *args)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grad, ref_grad)
    g = by_key(ref_grad)
    for key, layer in report.layers.items():
        lead = (layer.stack,) if layer.stack else ()
        rows = acts[key].shape[-2]
        assert acts[key].shape == lead + (rows, layer.d_in) and cots[key].shape == lead + (rows, layer.d_out)
        scale = float(jnp.abs(g[key]).max()) + 1e-12
        np.testing.assert_allclose(jnp.einsum("...ni,...no->...io", acts[key], cots[key]), layer.to_matrix(g[key]),
                                   rtol=rtol, atol=rtol * scale)
        np.testing.assert_array_equal(layer.from_matrix(layer.to_matrix(g[key])), g[key])
        if layer.bias:
            np.testing.assert_allclose(cots[key].sum(-2), g[layer.bias].reshape(-1)[layer.bias_index],
                                       rtol=rtol, atol=rtol * scale)
    return report


def test_plain_mlp_and_provider():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {"l0": {"w": jax.random.normal(k1, (5, 7)), "b": jnp.zeros(7)},
              "l1": {"w": jax.random.normal(k2, (7, 3)), "b": jnp.ones(3)}}
    model = lambda p, x: jnp.tanh(x @ p["l0"]["w"] + p["l0"]["b"]) @ p["l1"]["w"] + p["l1"]["b"]  # noqa: E731
    x, y = jax.random.normal(k3, (8, 5)), jnp.arange(8) % 3
    obj = Objective(model_fn=model, loss_kind="ce")
    report = check_capture(obj.loss, params, (x, y))
    assert set(report.layers) == {"['l0']['w']", "['l1']['w']"}
    assert report.layers["['l0']['w']"].bias == "['l0']['b']" and not report.skipped
    vals = PROVIDER_IMPLS["layer_io"](obj, params, (x, y), None)
    assert set(vals) == {q.loss(), q.grad(), q.activations(), q.out_cotangents()}
    assert vals[q.activations()].report.layers.keys() == report.layers.keys()
    np.testing.assert_allclose(vals[q.activations()]["['l1']['w']"], np.tanh(x @ params["l0"]["w"]), rtol=1e-5)


def test_flax_linen_cnn_conv_patches():
    import flax.linen as nn

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(4, (3, 3), strides=(2, 2), padding="SAME")(x))
            x = nn.relu(nn.Conv(5, (2, 2), padding="VALID", use_bias=False)(x))
            return nn.Dense(3)(x.reshape(x.shape[0], -1))

    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    params = CNN().init(jax.random.key(0), x)["params"]
    loss = lambda p, x: jnp.sum(CNN().apply({"params": p}, x) ** 2)  # noqa: E731
    report = check_capture(loss, params, x)
    kinds = {k: (l.kind, l.bias) for k, l in report.layers.items()}
    assert kinds == {"['Conv_0']['kernel']": ("conv", "['Conv_0']['bias']"), "['Conv_1']['kernel']": ("conv", None),
                     "['Dense_0']['kernel']": ("dense", "['Dense_0']['bias']")}
    assert report.layers["['Conv_0']['kernel']"].d_in == 3 * 3 * 3 and not report.skipped


def test_equinox_mlp_out_in_layout():
    import equinox as eqx

    mlp = eqx.nn.MLP(4, 2, 6, 2, key=jax.random.key(0))
    params, static = eqx.partition(mlp, eqx.is_array)
    x = jax.random.normal(jax.random.key(1), (5, 4))
    loss = lambda p, x: jnp.mean(jax.vmap(eqx.combine(p, static))(x) ** 2)  # noqa: E731
    report = check_capture(loss, params, x)
    assert set(report.layers) == {f".layers[{i}].weight" for i in range(3)} and not report.skipped
    layer = report.layers[".layers[0].weight"]
    assert (layer.d_in, layer.d_out, layer.bias) == (4, 6, ".layers[0].bias")
    np.testing.assert_array_equal(layer.to_matrix(params.layers[0].weight), params.layers[0].weight.T)


def test_flax_nnx_split_merge():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(3, 5, rngs=rngs)
            self.b = nnx.Linear(5, 2, rngs=rngs)

        def __call__(self, x):
            return self.b(jax.nn.gelu(self.a(x)))

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    loss = lambda s, x: jnp.sum(nnx.merge(graphdef, s)(x) ** 2)  # noqa: E731
    report = check_capture(loss, state, jax.random.normal(jax.random.key(2), (4, 3)))
    assert len(report.layers) == 2 and all(l.bias for l in report.layers.values()) and not report.skipped


def test_w3_transformer_reports_what_it_cannot_handle():
    from benchmarks.workloads import get_workload

    w = get_workload("w3")
    params = w.init(jax.random.key(0))
    batch = next(w.batches(0, batch_size=2))
    report = check_capture(w.loss_fn, params, batch, rtol=1e-3)
    for i in range(2):
        for name in ("['qkv']", "['proj']", "['fc1']['w']", "['fc2']['w']"):
            assert report.layers[f"['block_{i}']{name}"].kind == "dense"
        assert report.skipped[f"['block_{i}']['ln1']['scale']"] == "unknown use: mul"
    assert report.skipped["['embed']"].startswith("used 2 times")  # tied embedding / output projection


def test_used_twice_cond_and_tags():
    params = {"w": jnp.ones((3, 3)) * 0.1, "v": jnp.ones((3, 3)) * 0.2, "u": jnp.ones((3, 2))}

    def loss(p, x):
        h = x @ p["w"] @ p["w"]  # used twice
        h = jax.lax.cond(jnp.sum(h) > 0, lambda c: c @ p["v"], lambda c: c, h)  # a layer on one branch only
        return jnp.sum(h @ p["u"])

    x = jnp.ones((2, 3))
    report = check_capture(loss, params, x)
    assert list(report.layers) == ["['u']"]
    assert report.skipped == {"['v']": "used inside cond", "['w']": "used 2 times (dense)"}
    tagged = discover_layers(loss, params, x, tags={"['u']": "skip"})
    assert not tagged.layers and tagged.skipped["['u']"] == "tagged skip"
    with pytest.raises(LoweringError, match="tagged 'conv'"):
        discover_layers(loss, params, x, tags={"['u']": "conv"})
    with pytest.raises(LoweringError, match="not in params"):
        discover_layers(loss, params, x, tags={"['nope']": "skip"})


def test_embedding_one_hot_activations():
    params = {"emb": jax.random.normal(jax.random.key(0), (6, 4)), "out": jax.random.normal(jax.random.key(1), (4, 6))}
    loss = lambda p, ids: jnp.mean(jax.nn.logsumexp(p["emb"][ids] @ p["out"], axis=-1))  # noqa: E731
    report = check_capture(loss, params, jnp.array([[0, 3, 3], [5, 1, 0]]))
    assert report.layers["['emb']"].kind == "embedding" and report.layers["['out']"].kind == "dense"


def test_shared_jitted_layer_function_called_twice():
    @jax.jit
    def dense(w, b, x):  # one sub-jaxpr shared by both calls
        return x @ w + b

    def loss(p, x):
        h = jnp.tanh(dense(p["w1"], p["b1"], x))
        return jnp.sum(dense(p["w2"], jnp.zeros(3), h) ** 2)

    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"w1": jax.random.normal(k1, (3, 3)), "b1": jnp.ones(3), "w2": jax.random.normal(k2, (3, 3))}
    report = check_capture(loss, params, jnp.ones((2, 3)))
    assert report.layers["['w1']"].bias == "['b1']" and report.layers["['w2']"].bias is None and not report.skipped


@pytest.mark.parametrize("wrap", ["checkpoint", "custom_jvp"])
def test_layers_inside_checkpoint_and_custom_rules_are_found(wrap):
    """A dense layer under `jax.checkpoint` (remat) or inside a `custom_jvp` function is a layer like any other."""
    def dense(w, b, x):
        return jnp.tanh(x @ w + b)

    if wrap == "checkpoint":
        block = jax.checkpoint(dense)
    else:
        block = jax.custom_jvp(dense)
        block.defjvp(lambda primals, tangents: jax.jvp(dense, primals, tangents))

    def loss(p, x):
        return jnp.sum(block(p["w2"], p["b2"], block(p["w1"], p["b1"], x)) ** 2)

    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"w1": jax.random.normal(k1, (4, 3)), "b1": jnp.ones(3), "w2": jax.random.normal(k2, (3, 2)),
              "b2": jnp.zeros(2)}
    report = check_capture(loss, params, jnp.ones((5, 4)))
    assert set(report.layers) == {"['w1']", "['w2']"} and not report.skipped
    assert report.layers["['w1']"].bias == "['b1']"


def test_scan_over_stacked_layers_and_loop_constants():
    """A weight scanned over is a stack of layers (one per slice, bias included); a loop constant (an RNN cell, a
    ``fori_loop`` body) is one layer whose rows are every iteration's rows; both match the unrolled model."""
    k = jax.random.split(jax.random.key(0), 5)
    params = {"blocks": {"w": jax.random.normal(k[0], (3, 4, 4)), "b": jax.random.normal(k[1], (3, 4))},
              "v": jax.random.normal(k[2], (4, 4)) * 0.5, "u": jax.random.normal(k[3], (4, 2))}

    def loss(p, x):
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w["w"] + w["b"]), None), x, p["blocks"])
        h = jax.lax.fori_loop(0, 2, lambda i, c: jnp.tanh(c @ p["v"]), h)
        return jnp.sum(jnp.sin(h @ p["u"]))

    def unrolled(p, x):  # the same model without loops, every slice / iteration its own leaf
        h = x
        for i in range(3):
            h = jnp.tanh(h @ p[f"w{i}"] + p[f"b{i}"])
        h = jnp.tanh(jnp.tanh(h @ p["v0"]) @ p["v1"])
        return jnp.sum(jnp.sin(h @ p["u"]))

    x = jax.random.normal(k[4], (5, 4))
    report = check_capture(loss, params, x)
    w, v = report.layers["['blocks']['w']"], report.layers["['v']"]
    assert (w.stack, w.bias, w.loops) == (3, "['blocks']['b']", ((3, True),)) and w.bias_index.shape == (3, 4)
    assert (v.stack, v.loops) == (0, ((2, False),)) and not report.skipped
    assert "dense×3" in str(report)
    flat = {"u": params["u"], "v0": params["v"], "v1": params["v"]}
    flat.update({f"w{i}": params["blocks"]["w"][i] for i in range(3)})
    flat.update({f"b{i}": params["blocks"]["b"][i] for i in range(3)})
    ref = discover_layers(unrolled, flat, x)
    _, _, acts, cots = capture(loss, report, params, x)
    _, _, racts, rcots = capture(unrolled, ref, flat, x)
    for i in range(3):
        np.testing.assert_allclose(acts["['blocks']['w']"][i], racts[f"['w{i}']"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(cots["['blocks']['w']"][i], rcots[f"['w{i}']"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(acts["['v']"], np.concatenate([racts["['v0']"], racts["['v1']"]]), rtol=1e-5)
    np.testing.assert_allclose(cots["['v']"], np.concatenate([rcots["['v0']"], rcots["['v1']"]]), rtol=1e-5,
                               atol=1e-6)


def test_nested_and_reversed_scans():
    """Slices of a stacked leaf passed on as an inner loop's constant, and a stack of stacks, both reversed."""
    k = jax.random.split(jax.random.key(1), 4)
    params = {"w": jax.random.normal(k[0], (3, 4, 4)) * 0.5, "deep": jax.random.normal(k[1], (3, 2, 4, 4)) * 0.5}

    def loss(p, x):
        def block(h, w):
            h, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ w["w"]), None), h, None, length=2, reverse=True)
            h, _ = jax.lax.scan(lambda c, d: (jnp.tanh(c @ d), None), h, w["deep"], reverse=True)
            return h, None
        return jnp.sum(jnp.sin(jax.lax.scan(block, x, p)[0]))

    report = check_capture(loss, params, jax.random.normal(k[2], (5, 4)))
    assert report.layers["['deep']"].loops == ((3, True), (2, True)) and report.layers["['deep']"].stack == 6
    assert report.layers["['w']"].loops == ((3, True), (2, False)) and not report.skipped


def test_flax_nn_scan_and_equinox_scan_over_layers():
    import equinox as eqx
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return nn.gelu(nn.Dense(4)(x)), None

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)()(x, None)
            return nn.Dense(2)(x)

    x = jax.random.normal(jax.random.key(3), (5, 4))
    params = Net().init(jax.random.key(0), x)["params"]
    report = check_capture(lambda p, x: jnp.sum(Net().apply({"params": p}, x) ** 2), params, x)
    scanned = report.layers["['ScanBlock_0']['Dense_0']['kernel']"]
    assert (scanned.stack, scanned.bias) == (3, "['ScanBlock_0']['Dense_0']['bias']") and not report.skipped

    stacked = eqx.filter_vmap(lambda key: eqx.nn.Linear(4, 4, key=key))(jax.random.split(jax.random.key(1), 3))
    leaves, static = eqx.partition(stacked, eqx.is_array)

    def loss(p, x):
        step = lambda h, lp: (jax.vmap(eqx.combine(lp, static))(jnp.tanh(h)), None)  # noqa: E731
        return jnp.mean(jax.lax.scan(step, x, p)[0] ** 2)

    report = check_capture(loss, leaves, x)
    layer = report.layers[".weight"]
    assert (layer.stack, layer.d_in, layer.d_out, layer.bias) == (3, 4, 4, ".bias") and not report.skipped
    np.testing.assert_array_equal(layer.to_matrix(leaves.weight)[1], leaves.weight[1].T)


def test_dot_batch_dimensions_are_heads():
    """A weight with one matrix per head contracted against per-head inputs (``nhtd,hde->nhte``, or a vmap over
    (weights, inputs) pairs) is a stack along the dot's batch axis, also inside a scan; a per-head bias is
    reported, not guessed. A weight whose extra axis only widens the output (``ntd,hde->nhte``) is one matrix."""
    k = jax.random.split(jax.random.key(0), 5)
    params = {"wo": jax.random.normal(k[0], (3, 4, 2)), "ens": jax.random.normal(k[1], (5, 4, 4)),
              "blocks": jax.random.normal(k[2], (2, 3, 4, 2)), "b": jnp.ones((3, 2)),
              "wide": jax.random.normal(k[4], (3, 4, 2))}

    def loss(p, x):
        xh = jnp.stack([x, 2 * x, x ** 2], axis=1)  # (n, heads, t, d)
        h = jnp.einsum("nhtd,hde->nhte", xh, p["wo"]) + p["b"][None, :, None, :]
        y = jax.vmap(lambda w, xi: jnp.tanh(xi @ w))(p["ens"], jnp.stack([x * i for i in range(5)]))
        z, _ = jax.lax.scan(lambda c, w: (c + jnp.sum(jnp.einsum("nhtd,hde->nhte", xh, w) ** 2), None), 0.0,
                            p["blocks"])
        return jnp.sum(jnp.sin(h)) + jnp.sum(y ** 2) + z + jnp.sum(jnp.einsum("ntd,hde->nhte", x, p["wide"]) ** 2)

    report = check_capture(loss, params, jax.random.normal(k[3], (2, 6, 4)))
    got = {key: (l.heads, l.stack, l.d_in, l.d_out) for key, l in report.layers.items()}
    assert got == {"['wo']": (3, 3, 4, 2), "['ens']": (5, 5, 4, 4), "['blocks']": (3, 6, 4, 2),
                   "['wide']": (0, 0, 4, 6)}
    assert report.skipped == {"['b']": "unknown use: add"}
