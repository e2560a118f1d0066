"""The module library, grouped by role. Every module is a frozen pydantic model with ``init`` / ``apply``.

Each family package re-exports its names (one line each); this package re-exports every family, so a new
module is its own file plus one line in its family's ``__init__.py``.
"""

from curvplan.modules import curvature, damping, estimators, geometry, preconditioners, solvers, transforms
from curvplan.modules._base import Context, Inputs, LinearOperator, Module
from curvplan.modules.curvature import *  # noqa: F403
from curvplan.modules.damping import *  # noqa: F403
from curvplan.modules.estimators import *  # noqa: F403
from curvplan.modules.geometry import *  # noqa: F403
from curvplan.modules.preconditioners import *  # noqa: F403
from curvplan.modules.solvers import *  # noqa: F403
from curvplan.modules.transforms import *  # noqa: F403

_FAMILIES = (curvature, damping, estimators, geometry, preconditioners, solvers, transforms)
__all__ = ["Context", "Inputs", "LinearOperator", "Module"] + sorted(
    name for fam in _FAMILIES for name in vars(fam) if not name.startswith("_")
    and not isinstance(vars(fam)[name], type(curvature))
)
