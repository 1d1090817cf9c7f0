"""The p2p MoE kernels on ONE GPU: every rank of an EP group in one process
(:class:`llmcomm.moe.loopback.Loopback`), the ranks' kernels running at the same time on their
own streams. Checks what the 2-GPU tests check, where only one GPU is lent: every received row
against its source, the combine against the dense float64 reference, CUDA-graph replays with
fresh inputs, lamport slots back to the sentinel, a missing rank ending in
``CollectiveTimeoutError`` naming it, and ``warmup`` leaving nothing to compile. Each test
runs in a fresh process with a host deadline (``run_ranks``), on top of the kernels' own device
deadlines."""

from __future__ import annotations

import importlib.util

import pytest

from tests._dist import run_ranks
from tests.distributed._moe_cases import TINY_CASES

#: name -> (world, Loopback keyword arguments)
VARIANTS = {
    "flags": (2, {"protocol": "flags"}),
    # few programs: multi-token interleaved rounds (fused steps, round slot claims, pairing)
    "flags-g8": (2, {"protocol": "flags", "num_programs": 8}),
    "flags-g4-w4": (4, {"protocol": "flags", "num_programs": 4}),
    "flags-g8-rt": (2, {"protocol": "flags", "num_programs": 8, "_runtime_rounds": True}),
    # the combine's push and finish in separate programs (grid 2 x 8 a rank), rounds of 3
    "flags-g8-roles": (2, {"protocol": "flags", "num_programs": 8, "_combine_roles": True,
                           "round_tokens": 3}),
    # rows by copy_ from 9 tokens (an A/B knob): most reference cases have one rank at
    # 9+ tokens and one below, so one copies its rows and the other stores them from its kernel
    "flags-g8-ce": (2, {"protocol": "flags", "num_programs": 8, "_ce_tokens": 9}),
    # the packed expert_x (EPDispatcher(packed=True)): the count exchange kernel before the
    # flags dispatch, its cursors biased to the experts' offsets; and with few programs
    "flags-packed": (2, {"packed": True}),
    "flags-g8-packed": (2, {"packed": True, "num_programs": 8}),
    # ... each expert's segment starting at a multiple of 16 rows (packed_align)
    "flags-g8-packed-a16": (2, {"packed": True, "packed_align": 16, "num_programs": 8}),
    # the fp8 dispatch (EPDispatcher(fp8=True)): x quantised by the triton kernel into wire
    # rows, which the flags dispatch moves; padded, and packed with few programs; and the
    # lamport dispatch (session 33: its sentinel rewrite compares bits; make_inputs puts the
    # sentinel and bf16-denormal byte pairs into every wire row), one-token and 4-token tiles
    "flags-fp8": (2, {"protocol": "flags", "fp8": True}),
    "flags-g8-packed-fp8": (2, {"fp8": True, "packed": True, "num_programs": 8}),
    "lamport-fp8": (2, {"protocol": "lamport", "fp8": True}),
    "lamport-t4c2-fp8": (2, {"protocol": "lamport", "fp8": True, "tile_tokens": 4,
                             "combine_tile_tokens": 2}),
    "lamport": (2, {"protocol": "lamport"}),
    "lamport-t4c2": (2, {"protocol": "lamport", "tile_tokens": 4, "combine_tile_tokens": 2}),
    "lamport-shift": (2, {"protocol": "lamport", "tile_tokens": 2, "shift": 20,
                          "num_programs": 48}),
    # the polls that reduce over the program every spin, as before session 20's per-thread
    # spin (_thread_spin, the default on a GPU); fp32 (H 264) and bf16 rows
    "lamport-notspin": (2, {"protocol": "lamport", "_thread_spin": False}),
    # own rows placed after the receive, as before session 25 (the default places them before
    # it where a program receives too)
    "lamport-noearly": (2, {"protocol": "lamport", "_early_own": False}),
    # a received token's slots claimed before the wait for its row (session 25's A/B knob)
    "lamport-claim1": (2, {"protocol": "lamport", "_claim_first": True}),
    # claims and placements masked off where there is no token (before session 26's GATE)
    "lamport-nogate": (2, {"protocol": "lamport", "_gate": False}),
    # counts published by a "last program out" (before session 27's _direct_counts)
    "lamport-nodirect": (2, {"protocol": "lamport", "_direct_counts": False}),
    # lamport at EP=4, its peers' tokens spread over the programs (_peer_spread, the default
    # there; protocol="auto" keeps flags at EP > 2 until lamport is timed on 4 GPUs): 4 ranks
    # on one GPU, 33 programs a rank. Graph test only: the reference test's shapes and token
    # classes would compile ~100 kernels of ~10 s at EP=4 (session 21)
    "lamport-w4": (4, {"protocol": "lamport"}),
    # ... and at EP=8 (16 programs a rank): its 32 kernels compiled first in 8 processes
    # (Loopback.warmup(processes=8); one process would take over 10 minutes, session 22)
    "lamport-w8": (8, {"protocol": "lamport"}),
}
#: compiled too long for the reference test (above)
_GRAPH_ONLY = ("lamport-w4", "lamport-w8")
#: extra environment of a variant's process: at EP=8 nine streams (a rank each and the
#: caller's), more than CUDA's default 8 hardware queues, where two ranks' kernels could share
#: a queue and one wait behind the other that spins for it
_ENV = {"lamport-w8": {"CUDA_DEVICE_MAX_CONNECTIONS": "32"}}

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                 reason="triton is not installed")]


