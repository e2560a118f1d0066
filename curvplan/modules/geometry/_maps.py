"""Pure LMO / polar / Schatten-p maps on matrices (docs/math.md §7, §8.6).

Every map here takes a 2-D array ``m`` (or a stack ``(S, rows, cols)`` where noted) in the **flax layout**
``(d_in, d_out)`` and returns the unit-ball maximiser of ``<m, ·>`` for its norm, times the published shape
scaling when ``normalized`` is set. Shape words: ``fan_in = rows``, ``fan_out = cols``.

>>> import jax.numpy as jnp
>>> m = jnp.array([[3.0, 0.0], [0.0, -2.0]])
>>> spectral_exact(m).tolist()
[[1.0, 0.0], [0.0, -1.0]]
>>> float(dual_norm(m, "spectral"))   # nuclear norm
5.0
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from curvplan.modules import _linalg
from curvplan.modules._linalg import mm as _mm
from curvplan.modules._linalg import symmetrize

NormName = Literal["frobenius", "sign", "spectral", "spectral_conv", "colnorm", "rownorm", "bias_rms"]

STANDARD_NS = (3.4445, -4.7750, 2.0315)
"""Keller Jordan's quintic Newton-Schulz coefficients (used for every iteration)."""

_PE_RAW = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
POLAR_EXPRESS = tuple((a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in _PE_RAW[:-1]) + (_PE_RAW[-1],)
"""Per-iteration Polar Express coefficients (Amsel et al., arXiv 2505.16932, degree 5, safety factor 1.01 on
all but the last polynomial). Iterations beyond 8 repeat the last one."""

NS_PRESETS = {"standard": STANDARD_NS, "polar_express": POLAR_EXPRESS}


def ns_schedule(coeffs: str | tuple, steps: int) -> np.ndarray:
    """``(steps, 3)`` coefficients for a preset name or explicit ``(a, b, c)`` / per-iteration tuples."""
    c = np.asarray(NS_PRESETS[coeffs] if isinstance(coeffs, str) else coeffs, dtype=np.float64)
    if c.ndim == 1:
        return np.tile(c, (steps, 1))
    if len(c) >= steps:
        return c[:steps]
    return np.concatenate([c, np.tile(c[-1], (steps - len(c), 1))])


def newton_schulz(
    x: jax.Array, coeffs: str | tuple = "standard", steps: int = 5, eps: float = 1e-8
) -> jax.Array:
    """Approximate polar factor ``U Vᵀ`` of a matrix or a stack ``(S, rows, cols)`` (batched in one call).

    Normalises by the Frobenius norm (``+eps``), then iterates ``X ← aX + (bA + cA²)X`` with ``A = XXᵀ`` on
    the wide orientation, as `optax.contrib.muon` does (so results agree with it to float rounding).

    >>> import jax.numpy as jnp
    >>> s = jnp.linalg.svd(newton_schulz(jnp.diag(jnp.array([1.0, 0.5])), "polar_express", 8), compute_uv=False)
    >>> bool(jnp.all(jnp.abs(s - 1) < 0.05))
    True
    """
    if x.ndim == 2:
        return newton_schulz(x[None], coeffs, steps, eps)[0]
    sched = jnp.asarray(ns_schedule(coeffs, steps), x.dtype)
    wide = x.shape[-2] <= x.shape[-1]
    if not wide:
        x = jnp.swapaxes(x, -1, -2)
    x = x / (jnp.linalg.norm(x, axis=(-2, -1), keepdims=True) + eps)
    for i in range(steps):
        a_, b_, c_ = sched[i]
        a = x @ jnp.swapaxes(x, -1, -2)
        x = a_ * x + (b_ * a + c_ * a @ a) @ x
    return x if wide else jnp.swapaxes(x, -1, -2)


def _gram_eigh(m: jax.Array):
    """Eigen-decomposition of the smaller Gram of ``m`` (symmetrised, eigenvalues clipped at 0) -> (w, V, tall)."""
    tall = m.shape[-2] >= m.shape[-1]
    mt = jnp.swapaxes(m, -1, -2)
    g = _mm(mt, m) if tall else _mm(m, mt)
    w, v = _linalg.eigh(symmetrize(g))
    return jnp.maximum(w, 0.0), v, tall


def schatten_exact(m: jax.Array, inv_p: jax.Array | float, floor: float = 1e-12) -> jax.Array:
    """Unscaled ``Φ_p(M) = U Σ^{1/p} Vᵀ = M (MᵀM)^{(1/p - 1)/2}`` by eigh of the smaller Gram.

    ``inv_p = 1/p`` may be traced (0 is p = ∞: the polar factor). Directions whose eigenvalue is below
    ``floor · λ_max`` are dropped (their singular values are treated as 0).

    >>> import jax.numpy as jnp
    >>> schatten_exact(jnp.diag(jnp.array([4.0, 1.0])), 0.5).tolist()
    [[2.0, 0.0], [0.0, 1.0]]
    """
    w, v, tall = _gram_eigh(m)
    keep = w > floor * jnp.max(w, axis=-1, keepdims=True)
    safe = jnp.where(keep, w, 1.0)
    f = jnp.where(keep, safe ** ((jnp.asarray(inv_p, m.dtype) - 1.0) / 2.0), 0.0)
    core = _mm(v * f[..., None, :], jnp.swapaxes(v, -1, -2))
    return _mm(m, core) if tall else _mm(core, m)


def spectral_exact(m: jax.Array) -> jax.Array:
    """``U Vᵀ`` of the reduced SVD (exact polar factor; zero singular values map to 0)."""
    u, s, vt = _linalg.svd(m)
    nz = (s > 1e-12 * jnp.max(s, axis=-1, keepdims=True)).astype(m.dtype)
    return _mm(u * nz[..., None, :], vt)


def schatten_norm(s: jax.Array, r: jax.Array | float) -> jax.Array:
    """``(Σ sᵢ^r)^{1/r}`` of nonnegative values ``s`` along the last axis (``r = inf``: max), stable in r."""
    r = jnp.asarray(r, s.dtype)
    top = jnp.max(s, axis=-1)
    safe_top = jnp.where(top > 0, top, 1.0)
    z = s / safe_top[..., None]
    finite_r = jnp.where(jnp.isinf(r), 1.0, r)
    val = safe_top * jnp.sum(z**finite_r, axis=-1) ** (1.0 / finite_r)
    return jnp.where(jnp.isinf(r), top, jnp.where(top > 0, val, 0.0))


def schatten_lmo(
    m: jax.Array, p: float, method: Literal["exact", "newton_schulz"] = "exact", steps: int = 5
) -> jax.Array:
    """Unit ``S_{p+1}``-ball maximiser of ``<m, ·>``: ``U Σ^{1/p} Vᵀ / ‖M‖_{S_{1+1/p}}^{1/p}`` (p = ∞: ``U Vᵀ``).

    Its inner product with ``m`` is the dual norm ``‖M‖_{S_{1+1/p}}``.
    """
    inv_p = 0.0 if math.isinf(p) else 1.0 / p
    raw = schatten_exact(m, inv_p) if method == "exact" else schatten_ns(m, p, steps)
    s = _linalg.svd(m, compute_uv=False)
    return raw / jnp.maximum(schatten_norm(s, 1.0 + inv_p), 1e-30) ** inv_p


# -- Newton-Schulz iteration for fractional powers (§7.6(d)) ----------------------------------------------
def refit_coefficients(e: jax.Array) -> jax.Array:
    """Least-squares quintic ``αx + βx³ + γx⁵ ≈ x^e`` on [0, 1] with ``α+β+γ = 1`` (the KKT system of §7.6(d))."""
    e = jnp.asarray(e, jnp.result_type(float))
    k = jnp.array(
        [
            [1 / 3, 1 / 5, 1 / 7, 1.0],
            [1 / 5, 1 / 7, 1 / 9, 1.0],
            [1 / 7, 1 / 9, 1 / 11, 1.0],
            [1.0, 1.0, 1.0, 0.0],
        ],
        e.dtype,
    )
    rhs = jnp.stack([1 / (e + 2), 1 / (e + 4), 1 / (e + 6), jnp.ones_like(e)])
    return jnp.linalg.solve(k, rhs)[:3]


def power_sigma_max(m: jax.Array, iters: int = 20) -> jax.Array:
    """σ_max(m) by power iteration on mᵀm (deterministic start: the all-ones vector plus a ramp)."""
    n = m.shape[-1]
    v = jnp.ones((n,), m.dtype) + jnp.linspace(0.0, 1.0, n, dtype=m.dtype)

    def body(_, v):
        v = _mm(m.T, _mm(m, v))
        return v / (jnp.linalg.norm(v) + 1e-30)

    v = jax.lax.fori_loop(0, iters, body, v)
    return jnp.linalg.norm(_mm(m, v))


def schatten_upper_bound(m: jax.Array) -> jax.Array:
    """``‖m‖_{S_16} = ‖(mᵀm)⁴‖_F^{1/8}`` of a 2-D ``m`` (Gram of the smaller side), never below σ_max.

    Within ``r^{1/16}`` of σ_max for rank r (against ``√r`` for ‖m‖_F). Computed on ``m`` scaled to unit
    Frobenius norm (after a max-abs scaling), so that no power of it overflows or underflows in float32.
    """
    amax = jnp.maximum(jnp.max(jnp.abs(m)), 1e-30)
    fro = jnp.maximum(jnp.linalg.norm(m / amax), 1.0)  # ≥ 1 unless m = 0
    x = m / (amax * fro)
    g = _mm(x.T, x) if m.shape[0] >= m.shape[1] else _mm(x, x.T)
    g = _mm(g, g)
    return amax * fro * jnp.linalg.norm(_mm(g, g)) ** 0.125


def schatten_ns(m: jax.Array, p: jax.Array | float, steps: int = 5) -> jax.Array:
    """``U Σ^{1/p} Vᵀ`` approximated by ``steps`` refitted quintic iterations (exponent ``p^{-1/steps}`` each).

    The matrix is normalised by `schatten_upper_bound` (≥ σ_max, as the iteration needs, and much closer to it
    than ‖·‖_F, §8.6) and the result is rescaled by that bound to the power ``1/p``. Accuracy is limited: see
    ``tests/modules/test_geometry_maps.py`` for the measured error; `schatten_exact` is the default path.
    """
    p = jnp.asarray(p, m.dtype)
    inv_p = jnp.where(jnp.isinf(p), 0.0, 1.0 / p)
    e = jnp.maximum(inv_p, 1.0 / 1024) ** (
        1.0 / steps
    )  # the fit degenerates at e = 0: p = ∞ runs as p = 1024
    a, b, c = refit_coefficients(e).astype(m.dtype)
    scale = jnp.maximum(schatten_upper_bound(m), 1e-30)
    x = m / scale
    for _ in range(steps):
        g = _mm(x.T, x)
        x = a * x + _mm(x, b * g + c * _mm(g, g))
    return x * scale**inv_p


# -- the LMO table of §7.1 (flax layout: rows = d_in = fan_in, cols = d_out = fan_out) --------------------
def _conv_as_matrix(m):
    """A (kh, kw, c_in, c_out) flax kernel as the (kh·kw·c_in, c_out) matrix it multiplies patches with."""
    return m.reshape(-1, m.shape[-1])


def lmo(
    m: jax.Array,
    norm: NormName,
    *,
    normalized: bool = True,
    ns: str | tuple | None = "standard",
    ns_steps: int = 5,
    eps: float = 1e-8,
) -> jax.Array:
    """Direction ``dir(m)`` of §7.1 for one parameter (the update is ``-lr · radius · dir``).

    Args:
        m: the (momentum of the) gradient of one leaf, flax layout.
        norm: ``frobenius``, ``sign`` (ℓ∞), ``spectral`` (2-D), ``spectral_conv`` (4-D, (kh, kw, in, out)),
            ``colnorm`` / ``rownorm`` (Scion's names, PyTorch layout: ColNorm normalises each input feature,
            RowNorm each output unit), ``bias_rms``.
        normalized: apply Scion's shape scalings (√(fan_out/fan_in) spectral, 1/fan_in sign and colnorm, ...).
        ns: Newton-Schulz preset / coefficients for ``spectral``; ``None`` is the exact SVD polar factor.
    """
    polar = (lambda x: spectral_exact(x)) if ns is None else (lambda x: newton_schulz(x, ns, ns_steps))
    if norm == "frobenius":
        return m / (jnp.linalg.norm(m) + eps)
    if norm == "sign":
        return jnp.sign(m) / (m.shape[0] if normalized and m.ndim >= 2 else 1)
    if norm == "bias_rms":
        return m / (jnp.sqrt(jnp.mean(m**2)) + eps)
    if norm == "spectral":
        fan_in, fan_out = m.shape
        return polar(m) * (math.sqrt(fan_out / fan_in) if normalized else math.sqrt(fan_out))
    if norm == "spectral_conv":
        kh, kw, c_in, c_out = m.shape
        return polar(_conv_as_matrix(m)).reshape(m.shape) * math.sqrt(c_out / c_in) / (kh * kw)
    if norm == "colnorm":  # Scion's ColNorm: each input feature (a PyTorch column = a flax row) to RMS 1
        fan_in, fan_out = m.shape
        d = m / (jnp.linalg.norm(m, axis=1, keepdims=True) / math.sqrt(fan_out) + eps)
        return d / fan_in if normalized else d
    if (
        norm == "rownorm"
    ):  # Scion's RowNorm: each output unit (a PyTorch row = a flax column) to norm 1/√fan_in
        fan_in = m.shape[0]
        return m / (
            jnp.linalg.norm(m, axis=0, keepdims=True) * (math.sqrt(fan_in) if normalized else 1.0) + eps
        )
    raise ValueError(f"unknown norm {norm!r}")


def dual_norm(m: jax.Array, norm: NormName, *, normalized: bool = True) -> jax.Array:
    """``max <m, D>`` over the unit ball whose maximiser `lmo` returns (exact SVD for spectral norms)."""
    if norm == "frobenius":
        return jnp.linalg.norm(m)
    if norm == "sign":
        return jnp.sum(jnp.abs(m)) / (m.shape[0] if normalized and m.ndim >= 2 else 1)
    if norm == "bias_rms":
        return jnp.sqrt(m.size) * jnp.linalg.norm(m)
    if norm == "spectral":
        fan_in, fan_out = m.shape
        return jnp.sum(_linalg.svd(m, compute_uv=False)) * (
            math.sqrt(fan_out / fan_in) if normalized else math.sqrt(fan_out)
        )
    if norm == "spectral_conv":
        kh, kw, c_in, c_out = m.shape
        return (
            jnp.sum(_linalg.svd(_conv_as_matrix(m), compute_uv=False))
            * math.sqrt(c_out / c_in)
            / (kh * kw)
        )
    if norm == "colnorm":
        fan_in, fan_out = m.shape
        return jnp.sum(jnp.linalg.norm(m, axis=1)) * math.sqrt(fan_out) / (fan_in if normalized else 1)
    if norm == "rownorm":
        fan_in = m.shape[0]
        return jnp.sum(jnp.linalg.norm(m, axis=0)) / (math.sqrt(fan_in) if normalized else 1.0)
    raise ValueError(f"unknown norm {norm!r}")


def auto_norm(shape: tuple[int, ...]) -> NormName:
    """Scion's "auto" rule: 2-D ``spectral``, 4-D ``spectral_conv``, anything else ``bias_rms``."""
    return {2: "spectral", 4: "spectral_conv"}.get(len(shape), "bias_rms")
