"""Benchmark workloads W1-W5: data, model, loss, batches.

>>> w = get_workload("w4")
>>> params = w.init(jax.random.key(0))
>>> x, y = next(w.batches(seed=0))
>>> x.shape, y.shape
((128, 10), (128, 1))
>>> bool(jnp.isfinite(w.loss_fn(params, (x, y))))
True

Every workload loads its data offline: digits and Friedman1 from scikit-learn, the Shakespeare text from
``benchmarks/data`` (copied with provenance), Fashion-MNIST from the Debian package ``dataset-fashion-mnist``.
"""

from __future__ import annotations

import dataclasses
import gzip
import pathlib
from collections.abc import Callable, Iterator
from functools import cached_property
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from curvplan.lowering import ce_loss, mse_loss

DATA = pathlib.Path(__file__).parent / "data"
FASHION_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")


class WorkloadUnavailable(RuntimeError):
    """The data a workload needs is not installed (the message says how to get it)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Workload:
    """A model, its data and its loss.

    Attributes:
        name: registry key (``w1`` ...).
        loss_kind: ``"ce"`` / ``"mse"`` for model-based workloads (GGN methods need it), ``None`` otherwise.
        init: ``key -> params``.
        model_fn: ``(params, x) -> outputs`` (``None`` for loss-only problems).
        load: ``() -> ((x_train, y_train), (x_test, y_test))`` as numpy arrays (called once, lazily).
        batch_size: the default minibatch size (``None``: full batch).
        loss: ``(params, batch) -> scalar`` for loss-only problems.
    """

    name: str
    description: str
    init: Callable[[jax.Array], Any]
    load: Callable[[], tuple]
    batch_size: int | None
    model_fn: Callable[[Any, Any], jax.Array] | None = None
    loss_kind: str | None = None
    loss: Callable[[Any, Any], jax.Array] | None = None

    @cached_property
    def data(self):
        return self.load()

    @property
    def train(self):
        return self.data[0]

    @property
    def test(self):
        return self.data[1]

    def loss_fn(self, params, batch) -> jax.Array:
        if self.loss is not None:
            return self.loss(params, batch)
        x, y = batch
        out = self.model_fn(params, x)
        return ce_loss(out, y) if self.loss_kind == "ce" else mse_loss(out, y)

    def optimizer_kwargs(self) -> dict:
        """Keyword arguments for `curvplan.Optimizer` (``model_fn`` + ``loss`` when there is a model)."""
        if self.model_fn is not None:
            return {"model_fn": self.model_fn, "loss": self.loss_kind}
        return {"loss_fn": self.loss_fn}

    def batches(self, seed: int = 0, batch_size: int | None = None) -> Iterator[tuple]:
        """Infinite iterator of shuffled minibatches ``(x, y)`` (jnp arrays); full batch when size is None."""
        x, y = self.train
        bs = batch_size or self.batch_size
        if bs is None or bs >= len(x):
            full = (jnp.asarray(x), jnp.asarray(y))
            while True:
                yield full
        rng = np.random.default_rng(seed)
        while True:
            perm = rng.permutation(len(x))
            for i in range(0, len(x) - bs + 1, bs):
                idx = perm[i : i + bs]
                yield jnp.asarray(x[idx]), jnp.asarray(y[idx])

    def eval_loss(self, params, max_examples: int = 4096) -> float:
        """Loss on (up to ``max_examples`` of) the held-out split."""
        x, y = self.test
        return float(self.loss_fn(params, (jnp.asarray(x[:max_examples]), jnp.asarray(y[:max_examples]))))


# -- W1: digits MLP -------------------------------------------------------------------------------------
def _mlp_init(sizes):
    def init(key):
        params = {}
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            key, sub = jax.random.split(key)
            params[f"layer_{i}"] = {"w": jax.random.normal(sub, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
        return params

    return init


def mlp(params, x):
    """tanh MLP over ``{"layer_i": {"w", "b"}}`` (the last layer linear)."""
    n = len(params)
    for i in range(n):
        x = x @ params[f"layer_{i}"]["w"] + params[f"layer_{i}"]["b"]
        if i < n - 1:
            x = jnp.tanh(x)
    return x


def _load_digits():
    from curvplan.examples.digits import load_digits

    return load_digits()


# -- W2: Fashion-MNIST CNN ------------------------------------------------------------------------------
def _read_idx(path: pathlib.Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = np.frombuffer(raw[4 : 4 + 4 * ndim], dtype=">u4")
    return np.frombuffer(raw[4 + 4 * ndim :], dtype=np.uint8).reshape(tuple(int(d) for d in dims))


def _load_fashion(n_train: int = 10_000, n_test: int = 2_000):
    files = {k: FASHION_DIR / f"{k}-ubyte.gz" for k in
             ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise WorkloadUnavailable(
            f"W2 needs Fashion-MNIST, not found: {missing[0]} -- install the Debian package: "
            "`sudo apt-get install dataset-fashion-mnist` (31 MB, MIT), then rerun"
        )
    xs = _read_idx(files["train-images-idx3"])[:n_train].astype(np.float32)[..., None] / 255.0
    ys = _read_idx(files["train-labels-idx1"])[:n_train].astype(np.int32)
    xt = _read_idx(files["t10k-images-idx3"])[:n_test].astype(np.float32)[..., None] / 255.0
    yt = _read_idx(files["t10k-labels-idx1"])[:n_test].astype(np.int32)
    return (xs, ys), (xt, yt)


def _cnn_init(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "conv_0": {"w": jax.random.normal(k1, (3, 3, 1, 8)) / 3.0, "b": jnp.zeros(8)},
        "conv_1": {"w": jax.random.normal(k2, (3, 3, 8, 16)) / np.sqrt(72.0), "b": jnp.zeros(16)},
        "dense": {"w": jax.random.normal(k3, (7 * 7 * 16, 10)) / np.sqrt(784.0), "b": jnp.zeros(10)},
    }


def cnn(params, x):
    """conv3x3(8)-relu-pool-conv3x3(16)-relu-pool-linear on NHWC images with flax-layout (kh, kw, in, out) kernels."""
    for name in ("conv_0", "conv_1"):
        x = jax.lax.conv_general_dilated(x, params[name]["w"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC")) + params[name]["b"]
        x = jax.nn.relu(x)
        x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    return x.reshape(x.shape[0], -1) @ params["dense"]["w"] + params["dense"]["b"]


# -- W3: character transformer --------------------------------------------------------------------------
W3_CONFIG = dict(layers=2, d=64, heads=4, T=64)


@dataclasses.dataclass(frozen=True)
class _Chars:
    vocab: str
    train: np.ndarray
    test: np.ndarray


def _chars() -> _Chars:
    text = (DATA / "shakespeare_plays.txt").read_text(encoding="ascii")
    vocab = "".join(sorted(set(text)))
    ids = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    table = np.zeros(256, np.int32)
    table[np.frombuffer(vocab.encode("ascii"), np.uint8)] = np.arange(len(vocab))
    ids = table[ids]
    cut = int(0.9 * len(ids))
    return _Chars(vocab, ids[:cut], ids[cut:])


def _load_chars(n_windows_test: int = 256):
    """Non-overlapping windows of T+1 characters: x = first T, y = next-character targets (flattened)."""
    c = _chars()
    T = W3_CONFIG["T"]

    def windows(ids):
        n = (len(ids) - 1) // T
        x = ids[: n * T].reshape(n, T)
        y = ids[1 : n * T + 1].reshape(n, T)
        return x.astype(np.int32), y.astype(np.int32)

    xs, ys = windows(c.train)
    xt, yt = windows(c.test)
    return (xs, ys), (xt[:n_windows_test], yt[:n_windows_test])


W3_VOCAB = 76


def _transformer_init(key, vocab=W3_VOCAB, layers=2, d=64, heads=4, T=64):
    keys = iter(jax.random.split(key, 2 + 4 * layers))

    def dense(k, a, b):
        return jax.random.normal(k, (a, b)) / np.sqrt(a)

    params = {"embed": jax.random.normal(next(keys), (vocab, d)) * 0.02,
              "pos": jax.random.normal(next(keys), (T, d)) * 0.02}
    for i in range(layers):
        params[f"block_{i}"] = {
            "ln1": {"scale": jnp.ones(d), "bias": jnp.zeros(d)},
            "qkv": dense(next(keys), d, 3 * d),
            "proj": dense(next(keys), d, d) / np.sqrt(2 * layers),
            "ln2": {"scale": jnp.ones(d), "bias": jnp.zeros(d)},
            "fc1": {"w": dense(next(keys), d, 4 * d), "b": jnp.zeros(4 * d)},
            "fc2": {"w": dense(next(keys), 4 * d, d) / np.sqrt(2 * layers), "b": jnp.zeros(d)},
        }
    params["ln_f"] = {"scale": jnp.ones(d), "bias": jnp.zeros(d)}
    return params


def _layer_norm(p, x):
    mu = jnp.mean(x, -1, keepdims=True)
    var = jnp.var(x, -1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def transformer(params, x, heads: int = W3_CONFIG["heads"]):
    """Pre-LN causal transformer on int tokens (B, T); tied embeddings; logits flattened to (B*T, V).

    Targets may stay (B, T): `ce_loss` reshapes labels to the logits' leading shape.
    """
    B, T = x.shape
    h = params["embed"][x] + params["pos"][:T]
    mask = jnp.tril(jnp.ones((T, T), bool))
    for i in range(sum(k.startswith("block_") for k in params)):
        p = params[f"block_{i}"]
        d = h.shape[-1]
        q, k, v = jnp.split(_layer_norm(p["ln1"], h) @ p["qkv"], 3, axis=-1)
        q, k, v = (t.reshape(B, T, heads, d // heads) for t in (q, k, v))
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // heads)
        att = jax.nn.softmax(jnp.where(mask, att, -1e9), axis=-1)
        h = h + jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(B, T, d) @ p["proj"]
        u = jax.nn.gelu(_layer_norm(p["ln2"], h) @ p["fc1"]["w"] + p["fc1"]["b"])
        h = h + u @ p["fc2"]["w"] + p["fc2"]["b"]
    h = _layer_norm(params["ln_f"], h)
    return (h @ params["embed"].T).reshape(B * T, -1)


def _w3_model(params, x):
    return transformer(params, x)


# -- W4: Friedman1 least squares ------------------------------------------------------------------------
def _load_friedman(n: int = 2000, n_test: int = 500):
    """make_friedman1(n, p=10, noise=0, random_state=0), targets standardised; the test split is a fresh draw."""
    from sklearn.datasets import make_friedman1

    x, y = make_friedman1(n_samples=n + n_test, n_features=10, noise=0.0, random_state=0)
    mu, sd = y[:n].mean(), y[:n].std()
    y = ((y - mu) / sd).astype(np.float32)[:, None]
    x = x.astype(np.float32)
    return (x[:n], y[:n]), (x[n:], y[n:])


# -- W5: exact problems ---------------------------------------------------------------------------------
def spd_quadratic(n: int = 512, cond: float = 1e4, clusters: int | None = None, seed: int = 0):
    """(A, b) with A SPD, eigenvalues log-spaced in [1, cond] (or ``clusters`` distinct values)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    if clusters:
        eig = np.repeat(np.logspace(0, np.log10(cond), clusters), -(-n // clusters))[:n]
    else:
        eig = np.logspace(0, np.log10(cond), n)
    a = (q * eig) @ q.T
    return (a + a.T) / 2, rng.standard_normal(n)


def _quadratic_workload(clusters):
    a, b = spd_quadratic(clusters=clusters)
    a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)

    def loss(x, batch):
        del batch
        return 0.5 * x @ (a32 @ x) - b32 @ x

    dummy = (np.zeros((1, 1), np.float32), np.zeros((1, 1), np.float32))
    return dict(init=lambda key: jnp.zeros(a.shape[0]), load=lambda: (dummy, dummy), batch_size=None, loss=loss)


def _load_deep_linear(n: int = 512, d: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2 * n, d)).astype(np.float32)
    w = rng.standard_normal((d, d)).astype(np.float32) / np.sqrt(d)
    y = x @ w
    return (x[:n], y[:n]), (x[n:], y[n:])


