"""GPU tests of the MoE EP backends on 2 GPUs (NCCL + NVLink): p2p vs the dense reference,
CUDA-graph replay with fresh inputs, a missing rank ending in CollectiveTimeoutError, and
``EPDispatcher.warmup`` leaving nothing to compile for later calls.

The p2p backend runs with its default (``protocol="auto"``: lamport for these small dispatchers
at EP=2) and both protocols explicitly (``"flags"``, and ``"lamport"`` also with other tile sizes,
16 warps and a non-zero ``shift``), see ``P2P_VARIANTS``; the lamport variants also check that
every receive slot is back to the sentinel after each call.
``-k lamport`` selects the lamport tests only."""

from __future__ import annotations

import importlib.util

import pytest

from tests._dist import run_ranks
from tests.distributed._moe_cases import TINY_CASES

#: name -> P2PBackend keyword arguments
P2P_VARIANTS = {
    "p2p": {},
    "p2p-flags": {"protocol": "flags"},
    # 8 programs: up to 12 tokens each, rounds of 3 -- the interleaved multi-token rounds (fused
    # one-token steps, round slot claims) that large batches take; with 96+ programs every
    # program owns one token at M = 96
    "p2p-flags-g8": {"protocol": "flags", "num_programs": 8},
    # the same with the rounds sized per call from the batch (RT, an A/B knob)
    "p2p-flags-g8-rt": {"protocol": "flags", "num_programs": 8, "_runtime_rounds": True},
    # the combine's push and finish in separate programs (grid 2 x 8), rounds of 3
    "p2p-flags-g8-roles": {"protocol": "flags", "num_programs": 8, "_combine_roles": True,
                           "round_tokens": 3},
    # rows by copy_ from 9 tokens (an A/B knob), 8 programs
    "p2p-flags-g8-ce": {"protocol": "flags", "num_programs": 8, "_ce_tokens": 9},
    "p2p-lamport": {"protocol": "lamport"},
    "p2p-lamport-t4c2": {"protocol": "lamport", "tile_tokens": 4, "combine_tile_tokens": 2},
    "p2p-lamport-t2-w16-shift20": {"protocol": "lamport", "tile_tokens": 2, "num_warps": 16,
                                   "shift": 20},
    # the polls that reduce over the program every spin, as before session 20's per-thread
    # spins (_thread_spin / _meta_spin, the default on a GPU since then)
    "p2p-lamport-notspin": {"protocol": "lamport", "_thread_spin": False},
}
LAMPORT = [n for n in P2P_VARIANTS if "lamport" in n]

pytestmark = [pytest.mark.gpu2,
              pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                 reason="triton is not installed")]


def _correctness_worker(rank, world, names):
    import torch
    import torch.distributed as dist

    from llmcomm.moe import EPDispatcher
    from tests.distributed._moe_cases import make_inputs, roundtrip

    out = []
    for name in names:
        fp8 = name.endswith("-fp8")                      # EPDispatcher(fp8=True)
        unfp8 = name[:-len("-fp8")] if fp8 else name
        base, sep, align = unfp8.rpartition("-packed")  # EPDispatcher(packed=True, ...)
        packed = bool(sep)
        base = base if packed else unfp8
        backend, kw = ("p2p", P2P_VARIANTS[base]) if base in P2P_VARIANTS else (base, {})
        for (E, K, H, M, dtype) in ((16, 3, 264, 40, torch.float32),
                                    (256, 8, 7168, 96, torch.bfloat16)):
            H = H // 128 * 128 if fp8 else H   # fp8: a scale per 128 channels
            ep = EPDispatcher(dist.group.WORLD, E, K, H, M, dtype, backend=backend,
                              packed=packed, packed_align=int(align or 1), fp8=fp8,
                              _backend_kwargs=kw or None)
            assert ep.backend == backend
            tiny = TINY_CASES if "lamport" in name else ()   # both ranks at <= 1 token
            for i, (routing, toks) in enumerate((("random", [37, 0]), ("random", [96, 95]),
                                                 ("one_expert", [40, 17]), ("dups", [5, 33]),
                                                 ("low_experts", [1, 40]),
                                                 ("random", [3, 9])) + tiny):   # lamport: split
                inputs = make_inputs(50 + i, world, [min(t, M) for t in toks], E, K, H, dtype,
                                     routing)
                n, err = roundtrip(ep, rank, world, E, inputs, dtype, device="cuda")
                out.append((name, H, routing, n, err))
            ep.check_errors(sync=True)
    auto = EPDispatcher(dist.group.WORLD, 16, 2, 64, 8, torch.bfloat16)
    return out, str(auto.decision)


