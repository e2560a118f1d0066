"""Presets: documented module lists for known methods. Compose them further like any list.

>>> import curvplan as cp
>>> print(cp.compile_plan(cp.presets.gauss_newton_cg(loss="ce"), name="sgn"))  # doctest: +ELLIPSIS
plan sgn: 1 phase, period 1
phase 0 @every(1) [linearize_model]
  %ggn_op.ce, %grad, %loss = linearize_model(params, batch, rng)
...
"""

from __future__ import annotations

from typing import Any, Literal

from curvplan.modules import (
    CG,
    GGN,
    ConstantDamping,
    DiagEMA,
    DiagonalDirection,
    GainRatio,
    Hessian,
    HutchinsonDiag,
    Module,
    TrustRegionDamping,
    UpdateTail,
)
from curvplan.modules._presets_second_order import (
    adahessian,
    egn,
    ggn_direct,
    hutchinson_estimates,
    newton_direct,
    sophia_g,
    sophia_h,
)
from curvplan.modules.geometry._presets import adaptive_schatten, muadam, muon, scion
from curvplan.modules.preconditioners._kfac import kfac
from curvplan.modules.preconditioners._scao import scao_modules
from curvplan.modules.preconditioners._shampoo import shampoo
from curvplan.modules.preconditioners._soap import soap

__all__ = [
    "newton_cg", "newton_direct", "gauss_newton_cg", "egn", "ggn_direct", "adahessian", "adahessian_like",
    "sophia_h", "sophia_g", "levenberg_marquardt", "hessian_free", "hutchinson_estimates", "kfac",
    "shampoo", "soap", "scao_modules", "muon", "scion", "adaptive_schatten", "muadam",
]


RADIUS = 1.0
"""The CG presets' trust radius on ‖s‖ (see `benchmarks/sweep.py cg_radius` for how it was chosen)."""


def _cg_method(curvature: Module, learning_rate, lam, tol, maxiter, warm_start, radius, momentum, weight_decay,
               clip_norm):
    return [
        curvature,
        ConstantDamping(lam=lam),
        CG(tol=tol, maxiter=maxiter, warm_start=warm_start, radius=radius),
        UpdateTail(learning_rate=learning_rate, momentum=momentum, weight_decay=weight_decay, clip_norm=clip_norm),
    ]


def newton_cg(
    learning_rate: Any = 1.0,
    *,
    lam: float = 1.0,
    tol: float = 1e-5,
    maxiter: int = 20,
    warm_start: bool = True,
    radius: float | None = RADIUS,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    clip_norm: float | None = None,
) -> list[Module]:
    """Newton-CG: exact Hessian, constant damping λ, CG (stops on negative curvature), ``-lr·s``.

    ``radius`` bounds ‖s‖ (Steihaug-Toint CG, ``cg_radius_reached`` in the step info); None turns it off."""
    return _cg_method(Hessian(), learning_rate, lam, tol, maxiter, warm_start, radius, momentum, weight_decay,
                      clip_norm)


def gauss_newton_cg(
    learning_rate: Any = 1.0,
    *,
    loss: Literal["mse", "ce"] = "ce",
    lam: float = 0.1,
    tol: float = 1e-5,
    maxiter: int = 10,
    warm_start: bool = True,
    radius: float | None = RADIUS,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    clip_norm: float | None = None,
) -> list[Module]:
    """Gauss-Newton-CG (Somax's ``sgn_*``): GGN for ``loss``, constant damping λ, CG, ``-lr·s``.

    ``radius`` bounds ‖s‖ as in `newton_cg`. The defaults λ = 0.1 and 10 CG iterations came from ``python -m
    benchmarks.sweep gauss_newton_cg`` (and ``gauss_newton_cg_w4``): they reach AdamW's target on the digits
    MLP in 100-220 steps and on the least-squares workload in 50-100 (3 of 3 seeds each), where λ = 1 reached
    neither the first in 600 steps nor the second under 400; λ = 0.01 leaves the step to the radius and
    stalls. 20 iterations took the same number of steps on the MLP at 1.3x the time."""
    return _cg_method(GGN(loss=loss), learning_rate, lam, tol, maxiter, warm_start, radius, momentum, weight_decay,
                      clip_norm)


