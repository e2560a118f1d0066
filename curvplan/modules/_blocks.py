"""Per-block work (factorizations, roots, rotations, Newton-Schulz), batched by shape and spread over devices.

A module that does the same matrix work for many blocks hands it to ``ctx.blocks.map(fn, items)``. On one
device that is the plain loop. When the plan places the module's block work on a mesh (``Plan.placement``),
blocks of equal shape are stacked and ``fn`` runs under ``vmap`` inside ``jax.shard_map`` with the stack axis
split over the mesh axes, so each device factorizes only its share of the blocks. A stack that does not divide
evenly is padded with copies of its first block (their results are dropped). Results come back one per item,
in the items' order, gathered for their consumers.

>>> import jax.numpy as jnp
>>> from curvplan.modules._blocks import LOCAL
>>> out = LOCAL.map(lambda m: m @ m, [jnp.eye(2), 2 * jnp.eye(2), jnp.ones((3, 3))])
>>> [float(o[0, 0]) for o in out]
[1.0, 4.0, 3.0]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec


def constrain(x: Any, sharding: Any) -> Any:
    """Places a traced tree on ``sharding`` (one sharding, or a matching tree of them): ``jax.reshard`` on an
    explicit-axes mesh, ``with_sharding_constraint`` on an auto one (the two modes JAX has)."""

    context = jax.sharding.get_abstract_mesh()  # inside `auto_axes` an explicit mesh's axes read as Auto
    explicit = bool(context.axis_names) and all(t == AxisType.Explicit for t in context.axis_types)

    def one(leaf, s):
        if s is None:
            return leaf
        if explicit:
            return jax.reshard(leaf, s)
        return jax.lax.with_sharding_constraint(leaf, NamedSharding(auto_mesh(s.mesh), s.spec))

    if isinstance(sharding, NamedSharding):
        return jax.tree.map(lambda leaf: one(leaf, sharding), x)
    return jax.tree.map(one, x, sharding, is_leaf=lambda s: s is None or isinstance(s, NamedSharding))


def auto_mesh(mesh: Any) -> Any:
    """``mesh`` with every axis of type Auto (what GSPMD's propagation and ``with_sharding_constraint`` use)."""
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return mesh.update(axis_types=(AxisType.Auto,) * len(mesh.axis_names))


@dataclasses.dataclass(frozen=True)
class BlockMap:
    """Where a module's block work runs: ``mesh`` and the ``axes`` its stacks are split over (none: locally).

    Attributes:
        mesh: a ``jax.sharding.Mesh``, or ``None`` to run every block on every device (one device, no plan
            placement).
        axes: mesh axes the stack axis is split over (their sizes multiply to the share count).
    """

    mesh: Any = None
    axes: tuple[str, ...] = ()

    @property
    def shares(self) -> int:
        """How many devices split each stack (1: local)."""
        return 1 if self.mesh is None else math.prod(self.mesh.shape[a] for a in self.axes)

    def map(self, fn: Callable, items: Sequence[Any], statics: Sequence[Hashable] | None = None) -> list[Any]:
        """``[fn(item) for item in items]``; when placed, one ``vmap``-ed call per group of equal shapes.

        Args:
            fn: maps one item (a tree of arrays) to a tree of arrays. With ``statics`` it is called as
                ``fn(item, static)``.
            items: trees of arrays; items with the same structure, shapes and dtypes (and static) share a call.
            statics: optional hashable per item (a padding width, a flag) that ``fn`` needs as a Python value.
        """
        statics = [None] * len(items) if statics is None else list(statics)
        if len(statics) != len(items):
            raise ValueError(f"BlockMap.map: {len(items)} items but {len(statics)} statics")
        if self.shares == 1:  # one device: the plain loop, the program a hand-written optimizer has
            return [fn(x) if st is None else fn(x, st) for x, st in zip(items, statics)]
        return self.map_stacked(lambda stack, st=None: jax.vmap(fn if st is None else (lambda x: fn(x, st)))(stack),
                                items, statics)

    def map_stacked(self, fn: Callable, items: Sequence[Any], statics: Sequence[Hashable] | None = None) -> list:
        """Like `map`, but ``fn(stack)`` (``fn(stack, static)``) takes a whole stack (a leading block axis) and
        returns one: a batched kernel (Newton-Schulz) runs once per shape even on one device."""
        statics = [None] * len(items) if statics is None else list(statics)
        groups: dict[Hashable, list[int]] = {}
        for i, (item, st) in enumerate(zip(items, statics)):
            leaves, treedef = jax.tree.flatten(item)
            key = (treedef, tuple((x.shape, jnp.result_type(x)) for x in leaves), st)
            groups.setdefault(key, []).append(i)
        out: list[Any] = [None] * len(items)
        for idx in groups.values():
            st = statics[idx[0]]
            group = [items[i] for i in idx]
            if self.shares > 1:  # whole blocks first: each device then takes its share of the stack locally
                group = constrain(group, NamedSharding(self.mesh, PartitionSpec()))
            stack = jax.tree.map(lambda *xs: jnp.stack(xs), *group)
            res = self._run(fn if st is None else (lambda s, st=st: fn(s, st)), stack, len(idx))
            for j, i in enumerate(idx):
                out[i] = jax.tree.map(lambda r, j=j: r[j], res)
        return out

    def _run(self, fn: Callable, stack: Any, n: int) -> Any:
        k = self.shares
        if k == 1:
            return fn(stack)
        pad = -n % k
        if pad:
            stack = jax.tree.map(lambda s: jnp.concatenate([s, jnp.repeat(s[:1], pad, axis=0)]), stack)
        spec = PartitionSpec(self.axes)
        stack = constrain(stack, NamedSharding(self.mesh, spec))
        res = jax.shard_map(fn, mesh=auto_mesh(self.mesh), in_specs=spec, out_specs=spec)(stack)
        # gathered for the per-block consumers (an explicit-axes mesh cannot slice a split axis)
        res = constrain(res, NamedSharding(self.mesh, PartitionSpec()))
        return jax.tree.map(lambda r: r[:n], res) if pad else res


LOCAL = BlockMap()
"""Block work on every device (one device, or a plan without placement)."""


@jax.tree_util.register_pytree_with_keys_class
class BlockStore:
    """Per-block state (key -> tuple of arrays) kept as one stack per shape and dtype.

    Blocks of the same shape (the Kronecker factors of equal layers, their inverses) live in one array with a
    leading block axis. The state rule (`Plan.placement`) then splits that axis over the devices, as it does
    any state entry's first dimension they divide: per-block arrays of an odd side (a factor with a
    homogeneous coordinate, ``d + 1``) could not be split on their own.

    >>> import jax.numpy as jnp
    >>> s = BlockStore.of({"a": (jnp.eye(3), jnp.ones(2)), "b": (2 * jnp.eye(3), jnp.zeros(2))})
    >>> sorted((k, v.shape) for k, v in s.stacks.items())
    [('float32[2]', (2, 2)), ('float32[3x3]', (2, 3, 3))]
    >>> float(s.blocks()["b"][0][1, 1])
    2.0
    """

    def __init__(self, stacks: dict[str, Any], index: tuple):
        self.stacks = stacks
        self.index = index  # ((key, ((stack name, row), ...)), ...): where each block's arrays live

    @classmethod
    def of(cls, blocks: dict[str, tuple]) -> BlockStore:
        """The store of ``blocks`` (key -> tuple of arrays), stacked by shape and dtype in key order."""
        members: dict[str, list] = {}
        index = []
        for key in sorted(blocks):
            where = []
            for x in blocks[key]:
                name = f"{jnp.dtype(x.dtype).name}[{'x'.join(map(str, x.shape))}]"
                members.setdefault(name, []).append(x)
                where.append((name, len(members[name]) - 1))
            index.append((key, tuple(where)))
        return cls({n: jnp.stack(xs) for n, xs in members.items()}, tuple(index))

    def blocks(self) -> dict[str, tuple]:
        """key -> the block's tuple of arrays (rows of the stacks)."""
        return {key: tuple(self.stacks[n][i] for n, i in where) for key, where in self.index}

    def tree_flatten_with_keys(self):
        names = tuple(sorted(self.stacks))
        return [(jax.tree_util.DictKey(n), self.stacks[n]) for n in names], (names, self.index)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(dict(zip(aux[0], children)), aux[1])

    def __repr__(self) -> str:
        return f"BlockStore({len(self.index)} blocks in {len(self.stacks)} stacks)"
