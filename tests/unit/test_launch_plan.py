"""launch_plan / LaunchTable: pure, validated, and the Lamport kernel choice follows the table."""

from __future__ import annotations

import pytest

from llmcomm.allreduce.p2p import DEFAULT_TABLE, LaunchTable, launch_plan


def test_rows_kernel_only_from_the_tile_threshold_on():
    t = LaunchTable(lamport_rows_min_tiles=256, lamport_lag=2)
    assert launch_plan("lamport", True, 255, 4096, 2, 2, t)["rows"] == 0
    big = launch_plan("lamport", True, 256, 4096, 2, 2, t)
    assert big["rows"] == 1 and big["lag"] == 2
    assert big["grid"] == 256, "<= lamport_rows_wide_tiles at 8 warps: one program per row"
    narrow = LaunchTable(lamport_rows_min_tiles=256, lamport_rows_wide_tiles=0)
    assert launch_plan("lamport", True, 256, 4096, 2, 2, narrow)["grid"] == 128
    # 16 warps (H=8192): only 128 programs are resident, wide or not
    assert launch_plan("lamport", True, 256, 8192, 2, 2, t)["grid"] == 128
    assert launch_plan("lamport", True, 1024, 4096, 2, 2, t)["grid"] == 128
    # unfused tiles are flat blocks: 64 x 4096 elements = 64 tiles of 4096
    assert launch_plan("lamport", False, 64, 4096, 2, 2, t)["rows"] == 0
    assert launch_plan("lamport", False, 256, 4096, 2, 2, t)["rows"] == 1
    # 0 = never; other strategies never use it
    never = LaunchTable(lamport_rows_min_tiles=0)
    assert launch_plan("lamport", True, 4096, 4096, 2, 2, never)["rows"] == 0
    assert launch_plan("oneshot", True, 4096, 4096, 2, 2, t)["rows"] == 0


@pytest.mark.parametrize("hidden", [8, 16, 40, 64, 96, 128, 256, 2880, 8192])
def test_fused_rows_never_have_more_threads_than_elements(hidden):
    """A Lamport-polled element held by two threads would be two volatile loads that can
    disagree; the fused (one row per tile) plan keeps 32 * num_warps <= block."""
    for strategy in ("lamport", "oneshot", "twoshot"):
        p = launch_plan(strategy, True, 3, hidden, 2, 2)
        assert p["block"] >= hidden and p["block"] & (p["block"] - 1) == 0
        assert 32 * p["num_warps"] <= p["block"], p
    assert launch_plan("lamport", True, 3, 8192, 2, 2)["num_warps"] == 16


def test_plan_is_a_pure_function():
    args = ("lamport", True, 300, 5120, 2, 2, DEFAULT_TABLE)
    assert launch_plan(*args) == launch_plan(*args)
    p = launch_plan("lamport", True, 1, 8192, 2, 2)
    assert p["grid"] > 1, "one long row is pushed by many programs in the chunked kernel"


@pytest.mark.parametrize("knobs", [{"lamport_lag": 0}, {"lamport_lag": 5},
                                   {"lamport_rows_min_tiles": -1},
                                   {"lamport_rows_wide_tiles": -1},
                                   {"lamport_chunk_vecs": 3}, {"lamport_max_programs": 300}])
def test_bad_tables_are_refused(knobs):
    with pytest.raises(ValueError, match="LaunchTable"):
        LaunchTable(**knobs)
