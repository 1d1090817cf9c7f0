"""Agreement at creation and per call: deadlines name missing ranks, mismatches list fields."""

import time

import torch

from llmcomm.errors import CollectiveTimeoutError, ConfigMismatchError
from tests._dist import run_ranks


def _missing_rank_worker(rank, world):
    from llmcomm.agree import exchange

    if rank == 1:
        time.sleep(4)  # never arrives within rank 0's deadline
        return "skipped"
    t0 = time.monotonic()
    try:
        exchange({"x": 1}, torch.distributed.group.WORLD, "probe", timeout_s=1.0)
    except CollectiveTimeoutError as e:
        return {"elapsed": time.monotonic() - t0, "missing": e.missing_ranks, "msg": str(e)}
    return "no error"


def test_exchange_names_missing_rank_within_deadline():
    r0 = run_ranks(_missing_rank_worker, 2, timeout=60)[0]
    assert isinstance(r0, dict), r0
    assert r0["missing"] == [1] and r0["elapsed"] < 3.0
    assert "probe" in r0["msg"] and "[0,1]" in r0["msg"]


def _hidden_mismatch_worker(rank, world):
    import llmcomm

    hidden = 64 if rank == 0 else 128
    try:
        llmcomm.TPCommunicator(torch.distributed.group.WORLD, hidden, torch.float32, 8)
    except ConfigMismatchError as e:
        return str(e)
    return "no error"


def test_communicators_with_different_hidden_sizes_refuse_to_start():
    for msg in run_ranks(_hidden_mismatch_worker, 2, timeout=60):
        assert "hidden_size" in msg and "rank 0=64" in msg and "rank 1=128" in msg


def _check_worker(rank, world):
    import llmcomm

    comm = llmcomm.TPCommunicator(torch.distributed.group.WORLD, 16, torch.float32, 8)
    comm.all_reduce(torch.randn(3, 16))
    try:
        comm.all_reduce(torch.randn(3 if rank == 0 else 4, 16))  # ranks disagree on the shape
    except ConfigMismatchError as e:
        return str(e)
    return "no error"


def test_llmcomm_check_catches_shape_disagreement():
    msgs = run_ranks(_check_worker, 2, timeout=60, env={"LLMCOMM_CHECK": "1"})
    for m in msgs:
        assert "tokens" in m and "rank 0=3" in m and "rank 1=4" in m
