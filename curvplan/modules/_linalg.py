"""Dense linear algebra for modules: one home for matmul precision, symmetrization and LAPACK calls.

Every factorization a module runs (``eigh``, ``svd``, ``qr``, ``cholesky``) goes through this file. On CPU with
jaxlib < 0.11, a *batched* LAPACK call (leading batch axes) splits its batch across XLA's intra-op thread pool and
blocks a pool thread until the pieces finish; when as many such calls run at once as the pool has threads (two on
a 2-core machine), each waits for work queued behind the others and the program never finishes. jaxlib 0.11
removed that parallel path. Here a batched call on an affected CPU backend is mapped one matrix at a time
(``lax.map``), which the kernels run inline; on GPU/TPU, and on jaxlib >= 0.11, the batched call is used as is.

>>> import jax.numpy as jnp
>>> w, v = eigh(jnp.stack([jnp.eye(2), 2 * jnp.eye(2)]))
>>> w.tolist()
[[1.0, 1.0], [2.0, 2.0]]
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST


def _jaxlib_version() -> tuple[int, ...]:
    import jaxlib

    return tuple(int(x) for x in jaxlib.__version__.split(".")[:2] if x.isdigit())


_BATCHED_LAPACK_CAN_DEADLOCK = _jaxlib_version() < (0, 11)


def mm(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` at full float32 precision (factors, roots and Grams are precision-sensitive)."""
    return jnp.matmul(a, b, precision=HIGHEST)


def symmetrize(a: jax.Array) -> jax.Array:
    """``(A + Aᵀ) / 2`` over the last two axes."""
    return 0.5 * (a + jnp.swapaxes(a, -1, -2))


def _one_at_a_time(fn: Callable, a: jax.Array, *rest: jax.Array):
    """``fn`` over the leading batch axes of ``a`` (and of ``rest``, which share them), one matrix per call when
    a batched LAPACK call could deadlock here; otherwise ``fn`` on the whole batch.

    Half-precision inputs (bfloat16, float16), which the LAPACK and cuSOLVER kernels do not take, are factorized
    in float32 and the results cast back."""
    low = a.dtype in (jnp.bfloat16, jnp.float16)
    if low:
        out = _one_at_a_time(fn, a.astype(jnp.float32), *(x.astype(jnp.float32) for x in rest))
        return jax.tree_util.tree_map(lambda y: y.astype(a.dtype) if jnp.issubdtype(y.dtype, jnp.floating) else y,
                                      out)
    lead = a.shape[:-2]
    if not lead or not _BATCHED_LAPACK_CAN_DEADLOCK or jax.default_backend() != "cpu":
        return fn(a, *rest)
    n = 1
    for d in lead:
        n *= d
    flat = [x.reshape((n,) + x.shape[len(lead):]) for x in (a, *rest)]
    out = jax.lax.map(lambda xs: fn(*xs), tuple(flat))
    return jax.tree_util.tree_map(lambda y: y.reshape(lead + y.shape[1:]), out)


def eigh(a: jax.Array, *, symmetrize_input: bool = True) -> tuple[jax.Array, jax.Array]:
    """Eigenvalues (ascending) and eigenvectors of symmetric ``a`` (batched over leading axes)."""
    return _one_at_a_time(lambda m: jnp.linalg.eigh(m, symmetrize_input=symmetrize_input), a)


def svd(a: jax.Array, *, full_matrices: bool = False, compute_uv: bool = True):
    """``jnp.linalg.svd`` (batched over leading axes)."""
    return _one_at_a_time(lambda m: jnp.linalg.svd(m, full_matrices=full_matrices, compute_uv=compute_uv), a)


def qr(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Reduced ``Q, R`` (batched over leading axes)."""
    return _one_at_a_time(jnp.linalg.qr, a)


def cholesky(a: jax.Array) -> jax.Array:
    """Lower Cholesky factor (batched over leading axes)."""
    return _one_at_a_time(jnp.linalg.cholesky, a)


def solve_triangular(a: jax.Array, b: jax.Array, *, lower: bool) -> jax.Array:
    """``a⁻¹ b`` for triangular ``a`` (batched over the leading axes both share)."""
    return _one_at_a_time(lambda m, r: jax.scipy.linalg.solve_triangular(m, r, lower=lower), a, b)