@pytest.mark.parametrize("names", [("p2p", "torch", "allgather"), ("p2p-flags",),
                                   ("p2p-flags-g8",), ("p2p-flags-g8-rt",),
                                   ("p2p-flags-g8-roles",),
                                   ("p2p-packed", "torch-packed", "allgather-packed",
                                    "p2p-packed16"),
                                   ("p2p-fp8", "p2p-flags-fp8", "torch-fp8",
                                    "allgather-fp8", "p2p-packed-fp8"),
                                   *((n,) for n in LAMPORT)],
                         ids=lambda names: "+".join(names))
def test_backends_match_reference_on_gpu(names):
    res = run_ranks(_correctness_worker, 2, names, backend="nccl", timeout=500)
    extra = sum(len(TINY_CASES) for n in names if "lamport" in n)
    for rows, decision in res:
        assert len(rows) == 12 * len(names) + 2 * extra
        assert decision.startswith("p2p") and "protocol lamport" in decision, decision
        for backend, H, routing, n, err in rows:
            assert err < 2.5e-2, (backend, H, routing, err)


def _graph_worker(rank, world, kw):
    import torch
    import torch.distributed as dist

    from llmcomm.moe import EPDispatcher
    from tests.distributed._moe_cases import capture_graph, make_inputs

    E, K, H, M, T = 64, 6, 1024, 64, 50
    dtype = torch.bfloat16
    ep = EPDispatcher(dist.group.WORLD, E, K, H, M, dtype, backend="p2p",
                      _backend_kwargs=kw or None)
    L = E // world
    scale = (1.0 + (torch.arange(L, device="cuda") + rank * L) / 8.0).to(dtype).view(L, 1, 1)
    x = torch.empty(T, H, dtype=dtype, device="cuda")
    ids = torch.empty(T, K, dtype=torch.long, device="cuda")
    w = torch.empty(T, K, dtype=torch.float32, device="cuda")

    def step():
        d = ep.dispatch(x, ids, w)
        return ep.combine(d.expert_x * scale, d)   # expert e: x * (1 + e/8)

    def load(seed):
        inputs = make_inputs(seed, world, [T] * world, E, K, H, dtype)
        x.copy_(inputs[rank][0]); ids.copy_(inputs[rank][1]); w.copy_(inputs[rank][2])
        return inputs

    load(1)
    g, y = capture_graph(step)
    errs = []
    for rep in range(7):        # > 2 rotations of the lamport buffers
        inputs = load(100 + rep)
        y.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        errs.append(_check(rank, inputs, y, dtype))
    ep.check_errors(sync=True)
    return errs


def _check(rank, inputs, y, dtype):
    from llmcomm.moe.reference import check_combine_output, reference_combine

    x, ids, w = inputs[rank]
    ref = reference_combine(x, ids, w, expert_fn=lambda e, r: r * (1.0 + e / 8.0))
    return check_combine_output(y, ref, dtype, what="graph replay")


@pytest.mark.parametrize("variant", ["p2p-flags", "p2p-flags-g8-ce", "p2p-lamport",
                                     "p2p-lamport-t4c2"])
def test_p2p_cuda_graph_replays_fresh_inputs(variant):
    res = run_ranks(_graph_worker, 2, P2P_VARIANTS[variant], backend="nccl", timeout=300)
    for errs in res:
        assert len(errs) == 7 and max(errs) < 2.5e-2