def _deep_linear_init(key, d: int = 32, depth: int = 3):
    keys = jax.random.split(key, depth)
    return {f"layer_{i}": {"w": jax.random.normal(k, (d, d)) / np.sqrt(d), "b": jnp.zeros(d)}
            for i, k in enumerate(keys)}


def _linear_mlp(params, x):
    for i in range(len(params)):
        x = x @ params[f"layer_{i}"]["w"] + params[f"layer_{i}"]["b"]
    return x


WIDE_SIZES = (64, 1024, 1024, 1024, 10)
"""The wide MLP: three 1024-wide hidden layers, where a step's matmuls (not dispatch) set its time."""

WORKLOADS: dict[str, Callable[[], Workload]] = {
    "w1": lambda: Workload("w1", "digits MLP 64-128-128-10 tanh, CE, bs 256", _mlp_init((64, 128, 128, 10)),
                           _load_digits, 256, mlp, "ce"),
    "w1-wide": lambda: Workload("w1-wide", "digits MLP 64-1024-1024-1024-10 tanh, CE, bs 512",
                                _mlp_init(WIDE_SIZES), _load_digits, 512, mlp, "ce"),
    "w1-full": lambda: Workload("w1-full", "digits MLP 64-128-128-10 tanh, CE, full batch (1500)",
                                _mlp_init((64, 128, 128, 10)), _load_digits, None, mlp, "ce"),
    "w2": lambda: Workload("w2", "Fashion-MNIST CNN conv8-pool-conv16-pool-linear, CE, bs 64", _cnn_init,
                           _load_fashion, 64, cnn, "ce"),
    "w3": lambda: Workload("w3", "char transformer 2x(d64, 4 heads), T=64, tied embeddings, CE, B=32",
                           _transformer_init, _load_chars, 32, _w3_model, "ce"),
    "w4": lambda: Workload("w4", "Friedman1 MLP 10-64-64-1 tanh, MSE, bs 128", _mlp_init((10, 64, 64, 1)),
                           _load_friedman, 128, mlp, "mse"),
    "w4-full": lambda: Workload("w4-full", "Friedman1 MLP 10-64-64-1 tanh, MSE, full batch (2000)",
                                _mlp_init((10, 64, 64, 1)), _load_friedman, None, mlp, "mse"),
    "w5-quadratic": lambda: Workload("w5-quadratic", "SPD quadratic n=512, cond 1e4",
                                     **_quadratic_workload(None)),
    "w5-clusters": lambda: Workload("w5-clusters", "SPD quadratic n=512, 8 eigenvalue clusters",
                                    **_quadratic_workload(8)),
    "w5-deep-linear": lambda: Workload("w5-deep-linear", "deep linear 3x(32x32), MSE, full batch",
                                       _deep_linear_init, _load_deep_linear, None, _linear_mlp, "mse"),
}


def get_workload(name: str) -> Workload:
    """The workload registered under ``name`` (see `WORKLOADS`)."""
    try:
        return WORKLOADS[name]()
    except KeyError:
        raise KeyError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}") from None
