"""Checkpoints: every way a load fails is a `CheckpointError` naming the file (and leaf); ``strict=False`` accepts a
plan with the same state layout and prints what changed; corruption is caught by the stored checksums."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvplan as cp


def _setup(lr=0.02):
    params = {"w": jnp.ones((4, 3)) * 0.1, "b": jnp.zeros(3)}
    opt = cp.Optimizer(cp.presets.muon(lr), loss_fn=lambda p, b: jnp.sum((b @ p["w"] + p["b"]) ** 2))
    state = opt.init(params)
    params, state, _ = opt.step(params, state, jnp.ones((2, 4)))
    return opt, params, state


def test_missing_truncated_and_flipped_files(tmp_path):
    opt, params, state = _setup()
    with pytest.raises(cp.CheckpointError, match="no checkpoint at"):
        cp.restore(tmp_path / "nope.npz", opt.plan, state)
    path = tmp_path / "ck.npz"
    cp.save(path, state, opt.plan)
    data = path.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(cp.CheckpointError, match="not a readable curvplan checkpoint"):
        cp.restore(tmp_path / "cut.npz", opt.plan, state)
    caught = 0
    rng = np.random.default_rng(0)
    for i in rng.choice(len(data), 40, replace=False):
        bad = bytearray(data)
        bad[i] ^= 0xFF
        (tmp_path / "bad.npz").write_bytes(bytes(bad))
        try:
            restored = cp.restore(tmp_path / "bad.npz", opt.plan, state)
        except cp.CheckpointError:
            caught += 1
            continue
        # a flip in bytes nothing reads (zip padding, unused header fields) leaves the data as saved
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert caught >= 30
    assert not list(tmp_path.glob(".curvplan-*.tmp"))  # no stray temporary files


def test_strict_false_accepts_a_changed_learning_rate_and_prints_the_change(tmp_path, capsys):
    opt, params, state = _setup(0.02)
    cp.save(tmp_path / "ck.npz", state, opt.plan)
    other = cp.Optimizer(cp.presets.muon(0.05), loss_fn=opt.lowered.objective.loss_fn)
    with pytest.raises(cp.CheckpointError, match="strict=False"):
        cp.restore(tmp_path / "ck.npz", other.plan, other.init(params))
    restored = cp.restore(tmp_path / "ck.npz", other.plan, other.init(params), strict=False)
    out = capsys.readouterr().out
    assert "written by another plan" in out and "learning_rate=0.05" in out
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_shape_and_dtype_mismatches_name_the_leaf(tmp_path):
    opt, params, state = _setup()
    cp.save(tmp_path / "ck.npz", state, opt.plan)
    wider = opt.init({"w": jnp.ones((5, 3)), "b": jnp.zeros(3)})
    with pytest.raises(cp.CheckpointError, match=r"state.*\['w'\] has shape \(4, 3\) in the checkpoint, \(5, 3\) here"):
        cp.restore(tmp_path / "ck.npz", opt.plan, wider)
    f16 = jax.tree.map(lambda x: x.astype(jnp.float16) if x.dtype == jnp.float32 else x, state)
    with pytest.raises(cp.CheckpointError, match=r"(?s)is float32 in the checkpoint, float16 here.*cast=True"):
        cp.restore(tmp_path / "ck.npz", opt.plan, f16)
    casted = cp.restore(tmp_path / "ck.npz", opt.plan, f16, cast=True)
    assert all(a.dtype == b.dtype for a, b in zip(jax.tree.leaves(casted), jax.tree.leaves(f16)))