def _timeout_worker(rank, world, kw):
    import torch
    import torch.distributed as dist

    from llmcomm.errors import CollectiveTimeoutError
    from llmcomm.moe import EPDispatcher

    ep = EPDispatcher(dist.group.WORLD, 8, 2, 64, 16, torch.bfloat16, backend="p2p",
                      _backend_kwargs=kw or None)
    msg = None
    if rank == 0:                      # rank 1 never dispatches: rank 0 must not hang
        x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
        ids = torch.tensor([[0, 7]] * 4, device="cuda")
        ep.dispatch(x, ids, torch.rand(4, 2, device="cuda"))
        try:
            ep.check_errors(sync=True)
        except CollectiveTimeoutError as e:
            msg = (e.missing_ranks, str(e))
    dist.barrier()
    return msg


@pytest.mark.parametrize("variant", ["p2p-flags", "p2p-lamport"])
def test_p2p_missing_rank_times_out_naming_it(variant):
    res = run_ranks(_timeout_worker, 2, P2P_VARIANTS[variant], backend="nccl", timeout=200,
                    env={"LLMCOMM_TIMEOUT_S": "3"})
    assert res[0] is not None, "rank 0 did not raise CollectiveTimeoutError"
    missing, text = res[0]
    assert missing == [1] and "dispatch" in text, text


def _sentinel_worker(rank, world, kw):
    """Consecutive eager calls with changing T; after each (synchronised, both ranks idle)
    every lamport receive slot must be the sentinel again. Names the first call and region
    that keep data (sent and never read / reset overtaken by a late write) or go wrong."""
    import torch
    import torch.distributed as dist

    from llmcomm.moe import EPDispatcher
    from tests.distributed._moe_cases import (assert_lamport_sentinel, make_inputs, roundtrip,
                                              sentinel_calls)

    out = []
    for (E, K, H, M, dtype) in ((16, 3, 264, 40, torch.float32),
                                (256, 8, 7168, 96, torch.bfloat16)):
        ep = EPDispatcher(dist.group.WORLD, E, K, H, M, dtype, backend="p2p",
                          _backend_kwargs={"protocol": "lamport", **kw})
        # the 5 s deadline is shorter than a first call's compile, and the ranks meet token
        # classes at different calls (session 15: without this the run timed out on 2 GPUs)
        ep.warmup(topk_ids_dtype=torch.int64)
        for i, toks in enumerate(sentinel_calls(M)):
            inputs = make_inputs(70 + i, world, toks, E, K, H, dtype, "random")
            try:
                n, err = roundtrip(ep, rank, world, E, inputs, dtype, device="cuda")
            except AssertionError as e:   # name the call (session 17's failure did not)
                raise AssertionError(f"H={H} call {i} tokens {toks}: {e}") from e
            torch.cuda.synchronize()
            dist.barrier()
            assert_lamport_sentinel(ep, rank, f"H={H} call {i} tokens {toks}")
            dist.barrier()
            out.append(err)
        ep.check_errors(sync=True)
    return out


@pytest.mark.timeout(500)   # run_ranks' own deadline (450 s) first: it names the ranks
@pytest.mark.parametrize("variant", LAMPORT)
def test_p2p_lamport_slots_back_to_sentinel(variant):
    res = run_ranks(_sentinel_worker, 2, P2P_VARIANTS[variant], backend="nccl", timeout=450,
                    env={"LLMCOMM_TIMEOUT_S": "5"})
    for errs in res:
        assert max(errs) < 2.5e-2


