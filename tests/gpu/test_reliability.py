"""GPU reliability (issue 7): 1000 replays of a captured graph stay right; a soak of 100k calls
of mixed sizes (same sequence on every rank) with sampled checks against the fp32 reference and
sampled bitwise equality across ranks. (The missing-peer deadline tests live beside the kernels:
tests/gpu/test_p2p_allreduce.py and tests/gpu/test_moe_p2p.py.)"""

from __future__ import annotations

import importlib.util

import pytest

from tests._dist import run_ranks

pytestmark = [pytest.mark.gpu2,
              pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                 reason="triton is not installed")]

H = 4096
SIZES = (1, 3, 64, 257, 1000, 2048, 4096)   # spans lamport / one-shot / two-shot at H=4096 bf16


def _draw(torch, seed, world, T, dev):
    g = torch.Generator(device=dev).manual_seed(seed)
    xs = [torch.randn(T, H, generator=g, device=dev).bfloat16() for _ in range(world)]
    res = torch.randn(T, H, generator=g, device=dev).bfloat16()
    w = (torch.rand(H, generator=g, device=dev) + 0.5).bfloat16()
    return xs, res, w


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _same_on_all_ranks(torch, dist, t):
    """Bitwise equality of ``t`` across the ranks (all_gather of its bytes)."""
    raw = t.contiguous().view(torch.uint8).flatten()
    got = [torch.empty_like(raw) for _ in range(dist.get_world_size())]
    dist.all_gather(got, raw)
    return all(torch.equal(g, got[0]) for g in got)


def _graph_worker(rank, world, replays):
    import torch
    import torch.distributed as dist

    import llmcomm
    from llmcomm import reference

    dev = torch.device("cuda", rank)
    comm = llmcomm.TPCommunicator(dist.group.WORLD, H, torch.bfloat16, max(SIZES),
                                  backend="p2p")
    static = {T: _draw(torch, 10 + T, world, T, dev) for T in SIZES}
    bufs = {T: (static[T][0][rank].clone(), static[T][1].clone()) for T in SIZES}
    w = static[SIZES[0]][2]

    def step():
        return {T: comm.all_reduce_add_rms_norm(bufs[T][0], bufs[T][1], w) for T in SIZES}

    step()  # compile every variant eagerly before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    fails, checked = [], 0
    for i in range(replays):
        refresh = i % 100 == 0
        if refresh:  # fresh random inputs into the static buffers
            static = {T: _draw(torch, 1000 * i + T, world, T, dev) for T in SIZES}
            for T in SIZES:
                bufs[T][0].copy_(static[T][0][rank])
                bufs[T][1].copy_(static[T][1])
        for o in outs.values():
            for t in o:
                t.fill_(float("nan"))
        graph.replay()
        if refresh or i % 37 == 0 or i == replays - 1:
            torch.cuda.synchronize()
            comm.backend.check_errors()
            checked += 1
            for T in SIZES:
                xs, res, _ = static[T]
                ref_n, ref_r = reference.all_reduce_add_rms_norm(xs, res, w, 1e-6)
                n, r = outs[T]
                e = max(_rel(n, ref_n), _rel(r, ref_r))
                if not e < 4e-3:
                    fails.append(f"replay {i} T={T}: rel err {e:.2e}")
                if not _same_on_all_ranks(torch, dist, n):
                    fails.append(f"replay {i} T={T}: ranks differ")
    torch.cuda.synchronize()
    comm.backend.check_errors()
    return {"fails": fails[:20], "checked": checked}


def test_1000_graph_replays_stay_right():
    res = run_ranks(_graph_worker, 2, 1000, backend="nccl", timeout=300)
    for r in res:
        assert r["checked"] >= 30
        assert not r["fails"], r["fails"]


def _soak_worker(rank, world, calls, every):
    import random

    import torch
    import torch.distributed as dist

    import llmcomm
    from llmcomm import reference

    dev = torch.device("cuda", rank)
    comm = llmcomm.TPCommunicator(dist.group.WORLD, H, torch.bfloat16, max(SIZES),
                                  backend="p2p")
    pool = {T: _draw(torch, 77 + T, world, T, dev) for T in SIZES}
    order = random.Random(2026)  # same sequence of sizes and ops on every rank
    fails, checked = [], 0
    for i in range(calls):
        T = order.choice(SIZES)
        fused = order.random() < 0.7
        sample = i % every == 0
        xs, res, w = _draw(torch, 5000 + i, world, T, dev) if sample else pool[T]
        if fused:
            n, r = comm.all_reduce_add_rms_norm(xs[rank], res, w)
        else:
            n = comm.all_reduce(xs[rank])
        if sample:
            checked += 1
            if fused:
                ref_n, ref_r = reference.all_reduce_add_rms_norm(xs, res, w, 1e-6)
                e = max(_rel(n, ref_n), _rel(r, ref_r))
            else:
                e = _rel(n, reference.all_reduce(xs))
            if not e < 4e-3:
                fails.append(f"call {i} T={T} fused={fused}: rel err {e:.2e}")
            if not _same_on_all_ranks(torch, dist, n):
                fails.append(f"call {i} T={T}: ranks differ")
    torch.cuda.synchronize()
    comm.backend.check_errors()
    # above the workspace: explicit p2p refuses with the max_tokens that would fit ...
    big = max(SIZES) + 1
    xs, res, w = _draw(torch, 99, world, big, dev)
    try:
        comm.all_reduce(xs[rank])
        fails.append("p2p accepted a call above its workspace")
    except ValueError as e:
        if f"max_tokens>={big}" not in str(e):
            fails.append(f"unhelpful capacity error: {e}")
    # ... and auto falls back to the torch backend (NCCL + epilogue kernel), still right
    auto = llmcomm.TPCommunicator(dist.group.WORLD, H, torch.bfloat16, 64, backend="auto")
    n, r = auto.all_reduce_add_rms_norm(xs[rank], res, w)
    ref_n, ref_r = reference.all_reduce_add_rms_norm(xs, res, w, 1e-6)
    if not max(_rel(n, ref_n), _rel(r, ref_r)) < 8e-3:
        fails.append(f"auto fallback above the workspace: rel err {_rel(n, ref_n):.2e}")
    return {"fails": fails[:20], "checked": checked, "auto": auto.decision.choice}


def test_soak_100k_mixed_calls():
    res = run_ranks(_soak_worker, 2, 100_000, 499, backend="nccl", timeout=420)
    for r in res:
        assert r["auto"] == "p2p"
        assert r["checked"] >= 200
        assert not r["fails"], r["fails"]
