"""PP=2 x TP=2 on 4 GPUs (issue 8; the layout that hung another engine, vLLM PR #43616): both TP
groups create p2p communicators, warm up and capture CUDA graphs *concurrently* with fusion on,
each stage with its own order of sizes and its own delays; no deadlock, results right.

Launch parameters are a pure function of (shape, dtype, world size, version), agreed by
fingerprint at creation, so the two TP peers of a stage cannot diverge whatever the other stage
does. Marked gpu4: skipped on machines with fewer GPUs."""

from __future__ import annotations

import importlib.util

import pytest

from tests._dist import run_ranks

pytestmark = [pytest.mark.gpu4,
              pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                 reason="triton is not installed")]

H = 4096
SIZES = (1, 16, 256, 1024, 4096)


def _worker(rank, world):
    import random
    import time

    import torch

    import llmcomm
    from llmcomm import reference

    layout = llmcomm.ParallelLayout(tp=2, pp=2)
    groups = layout.create_groups()
    stage = groups.ranks["pp"].index(rank)
    tp_rank = groups.ranks["tp"].index(rank)
    dev = torch.device("cuda", rank)
    comm = llmcomm.TPCommunicator(groups.tp, H, torch.bfloat16, max(SIZES), backend="auto",
                                  layout=layout)
    if comm.decision.choice != "p2p" or comm.fusion.choice != "fused":
        return {"fails": [f"expected fused p2p, got {comm.decision} / {comm.fusion}"]}
    order = list(SIZES)
    random.Random(stage).shuffle(order)      # the stages warm up in different orders
    jitter = random.Random(100 + stage)
    g = torch.Generator(device=dev).manual_seed(7 + stage)  # same inputs within a TP group
    data = {T: ([torch.randn(T, H, generator=g, device=dev).bfloat16() for _ in range(2)],
                torch.randn(T, H, generator=g, device=dev).bfloat16()) for T in SIZES}
    w = (torch.rand(H, generator=g, device=dev) + 0.5).bfloat16()
    fails = []
    for T in order:                           # eager warm-up, with per-stage delays
        time.sleep(jitter.random() * 0.05)
        comm.all_reduce_add_rms_norm(data[T][0][tp_rank], data[T][1], w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = {T: comm.all_reduce_add_rms_norm(data[T][0][tp_rank], data[T][1], w)
                for T in order}
    for i in range(20):
        time.sleep(jitter.random() * 0.01)
        graph.replay()
    torch.cuda.synchronize()
    comm.backend.check_errors()
    for T in SIZES:
        ref_n, ref_r = reference.all_reduce_add_rms_norm(data[T][0], data[T][1], w, 1e-6)
        n, r = outs[T]
        err = ((n.double() - ref_n.double()).norm() / ref_n.double().norm()).item()
        if not err < 4e-3:
            fails.append(f"stage {stage} T={T}: rel err {err:.2e}")
    return {"fails": fails, "stage": stage}


def test_pp2_tp2_concurrent_warmup_and_capture():
    res = run_ranks(_worker, 4, backend="nccl", timeout=300)
    assert sorted(r.get("stage") for r in res) == [0, 0, 1, 1]
    for r in res:
        assert not r["fails"], r["fails"]
