"""Update transforms: combine directions, and turn a direction into the step's ``%update``."""

from curvplan.modules.transforms._combine import Combine as Combine
from curvplan.modules.transforms._lookahead import Lookahead as Lookahead
from curvplan.modules.transforms._quadratic import QuadraticStep as QuadraticStep
from curvplan.modules.transforms._tail import UpdateTail as UpdateTail
