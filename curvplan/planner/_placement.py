"""Placement: where a plan's work runs on a device mesh, decided from what the plan knows (pure Python).

Given a mesh (axis name -> size), the plan records:

- the **batch axes**: the batch is split over them, so every provider (value and gradient, curvature products,
  layer statistics) computes exact means over the global batch, each device working on its rows;
- the **block axes**: every module that declares ``blockwise`` work (factorizations, roots, rotations,
  Newton-Schulz) has its same-shape blocks stacked and the stack split over these axes (all axes of size > 1),
  so no device does every block;
- the **state rule**: state shaped like a sharded parameter follows that parameter's sharding; other state
  (Kronecker factors, eigenbases, roots, moments of replicated parameters) is split over the block axes on its
  first dimension they divide.

A plan for 8 devices differs from the plan for 1 device only in these lines.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from curvplan.ir._errors import PlanError


@dataclass(frozen=True)
class Placement:
    """Where a plan runs on a mesh.

    Attributes:
        mesh: ``((axis, size), ...)`` in the mesh's order.
        batch_axes: axes the batch is split over.
        block_axes: axes the stacks of block work (and non-parameter-shaped state) are split over.
        blockwise: names of the modules whose block work is spread.
    """

    mesh: tuple[tuple[str, int], ...]
    batch_axes: tuple[str, ...]
    block_axes: tuple[str, ...]
    blockwise: tuple[str, ...]

    @property
    def devices(self) -> int:
        return math.prod(n for _, n in self.mesh)

    def shares(self, axes: Sequence[str]) -> int:
        """The number of devices splitting a value over ``axes``."""
        return math.prod(dict(self.mesh)[a] for a in axes)

    @property
    def summary(self) -> str:
        """One line: the mesh, the batch axes and the block axes with the modules whose work they split."""
        blocks = f"; blocks over ({', '.join(self.block_axes)}): {', '.join(self.blockwise)}" if self.blockwise else ""
        return f"mesh {self._mesh_text}; batch over ({', '.join(self.batch_axes)}){blocks}"

    @property
    def _mesh_text(self) -> str:
        return " ".join(f"{a}={n}" for a, n in self.mesh)

    def to_dict(self) -> dict[str, Any]:
        return {"mesh": [list(x) for x in self.mesh], "batch_axes": list(self.batch_axes)}

    def lines(self, provided: Sequence[str]) -> list[str]:
        """The plan text's placement section (``provided``: printed names of the provider outputs)."""
        def axes(a):
            return "(" + ", ".join(a) + ")" if a else "nowhere (one device)"

        out = [f"placement: mesh {self._mesh_text} ({self.devices} device{'s' * (self.devices != 1)})"]
        if provided:
            out.append(f"  batch over {axes(self.batch_axes)}: {', '.join(provided)} (means over the global batch)")
        if self.blockwise:
            out.append(f"  blocks over {axes(self.block_axes)}: {', '.join(self.blockwise)}")
        out.append(f"  state: shaped like a sharded parameter follows it; the rest split over {axes(self.block_axes)}")
        return out


def mesh_axes(mesh: Any) -> tuple[tuple[str, int], ...]:
    """``((axis, size), ...)`` of a ``jax.sharding.Mesh`` (its ``.shape``) or of a mapping axis -> size."""
    shape = mesh.shape if hasattr(mesh, "shape") and isinstance(mesh.shape, Mapping) else mesh
    if not isinstance(shape, Mapping) or not shape:
        raise PlanError(
            f"a mesh must be a `jax.sharding.Mesh` or a mapping of axis name to size, got {mesh!r}",
            where="compile_plan(mesh=...)",
            fix='pass `mesh=jax.make_mesh((8,), ("data",))` or `mesh={"data": 8}`',
        )
    out = []
    for a, n in shape.items():
        if not isinstance(a, str) or not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise PlanError(
                f"mesh axis {a!r} of size {n!r}: axis names are strings and sizes positive integers",
                where="compile_plan(mesh=...)",
                fix='pass e.g. `mesh={"data": 4, "model": 2}`',
            )
        out.append((a, n))
    return tuple(out)


def place(mesh: Any, batch_axes: str | Sequence[str] | None, blockwise: Sequence[str]) -> Placement:
    """The placement of a plan whose running ``blockwise`` modules are given, on ``mesh``.

    ``batch_axes`` defaults to ``"data"`` when the mesh has such an axis, else to the mesh's first axis.
    """
    axes = mesh_axes(mesh)
    names = [a for a, _ in axes]
    if batch_axes is None:
        batch = ("data",) if "data" in names else (names[0],)
    else:
        batch = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    unknown = [a for a in batch if a not in names]
    if unknown or not batch or len(set(batch)) != len(batch):
        raise PlanError(
            f"batch axes {batch!r} must be distinct axes of the mesh {dict(axes)}",
            where="compile_plan(batch_axes=...)",
            fix=f"name one or more of {names}",
        )
    block = tuple(a for a, n in axes if n > 1)
    return Placement(axes, batch, block, tuple(sorted(blockwise)) if block else ())
