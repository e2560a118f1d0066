"""Geometry presets: `muon`, `scion`, `adaptive_schatten`, `muadam` (plain module lists).

>>> import curvplan as cp
>>> from curvplan.modules import presets
>>> print(cp.compile_plan(presets.muon(), name="muon"))  # doctest: +ELLIPSIS
plan muon: 1 phase, period 1
phase 0 @every(1) [value_and_grad]
...
"""

from __future__ import annotations

from typing import Any

from curvplan.modules._base import Module
from curvplan.modules.geometry._adaptive import SchattenCriterion, SchattenDirection
from curvplan.modules.geometry._lmo import LMODirection
from curvplan.modules.geometry._muon import MuonDirection
from curvplan.modules.transforms import UpdateTail


def muon(
    learning_rate: Any = 0.02,
    *,
    beta: float = 0.95,
    nesterov: bool = True,
    ns: str = "standard",
    ns_steps: int = 5,
    weight_decay: float = 0.0,
    adam_b1: float = 0.9,
    adam_b2: float = 0.999,
    adam_weight_decay: float = 0.0,
    adam_lr_ratio: float = 1.0,
    adam_keys: tuple[str, ...] = (),
    param_labels=None,
) -> list[Module]:
    """Muon on 2-D leaves, AdamW on the others (and on leaves whose key path contains one of ``adam_keys``).

    With the defaults it is `optax.contrib.muon(learning_rate)`.
    """
    return [
        MuonDirection(
            beta=beta,
            nesterov=nesterov,
            ns=ns,
            ns_steps=ns_steps,
            weight_decay=weight_decay,
            adam_b1=adam_b1,
            adam_b2=adam_b2,
            adam_weight_decay=adam_weight_decay,
            adam_lr_ratio=adam_lr_ratio,
            adam_keys=adam_keys,
            param_labels=param_labels,
        ),
        UpdateTail(learning_rate=learning_rate, source="muon"),
    ]


def scion(
    learning_rate: Any = 2.0**-12,
    *,
    radius: float = 50.0,
    head_keys: tuple[str, ...] = ("head",),
    head_radius: float | None = None,
    embed_keys: tuple[str, ...] = ("embed",),
    beta: float = 0.9,
    constrained: bool = False,
    ns: str = "standard",
) -> list[Module]:
    """Scion (LIONS-EPFL): spectral norm on hidden matrices (bias_rms on vectors), sign on the output head
    (radius ``radius·60`` by default), colnorm on embeddings; momentum α = 1 − ``beta`` (Scion's 0.1).

    ``constrained=True`` is the Frank-Wolfe variant.
    """
    head_radius = radius * 60 if head_radius is None else head_radius
    rules = tuple((k, "sign", head_radius) for k in head_keys) + tuple(
        (k, "colnorm", radius) for k in embed_keys
    )
    return [
        LMODirection(norm="auto", radius=radius, rules=rules, beta=beta, constrained=constrained, ns=ns),
        UpdateTail(learning_rate=learning_rate, source="lmo"),
    ]


def adaptive_schatten(
    learning_rate: Any = 0.02,
    *,
    every: int = 100,
    beta: float = 0.95,
    precondition: str = "none",
    method: str = "exact",
    max_dim: int = 512,
    ema: float = 0.9,
    vectors: str = "adam",
    report_layers: tuple[str, ...] = (),
) -> list[Module]:
    """Per-layer Schatten-p geometry chosen from gradient and activation spectra every ``every`` steps (§7.6).

    Needs the ``layer_io`` provider (layer inputs) on criterion steps; its other steps run a plain gradient.
    """
    return [
        SchattenCriterion(every=every, max_dim=max_dim, ema=ema, report_layers=report_layers),
        SchattenDirection(beta=beta, precondition=precondition, method=method, vectors=vectors),
        UpdateTail(learning_rate=learning_rate, source="schatten"),
    ]


def muadam(
    learning_rate: Any = 1e-3,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> list[Module]:
    """MuAdam: ``D ⊙ UVᵀ(D ⊙ m̂)`` with ``D = (√v̂ + eps)^{−1/2}`` on matrices, Adam on vectors (§7.6 (ii))."""
    return [
        SchattenDirection(fixed_p="inf", beta=b1, b2=b2, eps=eps, nesterov=nesterov, precondition="adam"),
        UpdateTail(learning_rate=learning_rate, source="schatten", weight_decay=weight_decay),
    ]
