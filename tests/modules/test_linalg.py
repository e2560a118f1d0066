"""`curvplan.modules._linalg`: batched factorizations equal numpy's per matrix, and on an affected CPU backend
no LAPACK custom call receives a batch (the jaxlib 0.10 pool-starvation deadlock needs one)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curvplan.modules import _linalg


def _spd(n_batch, n, seed=0):
    x = np.random.default_rng(seed).normal(size=(n_batch, n, n + 3))
    return x @ np.swapaxes(x, -1, -2) + 0.1 * np.eye(n)


def test_batched_eigh_matches_numpy_per_matrix():
    a = _spd(3, 6).reshape(3, 1, 6, 6)
    w, v = _linalg.eigh(jnp.asarray(a, jnp.float32))
    assert w.shape == (3, 1, 6) and v.shape == (3, 1, 6, 6)
    for i in range(3):
        np.testing.assert_allclose(np.asarray(w[i, 0]), np.linalg.eigvalsh(a[i, 0]), rtol=1e-4)
        rec = np.asarray(v[i, 0]) @ np.diag(np.asarray(w[i, 0])) @ np.asarray(v[i, 0]).T
        np.testing.assert_allclose(rec, a[i, 0], rtol=1e-4, atol=1e-4 * np.abs(a[i, 0]).max())


def test_batched_svd_qr_cholesky_solve_match_numpy():
    rng = np.random.default_rng(1)
    m = rng.normal(size=(4, 5, 3))
    s = _linalg.svd(jnp.asarray(m), compute_uv=False)
    np.testing.assert_allclose(np.asarray(s), np.linalg.svd(m, compute_uv=False), rtol=1e-5)
    q, r = _linalg.qr(jnp.asarray(m))
    np.testing.assert_allclose(np.asarray(q @ r), m, atol=1e-5)
    a = _spd(4, 5, seed=2)
    c = _linalg.cholesky(jnp.asarray(a))
    np.testing.assert_allclose(np.asarray(c), np.linalg.cholesky(a), rtol=1e-4, atol=1e-4)
    b = rng.normal(size=(4, 5, 2))
    x = _linalg.solve_triangular(c, jnp.asarray(b), lower=True)
    np.testing.assert_allclose(np.asarray(c) @ np.asarray(x), b, atol=1e-4)


@pytest.mark.skipif(not (_linalg._BATCHED_LAPACK_CAN_DEADLOCK and jax.default_backend() == "cpu"),
                    reason="only jaxlib < 0.11 on CPU maps batched factorizations")
def test_no_lapack_call_sees_a_batch_on_affected_cpu():
    def f(a):
        return _linalg.eigh(a)[0].sum() + _linalg.svd(a, compute_uv=False).sum() + _linalg.cholesky(a).sum()

    hlo = jax.jit(f).lower(jnp.asarray(_spd(3, 4), jnp.float32)).as_text()
    calls = re.findall(r"stablehlo\.custom_call @(lapack_\w+)\((.*?)\) .*?: \((tensor<[^>]*>)", hlo)
    assert {c[0][:10] for c in calls} >= {"lapack_ssy", "lapack_sge", "lapack_spo"}, calls
    for name, _, operand in calls:
        assert operand.count("x") == 2, f"{name} got a batched operand {operand}"