def adahessian_like(
    learning_rate: Any = 0.1, *, hessian_every: int = 10, probes: int = 1, beta1: float = 0.9, beta2: float = 0.999
) -> list[Module]:
    """Hutchinson diagonal of the Hessian refreshed every ``hessian_every`` steps, EMA'd, used as an
    AdaHessian-style diagonal preconditioner for gradient momentum (the full AdaHessian preset comes with
    the second-order library)."""
    return [
        Hessian(),
        HutchinsonDiag(probes=probes),
        DiagEMA(beta=beta2, mode="adahessian", every=hessian_every,
                estimate=(("est", "hutchinson"), ("probes", probes))),
        DiagonalDirection(beta1=beta1, mode="adahessian"),
        UpdateTail(learning_rate=learning_rate, source="diag"),
    ]


def levenberg_marquardt(
    learning_rate: Any = 1.0,
    *,
    loss: Literal["mse", "ce"] = "mse",
    lam0: float = 1.0,
    lam_min: float | None = None,
    rho_every: int = 1,
    tol: float = 1e-5,
    maxiter: int = 20,
    warm_start: bool = True,
) -> list[Module]:
    """Levenberg-Marquardt: GGN + CG + trust-region damping driven by the gain ratio ρ, measured every
    ``rho_every`` steps on the same batch (one extra forward and one GGN-vector product each time).

    λ never falls below ``lam_min`` (default ``lam0 / 10``). On minibatches the gain ratio is measured on the
    batch the step was fitted to, so it keeps approving smaller λ until one batch's step is far too long for
    the next: on the digits MLP a floor of 1e-12 diverges within 30 steps (test loss > 100 on both seeds
    tried), a floor of 0.1 trains on both. Give ``lam_min`` explicitly for a deterministic problem.

    >>> import curvplan as cp
    >>> print(cp.compile_plan(levenberg_marquardt(rho_every=5), name="lm"))  # doctest: +ELLIPSIS
    plan lm: 2 phases, period 5
    ...
    """
    return [
        GGN(loss=loss),
        TrustRegionDamping(lam0=lam0, lam_min=lam0 / 10 if lam_min is None else lam_min, every=rho_every),
        GainRatio(every=rho_every),
        CG(tol=tol, maxiter=maxiter, warm_start=warm_start),
        UpdateTail(learning_rate=learning_rate),
    ]


def hessian_free(
    learning_rate: Any = 1.0,
    *,
    loss: Literal["mse", "ce"] = "ce",
    lam0: float = 1.0,
    lam_min: float | None = None,
    rho_every: int = 5,
    maxiter: int = 50,
    tol: float = 5e-4,
    warm_start_decay: float = 0.95,
    precond_every: int = 10,
) -> list[Module]:
    """Hessian-free (Martens 2010) as a composition: GGN + preconditioned CG + Levenberg-Marquardt damping
    on ρ every ``rho_every`` steps + warm start from ζ times the previous solution. The CG preconditioner
    is an EMA of a Hutchinson estimate of diag(GGN), refreshed every ``precond_every`` steps (Martens used
    the empirical Fisher diagonal; this one shares the GGN linearization the step already has). λ is floored
    at ``lam_min`` (default ``lam0 / 10``), as in `levenberg_marquardt`.
    """
    return [
        GGN(loss=loss),
        HutchinsonDiag(probes=1, every=precond_every),
        DiagEMA(beta=0.95, mode="sophia", every=precond_every),
        TrustRegionDamping(lam0=lam0, lam_min=lam0 / 10 if lam_min is None else lam_min, every=rho_every),
        GainRatio(every=rho_every),
        CG(tol=tol, maxiter=maxiter, warm_start=True, warm_start_decay=warm_start_decay, precondition=True),
        UpdateTail(learning_rate=learning_rate),
    ]