def _warmup_worker(rank, world, kw):
    """``EPDispatcher.warmup`` on each rank at its own time, then calls whose token counts and
    ids dtypes differ per rank and cover every class: triton's compile hook must stay silent,
    the results match the reference. Control: a call with ``x`` not 16-byte aligned (a class
    ``warmup`` does not cover) compiles."""
    import time

    import torch
    import torch.distributed as dist

    from llmcomm.moe import EPDispatcher
    from tests._compiles import record_compiles
    from tests.distributed._moe_cases import make_inputs, roundtrip

    # M 48 (a multiple of 16): the "other" token class is warmed at 2 tokens only (8 warps), so
    # the 37- and 40-token calls (16 warps) meet what the both-warps pre-load left (session 24;
    # tests/gpu/test_moe_loopback.py's warmup test, same shapes)
    E, K, H, M, dtype = 32, 4, 4096, 48, torch.bfloat16
    ep = EPDispatcher(dist.group.WORLD, E, K, H, M, dtype, backend="p2p",
                      _backend_kwargs=kw or None)
    time.sleep(2.0 * rank)                 # local: the ranks warm up at different times
    loaded = ep.warmup()
    dist.barrier()
    with record_compiles() as compiled:
        errs = []
        for i, toks in enumerate(([1, 37], [16, 0], [5, 40], [0, 1], [37, 2], [M, 16], [3, 1])):
            ids_dtype = (torch.int64, torch.int32)[(i + rank) % 2]
            inputs = [(x, ids.to(ids_dtype), w)
                      for x, ids, w in make_inputs(500 + i, world, toks, E, K, H, dtype)]
            errs.append(roundtrip(ep, rank, world, E, inputs, dtype, device="cuda")[1])
        after_warmup = list(compiled)
        T = 3
        x = torch.randn(T * H + 1, device="cuda").to(dtype)[1:].view(T, H)
        d = ep.dispatch(x, torch.randint(0, E, (T, K), device="cuda"),
                        torch.rand(T, K, device="cuda"))
        ep.combine(d.expert_x, d)
    ep.check_errors(sync=True)
    return loaded, after_warmup, len(compiled) - len(after_warmup), max(errs)


@pytest.mark.timeout(650)
@pytest.mark.parametrize("variant", ["p2p-flags", "p2p-lamport"])
def test_p2p_warmup_leaves_nothing_to_compile(variant):
    res = run_ranks(_warmup_worker, 2, P2P_VARIANTS[variant], backend="nccl", timeout=600)
    for loaded, after_warmup, control_compiles, err in res:
        assert loaded >= (24 if "lamport" in variant else 12), loaded
        assert after_warmup == [], after_warmup
        assert control_compiles > 0, "the compile hook saw nothing: the check above proves nothing"
        assert err < 2.5e-2


def _other_device_worker(rank, world, kw):
    """Calls made while the *other* GPU is the current device: the kernels must still run on
    the dispatcher's device, in its current stream's order. The results are read right after
    each call on the dispatcher's device (no synchronisation; rank 1 starts 1 s late, so rank
    0's kernel is still waiting when its results are read): a kernel launched on the other
    device's stream would be read unfinished."""
    import time

    import torch
    import torch.distributed as dist

    from llmcomm.moe import EPDispatcher
    from tests.distributed._moe_cases import (check_combine, check_dispatch, make_inputs,
                                              run_experts)

    E, K, H, M, dtype = 16, 2, 256, 16, torch.bfloat16
    ep = EPDispatcher(dist.group.WORLD, E, K, H, M, dtype, backend="p2p",
                      _backend_kwargs=kw or None)
    ep.warmup(topk_ids_dtype=torch.int64)
    dist.barrier()
    errs = []
    for i, toks in enumerate(([5, 9], [16, 1])):
        inputs = make_inputs(700 + i, world, toks, E, K, H, dtype)
        x, ids, w = (t.to(f"cuda:{rank}") for t in inputs[rank])
        torch.cuda.set_device(1 - rank)
        if rank == 1:
            time.sleep(1.0)
        d = ep.dispatch(x, ids, w)
        check_dispatch(rank, world, E, inputs, d.expert_x, d.counts)
        y = ep.combine(run_experts(rank, E, world, d.expert_x, d.counts), d)
        errs.append(check_combine(rank, inputs, y, dtype, what="p2p combine, other device"))
        torch.cuda.set_device(rank)
        torch.cuda.synchronize()
        dist.barrier()
    ep.check_errors(sync=True)
    return errs


@pytest.mark.timeout(450)
@pytest.mark.parametrize("variant", ["p2p-flags", "p2p-lamport"])
def test_p2p_calls_run_on_the_dispatchers_device(variant):
    res = run_ranks(_other_device_worker, 2, P2P_VARIANTS[variant], backend="nccl", timeout=400)
    for errs in res:
        assert max(errs) < 2.5e-2
