"""Checkpoints of optimizer state, tied to the plan that made them by its fingerprint."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import jax
import numpy as np

from curvplan.ir._errors import CheckpointError
from curvplan.planner import Plan

_FORMAT = "curvplan.checkpoint/1"


def save(path: str | os.PathLike, state: Any, plan: Plan, *, params: Any = None) -> None:
    """Writes ``state`` (and optionally ``params``) to ``path`` (a ``.npz`` file), atomically.

    The file records the plan's fingerprint and text so that `restore` can refuse a state from another plan.
    """
    leaves = jax.tree.leaves(state)
    arrays = {f"s{i}": np.asarray(x) for i, x in enumerate(leaves)}
    meta = {"format": _FORMAT, "fingerprint": plan.fingerprint, "plan": str(plan),
            "state_structure": str(jax.tree.structure(state)), "has_params": params is not None}
    if params is not None:
        arrays.update({f"p{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(params))})
        meta["params_structure"] = str(jax.tree.structure(params))
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def restore(path: str | os.PathLike, plan: Plan, like_state: Any, like_params: Any = None):
    """Reads a checkpoint written by `save` into the structure of ``like_state`` (from ``opt.init(params)``).

    Returns ``state`` or ``(state, params)`` when ``like_params`` is given.

    Raises:
        CheckpointError: the file was written by another plan, or its structure does not match.
    """
    with np.load(os.fspath(path)) as z:
        meta = json.loads(bytes(z["__meta__"]).decode())
        if meta.get("format") != _FORMAT:
            raise CheckpointError(f"{path} is not a curvplan checkpoint", where=str(path),
                                  fix="pass a file written by `curvplan.save`")
        if meta["fingerprint"] != plan.fingerprint:
            raise CheckpointError(
                f"checkpoint {path} was written by plan {meta['fingerprint']}, not this plan ({plan.fingerprint})",
                where=f"{path}; its plan starts: {meta['plan'].splitlines()[0]!r}",
                fix="restore into an optimizer built from the same modules, or start a fresh state",
            )
        treedef = jax.tree.structure(like_state)
        if str(treedef) != meta["state_structure"]:
            raise CheckpointError("checkpoint state structure does not match", where=str(path),
                                  fix="build `like_state` with `opt.init(params)` for the same model")
        like = jax.tree.leaves(like_state)
        leaves = [_cast(z[f"s{i}"], x) for i, x in enumerate(like)]
        state = jax.tree.unflatten(treedef, leaves)
        if like_params is None:
            return state
        if not meta["has_params"]:
            raise CheckpointError("checkpoint holds no params", where=str(path), fix="save with `params=`")
        pdef = jax.tree.structure(like_params)
        params = jax.tree.unflatten(pdef, [_cast(z[f"p{i}"], x) for i, x in enumerate(jax.tree.leaves(like_params))])
        return state, params


def _cast(arr: np.ndarray, like: Any):
    like = np.asarray(like) if not hasattr(like, "dtype") else like
    if arr.shape != like.shape:
        raise CheckpointError(f"checkpoint array shape {arr.shape} != expected {like.shape}", where="restore")
    return jax.numpy.asarray(arr, dtype=like.dtype)
