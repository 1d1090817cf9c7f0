"""CPU checks of :mod:`llmcomm.moe.loopback` (its kernels run in tests/gpu/test_moe_loopback.py)."""

from __future__ import annotations

import logging
import os
import time

import pytest
import torch

from llmcomm.moe.loopback import Loopback, LoopbackGroup, loopback_pdl


def test_group_hands_every_rank_the_same_zeroed_buffers():
    g = LoopbackGroup(3, torch.device("cpu"))
    assert g.ranks() == [0, 1, 2]
    a = g.buffers(64)
    assert len(a) == 3 and all(b.numel() == 64 and int(b.abs().sum()) == 0 for b in a)
    a[1][5] = 7
    b = g.buffers(64)
    assert all(x is y for x, y in zip(a, b)) and int(b[1][5]) == 7


def test_group_refuses_a_rank_with_other_sizes():
    g = LoopbackGroup(2, torch.device("cpu"))
    g.buffers(64)
    with pytest.raises(ValueError, match="rank 0 asked for 64 bytes, this rank for 128"):
        g.buffers(128)


@pytest.mark.parametrize("world, experts, match", [(1, 8, "world_size must be an int >= 2"),
                                                    (3, 8, r"num_experts \(8\) must be divisible")])
def test_loopback_argument_errors(world, experts, match):
    with pytest.raises(ValueError, match=match):
        Loopback(world, experts, 2, 64, 16, torch.bfloat16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_loopback_without_gpu_says_so():
    with pytest.raises(ValueError, match="CUDA GPU; none is visible"):
        Loopback(2, 8, 2, 64, 16, torch.bfloat16)


# --- Loopback.warmup(processes=N): the parallel compile's children (stand-ins on the CPU) ------

def _children(tmp_path, monkeypatch, target, tasks, processes=3, timeout_s=60.0):
    from pathlib import Path

    from llmcomm.moe import loopback

    root = str(Path(__file__).resolve().parents[2])          # tests/ importable in the child
    monkeypatch.setenv("PYTHONPATH", root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("LOOPBACK_TEST_DIR", str(tmp_path))
    spec = ((4, 16, 2, 64, 4, torch.bfloat16), {"num_programs": 2})
    loopback._compile_in_children(spec, 0, tasks, (torch.int64, torch.int32), torch.float32,
                                  processes, timeout_s,
                                  target=f"tests.unit._loopback_children:{target}")


@pytest.mark.parametrize("world, programs, sms, requested, want", [
    (2, 33, 132, None, None),     # room for two grids a rank: the backend's default (on)
    (2, 33, 132, True, True),
    (2, 33, 132, False, False),
    (2, 34, 132, None, False),    # 136 > 132: off
    (2, 66, 132, None, False),    # Loopback's default grid at EP=2
    (4, 16, 132, None, None),
    (8, 16, 132, False, False),
])
def test_loopback_pdl_needs_two_grids_a_rank_to_fit(world, programs, sms, requested, want):
    assert loopback_pdl(world, programs, sms, requested) is want


def test_loopback_pdl_refuses_pdl_without_room():
    with pytest.raises(ValueError, match=r"2 x 2 ranks x 66 programs = 264 > 132 SMs\. Pass "
                                         r"num_programs <= 33"):
        loopback_pdl(2, 66, 132, True)


def test_parallel_warmup_splits_ranks_by_token_class():
    from llmcomm.moe.loopback import _warm_tasks

    assert _warm_tasks(2, [8, 1, 16, 3, 0, 32]) == [
        (0, [8, 3]), (1, [8, 3]), (0, [1]), (1, [1]), (0, [16, 0, 32]), (1, [16, 0, 32])]
    assert _warm_tasks(3, []) == []


def test_parallel_warmup_gives_every_pair_to_one_child(tmp_path, monkeypatch):
    from llmcomm.moe.loopback import _warm_tasks

    tasks = _warm_tasks(4, [1, 8])           # 8 pairs over 3 children
    _children(tmp_path, monkeypatch, "record", tasks)
    got = {}
    for f in sorted(tmp_path.iterdir()):
        mine, dev, ids, w, world = eval(f.read_text())
        assert (dev, ids, w, world) == (0, ["torch.int64", "torch.int32"], "torch.float32", 4)
        got[f.name] = mine
    assert got == {"child_0_[1]": [(0, [1]), (3, [1]), (2, [8])],
                   "child_1_[1]": [(1, [1]), (0, [8]), (3, [8])],
                   "child_2_[1]": [(2, [1]), (1, [8])]}


def test_parallel_warmup_reports_a_failed_child_with_its_output(tmp_path, monkeypatch):
    tasks = [(0, [1]), (1, [1]), (0, [8]), (1, [8])]
    with pytest.raises(RuntimeError, match=r"(?s)child 1 \(rank 1 at \[1\], rank 1 at \[8\]\) "
                                           r"exited with 3:.*compile error in \[\(1, \[1\]\)"):
        _children(tmp_path, monkeypatch, "fail_on_rank_one", tasks, processes=2)


def test_parallel_warmup_kills_a_child_past_its_deadline(tmp_path, monkeypatch):
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"child 0 \(rank 0 at \[1\]\) still compiling "
                                           r"after 3 s"):
        _children(tmp_path, monkeypatch, "hang", [(0, [1]), (1, [1])], processes=2,
                  timeout_s=3.0)
    assert time.monotonic() - t0 < 30


@pytest.mark.parametrize("bad", [-1, 1.5])
def test_warmup_refuses_a_bad_process_count(bad):
    lb = Loopback.__new__(Loopback)          # the check precedes any use of the GPU
    with pytest.raises(ValueError, match="processes must be an int >= 0"):
        lb.warmup([1], processes=bad)


def test_warm_child_builds_one_rank_backend_at_a_time(monkeypatch, caplog):
    """The real child body with fake backends: each (rank, tokens) pair compiled through that
    rank's backend alone, which is dropped before the next is built (session 23: children
    that each built a whole EP=8 Loopback ran one H100 out of memory)."""
    import gc
    import io
    import pickle
    import sys
    import weakref

    from llmcomm.moe import loopback

    built, alive = [], []

    class FakeBackend:
        def __init__(self, group, rank, spec):
            assert not any(ref() is not None for ref in alive), "previous backend still held"
            self.rank = rank
            built.append((rank, group.world_size, spec[1]["protocol"]))
            alive.append(weakref.ref(self))

        def warmup(self, tokens, ids_dtypes, weights_dtype):
            built.append(("warm", self.rank, tokens, list(ids_dtypes), weights_dtype))
            return len(tokens)

    monkeypatch.setattr(loopback, "_rank_backend", FakeBackend)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", gc.collect)
    spec = ((4, 16, 2, 64, 4, torch.bfloat16, False, 1),
            {"num_programs": 2, "protocol": "lamport"})
    task = (spec, 0, [(2, [1]), (0, [8, 3])], (torch.int64,), torch.float32)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(pickle.dumps(task))))
    with caplog.at_level(logging.INFO, logger="llmcomm.moe.loopback"):
        loopback._warm_child()
    assert built == [(2, 4, "lamport"), ("warm", 2, [1], [torch.int64], torch.float32),
                     (0, 4, "lamport"), ("warm", 0, [8, 3], [torch.int64], torch.float32)]
    assert "rank 0 at [8, 3]: 2 kernels compiled" in caplog.text
