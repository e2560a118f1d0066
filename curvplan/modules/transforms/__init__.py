"""Update transforms: turn a direction into the parameter update."""

from curvplan.modules.transforms._tail import UpdateTail

__all__ = ["UpdateTail"]
