"""Fault tests on the CPU (gloo): each fault ends in the documented error or result within the
deadline (LLMCOMM_TIMEOUT_S); none hangs. The table in docs/reliability.md cites these tests."""

import math
import os
import time

import pytest
import torch

from llmcomm.errors import CollectiveTimeoutError, LlmcommError
from tests._dist import run_ranks

FAST = {"LLMCOMM_TIMEOUT_S": "2"}
H = 32


def _comm(backend="torch"):
    import llmcomm

    return llmcomm.TPCommunicator(torch.distributed.group.WORLD, H, torch.float32, 16,
                                  backend=backend)


def _skip_call_worker(rank, world):
    comm = _comm()
    comm.all_reduce(torch.randn(4, H))  # both ranks call once
    if rank == 1:
        time.sleep(6)  # rank 1 skips the second call
        return "skipped"
    t0 = time.monotonic()
    try:
        comm.all_reduce_add_rms_norm(torch.randn(4, H), torch.randn(4, H), torch.ones(H))
    except CollectiveTimeoutError as e:
        return {"missing": e.missing_ranks, "elapsed": time.monotonic() - t0, "msg": str(e)}
    return "no error"


def test_rank_that_never_calls_is_named_within_deadline():
    r0 = run_ranks(_skip_call_worker, 2, env=FAST, timeout=60)[0]
    assert isinstance(r0, dict), r0
    assert r0["missing"] == [1]
    assert r0["elapsed"] < 4.0
    assert "all_reduce" in r0["msg"] and "[0,1]" in r0["msg"]


def _skip_creation_worker(rank, world):
    if rank == 1:
        time.sleep(6)
        return "never created"
    t0 = time.monotonic()
    try:
        _comm()
    except CollectiveTimeoutError as e:
        return {"missing": e.missing_ranks, "elapsed": time.monotonic() - t0}
    return "no error"


def test_rank_that_never_creates_the_communicator_is_named():
    r0 = run_ranks(_skip_creation_worker, 2, env=FAST, timeout=60)[0]
    assert isinstance(r0, dict) and r0["missing"] == [1] and r0["elapsed"] < 4.0, r0


def _exit_worker(rank, world):
    comm = _comm()
    comm.all_reduce(torch.randn(2, H))
    if rank == 1:
        os._exit(3)  # dies mid-run without a word
    t0 = time.monotonic()
    try:
        for _ in range(3):
            comm.all_reduce(torch.randn(2, H))
    except LlmcommError as e:
        return {"type": type(e).__name__, "elapsed": time.monotonic() - t0}
    return "no error"


def test_rank_that_exits_mid_run_ends_in_an_error_not_a_hang():
    res = run_ranks(_exit_worker, 2, env=FAST, timeout=60, expect_failure=True)
    assert res[1][0] == "error" and "exit code 3" in res[1][1]
    assert isinstance(res[0], dict), res[0]
    assert res[0]["type"] == "CollectiveTimeoutError" and res[0]["elapsed"] < 4.0


def _raise_while_peer_waits_worker(rank, world):
    if rank == 0:
        raise ValueError("rank 0 fails on purpose")
    time.sleep(600)      # a peer that will not finish (on NCCL: blocked in a collective)
    return "not reached"


def test_harness_reports_a_failing_rank_while_its_peer_blocks():
    """The test harness itself (``llmcomm.launch.run_ranks``): a rank that raises while a peer
    cannot finish is reported with its traceback within the grace period, not after the whole
    deadline. (Session 15, 2 x H200: the failing rank tore its NCCL group down before it
    reported, the teardown waited for the peer blocked in a collective with it, and the run
    read as a hang with "no rank reported an error"; it now reports first, which gloo cannot
    reproduce.)"""
    from llmcomm.launch import _GRACE_S, RankFailure

    t0 = time.monotonic()
    with pytest.raises(RankFailure) as info:
        run_ranks(_raise_while_peer_waits_worker, 2, timeout=120)
    assert time.monotonic() - t0 < _GRACE_S + 30
    text = str(info.value)
    assert "rank 0 failed" in text and "ValueError: rank 0 fails on purpose" in text, text
    assert "ranks [1] did not finish" in text, text


def _nan_zero_worker(rank, world):
    comm = _comm()
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(3, H, generator=g) for _ in range(world)]
    res, w = torch.randn(3, H, generator=g), torch.rand(H, generator=g) + 0.5
    x = xs[rank].clone()
    if rank == 0:
        x[1, 4] = float("nan")
        x[2, 0] = float("inf")
    normed, r_out = comm.all_reduce_add_rms_norm(x, res, w)
    empty = comm.all_reduce(torch.empty(0, H))
    n0, r0 = comm.all_reduce_add_rms_norm(torch.empty(0, H), torch.empty(0, H), w)
    return {"normed": normed, "r_out": r_out, "xs": xs, "res": res, "w": w,
            "empty": tuple(empty.shape), "n0": tuple(n0.shape)}


def test_nan_inf_propagate_to_their_rows_only_and_zero_tokens_work():
    from llmcomm import reference

    out = run_ranks(_nan_zero_worker, 2, timeout=60)[0]
    normed, r_out = out["normed"], out["r_out"]
    assert torch.isnan(normed[1]).all() and torch.isnan(r_out[1, 4])
    # Inf: rsqrt(inf) = 0, so the Inf position becomes NaN and the rest of its row 0 (IEEE)
    assert torch.isnan(normed[2, 0]) and (normed[2, 1:] == 0).all()
    assert math.isinf(r_out[2, 0].item())
    ref_n, ref_r = reference.all_reduce_add_rms_norm(out["xs"], out["res"], out["w"], 1e-6)
    assert torch.allclose(normed[0], ref_n[0], rtol=1e-5, atol=1e-6)
    assert out["empty"] == (0, H) and out["n0"] == (0, H)


def _moe_skip_worker(rank, world, backend):
    import llmcomm

    ep = llmcomm.EPDispatcher(torch.distributed.group.WORLD, num_experts=4, top_k=2,
                              hidden_size=H, max_tokens_per_rank=8, dtype=torch.float32,
                              backend=backend)
    x = torch.randn(5, H)
    ids = torch.tensor([[0, 3], [1, 2], [2, 3], [0, 1], [3, 0]])
    w = torch.rand(5, 2)
    d = ep.dispatch(x, ids, w)
    ep.combine(d.expert_x.clone(), d)  # one full round on both ranks
    if rank == 1:
        time.sleep(6)  # rank 1 never dispatches again
        return "skipped"
    t0 = time.monotonic()
    try:
        d = ep.dispatch(x, ids, w)
        ep.combine(d.expert_x.clone(), d)
    except CollectiveTimeoutError as e:
        return {"missing": e.missing_ranks, "elapsed": time.monotonic() - t0, "msg": str(e)}
    return "no error"


@pytest.mark.parametrize("backend", ["torch", "allgather"])
def test_moe_rank_that_never_dispatches_is_named_within_deadline(backend):
    r0 = run_ranks(_moe_skip_worker, 2, backend, env=FAST, timeout=60)[0]
    assert isinstance(r0, dict), r0
    assert r0["missing"] == [1] and r0["elapsed"] < 4.0
    assert "dispatch" in r0["msg"] and backend in r0["msg"]