def _roundtrip(lb, world, E, inputs, dtype, check_rows=True):
    import torch

    from llmcomm.moe.fp8 import split_wire
    from tests.distributed._moe_cases import check_combine, check_dispatch, run_experts

    xs, ids, ws = ([t.to("cuda") for t in col] for col in zip(*inputs))
    outs = lb.dispatch(xs, ids, ws)
    lb.check_errors()
    offs = [lb.backends[r].offsets(o[1]) if lb.packed else None for r, o in enumerate(outs)]
    # fp8: (q, scale) views of each rank's wire rows (EPDispatcher.dispatch's split)
    H = xs[0].shape[1]
    exs = [split_wire(o[0], H) if lb.fp8 else (o[0], None) for o in outs]
    n = sum(check_dispatch(r, world, E, inputs, exs[r][0], o[1], offs[r], lb.packed_align,
                           exs[r][1])
            for r, o in enumerate(outs)) if check_rows else -1
    expert_out = [run_experts(r, E, world, exs[r][0], o[1], offs[r], exs[r][1], dtype)
                  for r, o in enumerate(outs)]
    ys = lb.combine(expert_out, outs, [x.shape[0] for x in xs])
    lb.check_errors()
    errs = [check_combine(r, inputs, ys[r], dtype, what="loopback combine", fp8=lb.fp8)
            for r in range(world)]
    torch.cuda.synchronize()
    return n, max(errs)


def _sentinel_left(lb):
    from tests.distributed._moe_cases import lamport_left

    return [b for r, be in enumerate(lb.backends) for b in lamport_left(be, r)]


