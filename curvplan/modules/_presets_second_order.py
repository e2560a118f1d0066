"""Second-order presets (docs/math.md §5): plain module lists with Somax v1's documented defaults.

Somax's default learning rate is 1.0 for every method (the direction carries the scale); tune it for the
diagonal methods (AdaHessian, Sophia), where 1.0 is rarely right.

>>> import curvplan as cp
>>> from curvplan.modules._presets_second_order import sophia_h
>>> plan = cp.compile_plan(sophia_h(learning_rate=1e-3), name="sophia_h")
>>> plan.phase_of(0), plan.phase_of(3)
(0, 1)
"""

from __future__ import annotations

from typing import Any, Literal

from curvplan.modules import (
    GGN,
    ConstantDamping,
    DiagEMA,
    DiagonalDirection,
    Hessian,
    HutchinsonDiag,
    Module,
    UpdateTail,
)
from curvplan.modules.estimators._gnb import GNBDiag
from curvplan.modules.estimators._probes import HutchinsonProbes, HutchinsonTrace, ProbeDiag
from curvplan.modules.preconditioners._spatial import SpatialAverage
from curvplan.modules.solvers._direct import DenseDirect
from curvplan.modules.solvers._row import RowSpace

__all__ = ["newton_direct", "ggn_direct", "egn", "adahessian", "sophia_h", "sophia_g", "hutchinson_estimates"]


def _direct(curvature: Module, learning_rate, lam, method) -> list[Module]:
    return [curvature, ConstantDamping(lam=lam), DenseDirect(method=method),
            UpdateTail(learning_rate=learning_rate)]


def newton_direct(
    learning_rate: Any = 1.0, *, lam: float = 1.0, method: Literal["solve", "eigh"] = "solve"
) -> list[Module]:
    """Damped Newton with a dense solve: exact Hessian, constant λ, ``(H + λI)⁻¹g`` (small models only)."""
    return _direct(Hessian(), learning_rate, lam, method)


def ggn_direct(
    learning_rate: Any = 1.0,
    *,
    loss: Literal["mse", "ce"] = "ce",
    lam: float = 1.0,
    method: Literal["solve", "eigh"] = "solve",
) -> list[Module]:
    """Gauss-Newton with a dense solve: GGN for ``loss``, constant λ, ``(G + λI)⁻¹g`` (small models only)."""
    return _direct(GGN(loss=loss), learning_rate, lam, method)


def egn(
    learning_rate: Any = 1.0,
    *,
    loss: Literal["mse", "ce"] = "mse",
    solver: Literal["cholesky", "cg"] = "cholesky",
    lam: float = 1.0,
    tol: float = 1e-5,
    maxiter: int = 20,
    ce_factor: Literal["exact", "cholesky"] = "exact",
) -> list[Module]:
    """Exact Gauss-Newton (Somax's ``egn_mse`` / ``egn_ce`` / ``egn_mse_cg``): the GGN step solved in the
    B·C-dimensional row space by Woodbury, with the correct CE factorization (docs/math.md §8.1)."""
    return [
        RowSpace(loss=loss, solver=solver, tol=tol, maxiter=maxiter, ce_factor=ce_factor),
        ConstantDamping(lam=lam),
        UpdateTail(learning_rate=learning_rate),
    ]


def adahessian(
    learning_rate: Any = 0.15,
    *,
    beta1: float = 0.9,
    beta2: float = 0.99,
    hessian_power: float = 1.0,
    eps: float = 1e-8,
    probes: int = 1,
    hessian_every: int = 1,
    spatial_averaging: bool = True,
    weight_decay: float = 0.0,
    clip_norm: float | None = 1.0,
) -> list[Module]:
    """AdaHessian: Hutchinson diagonal of the Hessian, spatially averaged over flax conv kernel axes,
    ``v = EMA_β2(d²)`` bias-corrected by refresh count, ``s = m̂ / (v̂^(power/2) + eps)``.

    The defaults (learning rate 0.15, a fresh diagonal every step, β2 = 0.99, the update clipped to global
    norm 1) came from ``python -m benchmarks.sweep adahessian`` and ``adahessian_fine`` on the digits MLP:
    they reach AdamW's time-to-target loss in 180-220 steps on 3 of 3 seeds, where the paper's β2 = 0.999
    without clipping reached it on at most 2, and a diagonal refreshed every 10 steps on none (a stale
    single-probe diagonal lets the learning rates that make progress diverge)."""
    est = (("est", "hutchinson"), ("probes", probes))
    mods: list[Module] = [Hessian(), HutchinsonDiag(probes=probes)]
    if spatial_averaging:
        mods.append(SpatialAverage(estimate=est))
        est = est + (("spatial", "mean"),)
    return mods + [
        DiagEMA(beta=beta2, mode="adahessian", estimate=est, every=hessian_every),
        DiagonalDirection(beta1=beta1, mode="adahessian", power=hessian_power, eps=eps),
        UpdateTail(learning_rate=learning_rate, source="diag", weight_decay=weight_decay,
                   clip_norm=clip_norm),
    ]


def _sophia(estimator: Module, est, learning_rate, beta1, beta2, gamma, eps, hessian_every, weight_decay):
    return [
        estimator,
        DiagEMA(beta=beta2, mode="sophia", estimate=est, every=hessian_every),
        DiagonalDirection(beta1=beta1, mode="sophia", gamma=gamma, eps=eps),
        UpdateTail(learning_rate=learning_rate, source="diag", weight_decay=weight_decay),
    ]


def sophia_h(
    learning_rate: Any = 1.0,
    *,
    beta1: float = 0.965,
    beta2: float = 0.99,
    gamma: float = 0.01,
    eps: float = 1e-8,
    probes: int = 1,
    hessian_every: int = 10,
    weight_decay: float = 0.2,
) -> list[Module]:
    """Sophia-H: Hutchinson diagonal of the Hessian every ``hessian_every`` steps (the planner runs a plain
    ``value_and_grad`` in between), ``s = clip(m̂ / max(γ v̂, eps), ±1)``, decoupled weight decay, ``-lr``."""
    return [Hessian()] + _sophia(HutchinsonDiag(probes=probes), (("est", "hutchinson"), ("probes", probes)),
                                 learning_rate, beta1, beta2, gamma, eps, hessian_every, weight_decay)


def sophia_g(
    learning_rate: Any = 1.0,
    *,
    beta1: float = 0.965,
    beta2: float = 0.99,
    gamma: float = 0.05,
    eps: float = 1e-8,
    samples: int = 1,
    hessian_every: int = 10,
    weight_decay: float = 0.2,
) -> list[Module]:
    """Sophia-G: Gauss-Newton-Bartlett diagonal (sampled labels) every ``hessian_every`` steps, otherwise as
    `sophia_h` with γ = 0.05. Needs ``model_fn`` and ``loss=``."""
    return _sophia(GNBDiag(samples=samples), (("est", "gnb"), ("probes", samples)),
                   learning_rate, beta1, beta2, gamma, eps, hessian_every, weight_decay)


def hutchinson_estimates(probes: int = 1, *, diag: bool = True, trace: bool = True) -> list[Module]:
    """Hutchinson diagonal and / or trace of `%curv_op` from one shared batch of probes (add a curvature
    module and a consumer). The diagonal is the same quantity `HutchinsonDiag` produces."""
    mods: list[Module] = [HutchinsonProbes(probes=probes)]
    if diag:
        mods.append(ProbeDiag(probes=probes))
    if trace:
        mods.append(HutchinsonTrace(probes=probes))
    return mods
