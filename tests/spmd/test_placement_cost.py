"""What each device does and holds, read from the compiled SPMD programs (never timed).

On the 8-layer model (8 same-shape weight matrices), the refresh program placed on 8 devices must do at most
1.25/8 of the 1-device program's FLOPs, each device must factorize only its share of the blocks (LAPACK custom
calls in its HLO, which XLA's FLOP count leaves out), and with the parameters split 8 ways a device holds 1/8
of the state beyond its replicated scalars.
"""

from __future__ import annotations

import pytest

from benchmarks import scale

WIDTH = 32
BLOCK_FAMILIES = ["shampoo", "soap", "kfac", "muon"]


@pytest.fixture(scope="module")
def measured():
    cache = {}
    return lambda name, n: cache.setdefault((name, n), scale.measure(name, n, WIDTH))


def refresh(row):
    return row["phases"][row["refresh"]]


@pytest.mark.parametrize("name", BLOCK_FAMILIES)
def test_refresh_flops_per_device_are_an_eighth(name, measured):
    one, eight = measured(name, 1), measured(name, 8)
    assert refresh(eight)["flops"] <= 1.25 / 8 * refresh(one)["flops"]


@pytest.mark.parametrize("name", ["shampoo", "soap", "kfac", "adaptive_schatten"])
def test_each_device_factorizes_an_eighth_of_the_blocks(name, measured):
    whole = sum(refresh(measured(name, 1))["factorized"].values())
    share = sum(refresh(measured(name, 8))["factorized"].values())
    assert whole >= 16  # two factors of each of the 8 weight matrices at least
    assert share * 8 == whole


@pytest.mark.parametrize("name", ["shampoo", "soap", "kfac", "muon", "adaptive_schatten"])
def test_state_per_device_is_an_eighth_beyond_scalars(name, measured):
    one, eight = measured(name, 1), measured(name, 8)
    assert eight["state_bytes"] - eight["scalar_bytes"] <= (one["state_bytes"] - one["scalar_bytes"]) / 8


def test_hlo_factorization_count_reads_batched_calls_and_loops():
    hlo = """%body (t: (s32[], f32[8,32,32])) -> (s32[], f32[8,32,32]) {
  %c = (f32[32,32]{1,0}, f32[32]{0}, s32[]) custom-call(f32[32,32]{1,0} %x), custom_call_target="lapack_ssyevd_ffi"
}

%branch (a: f32[33,33]) -> f32[33,33] {
  %d = f32[33,33]{1,0} custom-call(f32[33,33]{1,0} %y), custom_call_target="lapack_spotrf_ffi"
}

ENTRY %main (p: f32[4,32,32]) -> f32[4,32,32] {
  %c = (f32[4,32,32]{2,1,0}, f32[4,32]{1,0}, s32[4]{0}) custom-call(f32[4,32,32]{2,1,0} %p), custom_call_target="lapack_ssyevd_ffi"
  %w = (s32[], f32[8,32,32]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"8"}}
  %k = f32[33,33]{1,0} conditional(%q, %a, %b), branch_computations={%branch, %branch}
  %e = f32[33,33]{1,0} dot(f32[33,33]{1,0} %y, f32[33,33]{1,0} %y)
}
"""
    assert scale.factorized_blocks(hlo) == {"ssyevd_ffi": 4 + 8, "spotrf_ffi": 2}
