"""Checkpoints of optimizer state, tied to the plan that made them by its fingerprint.

A checkpoint is one ``.npz`` file: the state's (and optionally the parameters') arrays, and a JSON record of the
plan (fingerprint, text, serialized modules), the structure, and a CRC-32 of every array. Writing is atomic
(a temporary file, fsynced, renamed over the target, the folder fsynced), and every way a load can fail raises
`CheckpointError` naming the file (and the leaf).
"""

from __future__ import annotations

import json
import os
import tempfile
import zlib
from typing import Any

import jax
import numpy as np

from curvplan.ir._diff import diff_plans
from curvplan.ir._errors import CheckpointError
from curvplan.planner import Plan

_FORMAT = "curvplan.checkpoint/1"


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).tobytes()) & 0xFFFFFFFF


def save(path: str | os.PathLike, state: Any, plan: Plan, *, params: Any = None) -> None:
    """Writes ``state`` (and optionally ``params``) to ``path`` (a ``.npz`` file), atomically.

    The file records the plan's fingerprint, text and modules so that `restore` can refuse (or, with
    ``strict=False``, explain) a state from another plan, and a checksum of every array.
    """
    arrays = {f"s{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state))}
    meta = {"format": _FORMAT, "fingerprint": plan.fingerprint, "plan": str(plan), "plan_dict": plan.to_dict(),
            "state_structure": str(jax.tree.structure(state)), "has_params": params is not None}
    if params is not None:
        arrays.update({f"p{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(params))})
        meta["params_structure"] = str(jax.tree.structure(params))
    meta["crc32"] = {k: _crc(a) for k, a in arrays.items()}
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".curvplan-", suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        try:  # the rename itself is durable once the folder is synced (not possible on every platform)
            dfd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def restore(path: str | os.PathLike, plan: Plan, like_state: Any, like_params: Any = None, *, strict: bool = True,
            cast: bool = False):
    """Reads a checkpoint written by `save` into the structure of ``like_state`` (from ``opt.init(params)``).

    Args:
        path: the file `save` wrote.
        plan: the plan of the optimizer the state is for.
        like_state: a state of the right structure, e.g. ``opt.init(params)``.
        like_params: give it to restore the saved parameters too.
        strict: refuse a checkpoint written by another plan. With ``strict=False`` a plan that differs (a
            learning rate, a name) is accepted when the state's structure, shapes and dtypes are the same, and
            what changed is printed.
        cast: accept arrays saved in another dtype (cast to ``like_state``'s); refused otherwise.

    Returns:
        ``state``, or ``(state, params)`` when ``like_params`` is given.

    Raises:
        CheckpointError: the file is missing, unreadable or corrupt (checksum), was written by another plan, or
            its structure, shapes or dtypes do not match; the message names the file and the leaf.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}", where=path, fix="check the path (save with `cp.save`)")
    try:
        with np.load(path, allow_pickle=False) as z:
            files = {k: z[k] for k in z.files}
        meta = json.loads(bytes(files.pop("__meta__")).decode())
    except Exception as e:  # zipfile, zlib, numpy and json each fail their own way on a damaged file
        raise CheckpointError(f"{path} is not a readable curvplan checkpoint ({type(e).__name__}: {e})", where=path,
                              fix="pass a file written by `curvplan.save`; this one is truncated or corrupt") from e
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise CheckpointError(f"{path} is not a curvplan checkpoint", where=path,
                              fix="pass a file written by `curvplan.save`")
    for k, want in meta.get("crc32", {}).items():
        if k not in files or _crc(files[k]) != want:
            raise CheckpointError(f"checkpoint {path} is corrupt: array {k} does not match its checksum", where=path,
                                  fix="restore an earlier checkpoint; this file was damaged after it was written")
    if meta["fingerprint"] != plan.fingerprint:
        if strict:
            raise CheckpointError(
                f"checkpoint {path} was written by plan {meta['fingerprint']}, not this plan ({plan.fingerprint})",
                where=f"{path}; its plan starts: {meta['plan'].splitlines()[0]!r}",
                fix="restore into an optimizer built from the same modules, start a fresh state, or pass "
                    "`strict=False` to accept a plan whose state layout is the same",
            )
        print(f"curvplan.restore: {path} was written by another plan; what changed:\n{_plan_change(meta, plan)}")
    state = _rebuild(files, meta, "s", like_state, meta["state_structure"], path, cast)
    if like_params is None:
        return state
    if not meta["has_params"]:
        raise CheckpointError("checkpoint holds no params", where=path, fix="save with `params=`")
    return state, _rebuild(files, meta, "p", like_params, meta.get("params_structure"), path, cast)


def _plan_change(meta: dict, plan: Plan) -> str:
    try:
        return str(diff_plans(Plan.from_dict(meta["plan_dict"]), plan))
    except Exception:  # a checkpoint from before plan_dict was stored, or modules that are not importable
        import difflib

        return "\n".join(difflib.unified_diff(meta["plan"].splitlines(), str(plan).splitlines(), "saved", "now",
                                              lineterm=""))


def _rebuild(files: dict, meta: dict, prefix: str, like: Any, structure: str | None, path: str, cast: bool):
    treedef = jax.tree.structure(like)
    what = "state" if prefix == "s" else "params"
    if str(treedef) != structure:
        raise CheckpointError(f"the checkpoint's {what} structure does not match", where=path,
                              fix=f"build the {what} like the saved one (`opt.init(params)` for the same model)")
    leaves = []
    for i, (p, x) in enumerate(jax.tree_util.tree_flatten_with_path(like)[0]):
        arr, want = files[f"{prefix}{i}"], np.asarray(x) if not hasattr(x, "dtype") else x
        key = f"{what}{jax.tree_util.keystr(p)}"
        if tuple(arr.shape) != tuple(want.shape):
            raise CheckpointError(f"{key} has shape {tuple(arr.shape)} in the checkpoint, {tuple(want.shape)} here",
                                  where=f"{path}, {key}", fix="restore into a state built for the same model")
        if arr.dtype != np.dtype(want.dtype) and not cast:
            raise CheckpointError(f"{key} is {arr.dtype} in the checkpoint, {np.dtype(want.dtype)} here",
                                  where=f"{path}, {key}", fix="pass `cast=True` to convert it")
        sharding = getattr(x, "sharding", None)  # onto the like state's devices: another mesh restores too
        leaves.append(jax.device_put(arr.astype(want.dtype), sharding) if sharding is not None
                      else jax.numpy.asarray(arr, dtype=want.dtype))
    return jax.tree.unflatten(treedef, leaves)
