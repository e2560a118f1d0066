"""Layer discovery and capture (`curvplan.runtime.discover_layers` / `capture`, the layer_io provider).

References: `jax.grad` for the gradient; the kernel gradient from `jax.grad` against activations.T @ cotangents
(dense and im2col conv); the bias gradient against the column sums of the cotangents."""

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
        assert acts[key].shape[1] == layer.d_in and cots[key].shape == (acts[key].shape[0], layer.d_out)
        scale = float(jnp.abs(g[key]).max()) + 1e-12
        np.testing.assert_allclose(acts[key].T @ cots[key], layer.to_matrix(g[key]), rtol=rtol, atol=rtol * scale)
        np.testing.assert_array_equal(layer.from_matrix(layer.to_matrix(g[key])), g[key])
        if layer.bias:
            np.testing.assert_allclose(cots[key].sum(0), g[layer.bias].reshape(-1)[layer.bias_index],
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


def test_used_twice_scan_and_tags():
    params = {"w": jnp.ones((3, 3)) * 0.1, "v": jnp.ones((3, 3)) * 0.2, "u": jnp.ones((3, 2))}

    def loss(p, x):
        h = x @ p["w"] @ p["w"]  # used twice
        h, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ p["v"]), None), h, None, length=2)
        return jnp.sum(h @ p["u"])

    x = jnp.ones((2, 3))
    report = check_capture(loss, params, x)
    assert list(report.layers) == ["['u']"]
    assert report.skipped == {"['v']": "used inside scan", "['w']": "used 2 times (dense)"}
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
