"""Update transforms: combine directions, and turn a direction into the step's ``%update``."""

from curvplan.modules.transforms._combine import Combine
from curvplan.modules.transforms._tail import UpdateTail

__all__ = ["Combine", "UpdateTail"]