def _reference_worker(rank, world_size, name):
    import torch

    from llmcomm.moe.loopback import Loopback
    from tests.distributed._moe_cases import make_inputs

    world, kw = VARIANTS[name]
    out = []
    for (E, K, H, M, dtype) in ((16, 3, 264, 40, torch.float32),
                                (256, 8, 7168, 96, torch.bfloat16)):
        E = max(E, world)
        H = H // 128 * 128 if kw.get("fp8") else H   # fp8: a scale per 128 channels
        lb = Loopback(world, E, K, H, M, dtype, **kw)
        cases = (("random", [37, 0]), ("random", [96, 95]), ("one_expert", [40, 17]),
                 ("dups", [5, 33]), ("low_experts", [1, 40]), ("random", [3, 9]),
                 ("random", [M, M])) + (TINY_CASES if kw.get("protocol") == "lamport" else ())
        for i, (routing, toks) in enumerate(cases):
            toks = [min(toks[r % 2] + r // 2, M) for r in range(world)]
            inputs = make_inputs(50 + i, world, toks, E, K, H, dtype, routing)
            n, err = _roundtrip(lb, world, E, inputs, dtype)
            left = _sentinel_left(lb) if lb.backends[0].protocol == "lamport" else []
            out.append((H, routing, toks, n, err, left))
    return out


# compiling every rank's kernels for two shapes and three token-count classes takes minutes
# (session 10, one H200: 195-291 s per variant at W = 2; the W = 4 variant passed pytest's
# default 300 s limit while still compiling)
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", [n for n in VARIANTS if n not in _GRAPH_ONLY])
def test_loopback_matches_reference(name):
    (rows,) = run_ranks(_reference_worker, 1, name, timeout=850)
    assert len(rows) == 2 * (7 + (len(TINY_CASES) if VARIANTS[name][1].get("protocol") ==
                                  "lamport" else 0))
    for H, routing, toks, n, err, left in rows:
        assert err < 2.5e-2, (H, routing, toks, err)
        assert not left, (H, routing, toks, left)


def _graph_worker(rank, world_size, name):
    import torch

    from llmcomm.moe.fp8 import split_wire
    from llmcomm.moe.loopback import Loopback
    from llmcomm.moe.reference import (check_combine_output, dequantize_fp8_blocks,
                                       quantize_fp8_blocks, reference_combine)
    from tests.distributed._moe_cases import capture_graph, make_inputs

    world, kw = VARIANTS[name]
    E, K, H, M, T = 64, 6, 1024, 64, 50
    dtype = torch.bfloat16
    lb = Loopback(world, E, K, H, M, dtype, **kw)
    L = E // world
    scales = [(1.0 + (torch.arange(L, device="cuda") + r * L) / 8.0).to(dtype).view(L, 1, 1)
              for r in range(world)]

    def expert(r, o):   # expert e scales its rows by 1 + e / 8 (packed: e from the offsets;
        ex = o[0]       # fp8: the rows dequantised first)
        if lb.fp8:
            q, s = split_wire(ex, H)
            ex = (q.float() * s.repeat_interleave(128, dim=-1)).to(dtype)
        if not lb.packed:
            return ex * scales[r]
        offs = lb.backends[r].offsets(o[1])
        rows = torch.arange(ex.shape[0], device="cuda")
        e = torch.searchsorted(offs[1:], rows.to(torch.int32), right=True).clamp_max(L - 1)
        return ex * scales[r].view(L)[e].view(-1, 1)
    xs = [torch.empty(T, H, dtype=dtype, device="cuda") for _ in range(world)]
    ids = [torch.empty(T, K, dtype=torch.long, device="cuda") for _ in range(world)]
    ws = [torch.empty(T, K, dtype=torch.float32, device="cuda") for _ in range(world)]

    def step():
        outs = lb.dispatch(xs, ids, ws)
        return lb.combine([expert(r, o) for r, o in enumerate(outs)], outs, [T] * world)

    def load(seed):
        inputs = make_inputs(seed, world, [T] * world, E, K, H, dtype)
        for r in range(world):
            xs[r].copy_(inputs[r][0]); ids[r].copy_(inputs[r][1]); ws[r].copy_(inputs[r][2])
        return inputs

    if world >= 8:
        lb.warmup([T], (torch.long,), torch.float32, processes=world)
    load(1)
    g, ys = capture_graph(step)
    errs = []
    for rep in range(7):        # > 2 rotations of the lamport buffers
        inputs = load(100 + rep)
        for y in ys:
            y.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        for r in range(world):
            x, i, w = inputs[r]
            if lb.fp8:
                x = dequantize_fp8_blocks(*quantize_fp8_blocks(x))
            ref = reference_combine(x, i, w, expert_fn=lambda e, rows: rows * (1.0 + e / 8.0))
            errs.append(check_combine_output(ys[r], ref, dtype, what="loopback graph replay"))
    lb.check_errors()
    return errs


@pytest.mark.parametrize("name", ["flags", "flags-g8", "flags-g8-roles", "flags-g8-ce",
                                  "flags-packed", "flags-fp8", "flags-g8-packed-fp8",
                                  "lamport-fp8",
                                  "lamport", "lamport-t4c2", "lamport-notspin",
                                  "lamport-nodirect", "lamport-w4",
                                  pytest.param("lamport-w8", marks=pytest.mark.timeout(900))])
def test_loopback_cuda_graph_replays_fresh_inputs(name):
    (errs,) = run_ranks(_graph_worker, 1, name, timeout=850 if name == "lamport-w8" else 400,
                        env=_ENV.get(name))
    assert len(errs) == 7 * VARIANTS[name][0] and max(errs) < 2.5e-2


def _free_pdl_worker(rank, world_size):
    import random

    import torch

    from llmcomm.moe.loopback import Loopback
    from tests.distributed._moe_cases import check_identity_call, make_inputs

    E, K, H, M, dtype = 256, 8, 7168, 64, torch.bfloat16
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    pdl = {}
    room = min(32, sms // 4)   # 32: the grid of the stress tool's lam-g32 (a shared cache)
    for programs in (M, room):   # Loopback's default grid (no room: PDL off), then room
        lb = Loopback(2, E, K, H, M, dtype, num_programs=min(programs, sms // 2),
                      timeout_s=5.0, protocol="lamport")
        pdl[programs] = [be.variants["PDL"] for be in lb.backends]
    lb.warmup([0, 1, 2, 8, 17, M], processes=4)
    rng = random.Random(24)
    calls = []
    for i in range(24):
        toks = [rng.choice([0, 1, 2, 8, 17, M]) for _ in range(2)]
        inputs = make_inputs(900 + i, 2, toks, E, K, H, dtype, "random")
        calls.append((inputs, [[t.cuda() for t in inputs[r]] for r in range(2)]))
    # every call of rank 0 launched before rank 1's, with no join between a rank's calls: each
    # kernel's successor may become resident early (PDL). Identity experts: the combine is given
    # expert_x itself, so nothing runs on the host between a dispatch and its combine
    cur = torch.cuda.current_stream()
    for st in lb.streams:
        st.wait_stream(cur)
    res = [[None] * len(calls) for _ in range(2)]
    for r, (be, st) in enumerate(zip(lb.backends, lb.streams)):
        with torch.cuda.stream(st):
            for i, (_, dev) in enumerate(calls):
                x, ids, w = dev[r]
                ex, cnt, state = be.dispatch(x, ids, w)
                res[r][i] = (cnt.clone(), be.combine(ex, state, x.shape[0]))
    for st in lb.streams:
        cur.wait_stream(st)
    lb.check_errors()
    bad = [f"call {i} tokens {[len(c[0]) for c in calls[i][0]]}: {m}"
           for i in range(len(calls)) for r in range(2)
           if (m := check_identity_call(r, E, dtype, calls[i][0], *res[r][i]))]
    return pdl, room, bad


@pytest.mark.timeout(900)
def test_loopback_free_running_calls_with_pdl():
    """The lamport default launches with PDL; a Loopback keeps it where two grids of every
    rank fit the SMs (a rank's next grid can take SMs its peer's current grid needs: session
    19's free-running PDL pairs at 66 programs a rank ran into the deadline). 24 calls a rank,
    back to back on the rank streams, rank 0's all launched first, checked against the
    reference."""
    (res,) = run_ranks(_free_pdl_worker, 1, timeout=850)
    pdl, room, bad = res
    assert pdl == {64: [False, False], room: [True, True]}, pdl
    assert bad == [], bad[:4]


def _missing_worker(rank, world_size, name):
    import torch

    from llmcomm.errors import CollectiveTimeoutError
    from llmcomm.moe.loopback import Loopback

    world, kw = VARIANTS[name]
    lb = Loopback(world, 8, 2, 64, 16, torch.bfloat16, timeout_s=2.0, **kw)
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    ids = torch.tensor([[0, 7]] * 4, device="cuda")
    lb.backends[0].dispatch(x, ids, torch.rand(4, 2, device="cuda"))  # rank 1 never dispatches
    try:
        lb.backends[0].check_errors(sync=True)
    except CollectiveTimeoutError as e:
        return e.missing_ranks, str(e)
    return None


@pytest.mark.parametrize("name", ["flags", "lamport", "lamport-notspin", "flags-packed"])
def test_loopback_missing_rank_times_out_naming_it(name):
    (res,) = run_ranks(_missing_worker, 1, name, timeout=300)
    assert res is not None, "rank 0 did not raise CollectiveTimeoutError"
    missing, text = res
    assert missing == [1] and "dispatch" in text, text


def _missing_combine_worker(rank, world_size, name, T):
    """Every rank dispatches; only rank 0 combines: its poll of rank 1's partials must end at
    the deadline with the error record naming rank 1 and the combine (with ``_thread_spin``,
    the default, the deadline is each thread's own, inside the inline-PTX loop), and rank 0's
    later calls must raise instead of launching."""
    import torch

    from llmcomm.errors import CollectiveTimeoutError
    from llmcomm.moe.loopback import Loopback
    from tests.distributed._moe_cases import make_inputs

    world, kw = VARIANTS[name]
    E, K, H, M, dtype = 16, 4, 7168, 16, torch.bfloat16
    lb = Loopback(world, E, K, H, M, dtype, timeout_s=2.0, **kw)
    inputs = make_inputs(5, world, [T] * world, E, K, H, dtype)
    xs, ids, ws = ([t.to("cuda") for t in col] for col in zip(*inputs))
    outs = lb.dispatch(xs, ids, ws)
    lb.check_errors()
    be = lb.backends[0]
    be.combine(outs[0][0].clone(), outs[0][2], T)   # rank 1 never combines
    res = None
    try:
        be.check_errors(sync=True)
    except CollectiveTimeoutError as e:
        res = (e.missing_ranks, str(e))
    try:
        be.combine(outs[0][0], outs[0][2], T)
        again = "no error"
    except CollectiveTimeoutError:
        again = "raised"
    return res, again


@pytest.mark.parametrize("T", [1, 16])
@pytest.mark.parametrize("name", ["lamport", "lamport-notspin"])
def test_loopback_missing_rank_in_combine_times_out_naming_it(name, T):
    (out,) = run_ranks(_missing_combine_worker, 1, name, T, timeout=300)
    res, again = out
    assert res is not None, "rank 0's combine did not raise CollectiveTimeoutError"
    missing, text = res
    assert missing == [1] and "combine" in text, text
    assert again == "raised", again


def _warmup_worker(rank, world_size, name):
    """``warmup`` on every rank's backend (int32 and int64 ids), then calls of every token-count
    class with either ids dtype (small batches at 8 warps, 37 and 40 tokens at 16 with lamport),
    each checked against the reference: triton's compile hook must not fire. The control that
    shows the hook sees compiles: a call whose ``x`` is not 16-byte aligned (a class ``warmup``
    does not cover) must compile."""
    import time

    import torch

    from llmcomm.moe.dispatcher import warm_token_counts
    from llmcomm.moe.loopback import Loopback
    from tests._compiles import record_compiles
    from tests.distributed._moe_cases import make_inputs

    world, kw = VARIANTS[name]
    # H 4096: lamport loads 2 warp counts. M 48, a multiple of 16: warmup's only call of the
    # "other" token class is at 2 tokens (8 warps), so 37 and 40 (16 warps) use what its
    # both-warps pre-load left (with M 40, the class was warmed at 16 warps too, which hid
    # session 24's pre-load under another cache key)
    E, K, H, M, dtype = 32, 4, 4096, 48, torch.bfloat16
    lb = Loopback(world, E, K, H, M, dtype, **kw)
    t0 = time.perf_counter()
    loaded = [be.warmup(warm_token_counts(M), (torch.int32, torch.int64), torch.float32)
              for be in lb.backends]
    if lb.fp8:   # what Loopback.warmup adds to the backends': the quantisation kernel
        from llmcomm.moe.fp8 import warm_quantize

        loaded.append(warm_quantize(H, dtype, lb.device))
    warm_s = time.perf_counter() - t0
    with record_compiles() as compiled:
        errs = []
        for i, toks in enumerate(([1, 37], [16, 0], [5, 40], [0, 1], [37, 2], [40, 16], [3, 1])):
            ids_dtype = (torch.int64, torch.int32)[i % 2]
            inputs = [(x, ids.to(ids_dtype), w)
                      for x, ids, w in make_inputs(300 + i, world, toks, E, K, H, dtype)]
            errs.append(_roundtrip(lb, world, E, inputs, dtype)[1])
        after_warmup = list(compiled)
        T = 3
        xs = [torch.randn(T * H + 1, device="cuda").to(dtype)[1:].view(T, H)
              for _ in range(world)]
        ids = [torch.randint(0, E, (T, K), device="cuda") for _ in range(world)]
        ws = [torch.rand(T, K, device="cuda") for _ in range(world)]
        outs = lb.dispatch(xs, ids, ws)
        lb.combine([torch.zeros(be.cfg.expert_x_shape, dtype=dtype, device="cuda")
                    for be in lb.backends], outs, [T] * world)
        lb.check_errors()
    return loaded, warm_s, after_warmup, len(compiled) - len(after_warmup), max(errs)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", ["flags", "lamport", "flags-g8-ce", "flags-packed",
                                  "flags-fp8", "lamport-fp8"])
def test_loopback_warmup_leaves_nothing_to_compile(name):
    (res,) = run_ranks(_warmup_worker, 1, name, timeout=850)
    loaded, warm_s, after_warmup, control_compiles, err = res
    print(f"{name}: warmup loaded {loaded} kernel variants per rank in {warm_s:.1f} s")
    # dispatch + combine, 3 token classes, 2 ids dtypes; lamport at two warp counts
    # (fp8: the quantisation kernel last)
    assert all(n >= (24 if name.startswith("lamport") else 12) for n in loaded[:2]), loaded
    assert len(loaded) == 2 + VARIANTS[name][1].get("fp8", False), loaded
    assert after_warmup == [], after_warmup
    assert control_compiles > 0, "the compile hook saw nothing: the check above proves nothing"
    assert err < 2.5e-2
