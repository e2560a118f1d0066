"""Geometry / LMO modules (ALGORITHMS.md §7): LMO maps, Muon, Scion, adaptive Schatten-p."""

from curvplan.modules.geometry import _presets as presets
from curvplan.modules.geometry._adaptive import (
    SchattenCriterion,
    SchattenDirection,
    best_inv_p,
    log_criterion,
    schatten_inv_p,
)
from curvplan.modules.geometry._lmo import LMODirection, leaf_keys, stacked_map
from curvplan.modules.geometry._maps import (
    NS_PRESETS,
    POLAR_EXPRESS,
    STANDARD_NS,
    dual_norm,
    lmo,
    newton_schulz,
    refit_coefficients,
    schatten_exact,
    schatten_lmo,
    schatten_norm,
    schatten_ns,
    spectral_exact,
)
from curvplan.modules.geometry._muon import MuonDirection

__all__ = [
    "NS_PRESETS",
    "POLAR_EXPRESS",
    "STANDARD_NS",
    "LMODirection",
    "MuonDirection",
    "SchattenCriterion",
    "SchattenDirection",
    "best_inv_p",
    "dual_norm",
    "leaf_keys",
    "lmo",
    "log_criterion",
    "newton_schulz",
    "presets",
    "refit_coefficients",
    "schatten_exact",
    "schatten_inv_p",
    "schatten_lmo",
    "schatten_norm",
    "schatten_ns",
    "spectral_exact",
    "stacked_map",
]
