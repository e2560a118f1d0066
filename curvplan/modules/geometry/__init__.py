"""Geometry / LMO modules (docs/math.md §7): LMO maps, Muon, Scion, adaptive Schatten-p."""

from curvplan.modules.geometry._adaptive import SchattenCriterion as SchattenCriterion
from curvplan.modules.geometry._adaptive import SchattenDirection as SchattenDirection
from curvplan.modules.geometry._adaptive import best_inv_p as best_inv_p
from curvplan.modules.geometry._adaptive import log_criterion as log_criterion
from curvplan.modules.geometry._adaptive import schatten_inv_p as schatten_inv_p
from curvplan.modules.geometry._lmo import LMODirection as LMODirection
from curvplan.modules.geometry._lmo import leaf_keys as leaf_keys
from curvplan.modules.geometry._maps import NS_PRESETS as NS_PRESETS
from curvplan.modules.geometry._maps import POLAR_EXPRESS as POLAR_EXPRESS
from curvplan.modules.geometry._maps import STANDARD_NS as STANDARD_NS
from curvplan.modules.geometry._maps import dual_norm as dual_norm
from curvplan.modules.geometry._maps import lmo as lmo
from curvplan.modules.geometry._maps import newton_schulz as newton_schulz
from curvplan.modules.geometry._maps import refit_coefficients as refit_coefficients
from curvplan.modules.geometry._maps import schatten_exact as schatten_exact
from curvplan.modules.geometry._maps import schatten_lmo as schatten_lmo
from curvplan.modules.geometry._maps import schatten_norm as schatten_norm
from curvplan.modules.geometry._maps import schatten_ns as schatten_ns
from curvplan.modules.geometry._maps import spectral_exact as spectral_exact
from curvplan.modules.geometry._muon import MuonDirection as MuonDirection
