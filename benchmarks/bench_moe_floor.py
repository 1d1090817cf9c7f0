"""Data-movement floor of the p2p MoE design at large batches (EP=2, one node, NVLink).

Issue 4 asks for >= 70 % of NVLink (394 GB/s one way) at 4096 tokens per rank; the p2p kernels
reached ~50 % when this was written (session 7; 66 % since session 8). This benchmark times
*unsynchronised* Triton kernels that move exactly the bytes the p2p dispatch and combine move,
with the same routing, the same ``expert_x`` contract (each row copied into every local expert
that chose it) and the same grid, but no flags, no polls and no slot atomics (the receive
buffers are read whatever they hold). What they take is a floor for any kernel of this design in
Triton; the gap to the real kernels is what synchronisation and scheduling cost. Beside them,
in the same run:

* ``wire``: rows only, ``x[t]`` stored into the peer's buffer (the dispatch's NVLink part), by
  the same kernel shape, both ranks at once;
* ``ce``: the same bytes by the copy engine (``peer_buffer.copy_(x)``), both ranks at once;
* ``expand``: the local part only (``x`` and the receive buffer into the expert slots).

CUDA-graph replays, median of repeats, max over ranks (``benchmarks._common.time_graph``).
Usage (2 GPUs): ``python3 benchmarks/bench_moe_floor.py [--tokens 4096] [--hidden 7168]``.
At decode sizes (``--tokens 128 --programs 128``, likewise 1 and 64: a token a program) the same
kernels give the floor of the small-batch target: two kernels' launches and the bytes, no polls.
Results: ``benchmarks/results/moe_floor_ep2.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

NVLINK_GBPS = 394.0


def _kernels():
    import triton
    import triton.language as tl

    from llmcomm.kernels.moe import _combine_pair_token, _combine_two_tokens, _flag_signal

    @triton.jit
    def _round_fence(flag_ptr, value, NT: tl.constexpr):
        """The p2p kernels' end of a round (``_signal_peers``): barrier, then a posted release
        store of ``value`` into the peer's flag."""
        tl.debug_barrier()
        _flag_signal(flag_ptr, value, True, NT)

    @triton.jit
    def _slots_of(t64, slot_tab, ids_tab, cursor, RANK: tl.constexpr, K: tl.constexpr,
                  L: tl.constexpr, CAP: tl.constexpr, BLOCK_K: tl.constexpr,
                  ATOMIC: tl.constexpr):
        """[BLOCK_K] slots of token t: from the table, or (ATOMIC) taken from the per-expert
        cursors in one vector atomic, as the p2p kernels do (modulo CAP: replays go on)."""
        offs_k = tl.arange(0, BLOCK_K)
        mk = offs_k < K
        if ATOMIC:
            ids = tl.load(ids_tab + t64 * K + offs_k, mask=mk, other=-1)
            el = ids - RANK * L
            loc = mk & (el >= 0) & (el < L)
            got = tl.atomic_add(cursor + tl.where(loc, el, 0), tl.full([BLOCK_K], 1, tl.int32),
                                mask=loc, sem="relaxed", scope="gpu")
            slot = tl.where(loc, tl.cast(el, tl.int64) * CAP + got % CAP, -1)
        else:
            slot = tl.load(slot_tab + t64 * K + offs_k, mask=mk, other=-1)
        return slot

    @triton.jit
    def _place(row, t64, slot_tab, ids_tab, cursor, expert_x, RANK: tl.constexpr,
               H: tl.constexpr, K: tl.constexpr, L: tl.constexpr, CAP: tl.constexpr,
               BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr,
               ATOMIC: tl.constexpr):
        """``row`` into every local slot of token t: scalar slot loads (the floor), or a slot
        vector whose entries are extracted one by one (``VEC``, as the p2p kernels do)."""
        offs = tl.arange(0, BLOCK_H)
        mh = offs < H
        offs_k = tl.arange(0, BLOCK_K)
        if VEC:
            slot = _slots_of(t64, slot_tab, ids_tab, cursor, RANK, K, L, CAP, BLOCK_K, ATOMIC)
            for k in tl.static_range(K):
                sk = tl.max(tl.where(offs_k == k, slot, -1), axis=0)
                tl.store(expert_x + tl.maximum(sk, 0) * H + offs, row, mask=mh & (sk >= 0))
        else:
            for k in tl.static_range(K):
                sk = tl.load(slot_tab + t64 * K + k)
                tl.store(expert_x + tl.maximum(sk, 0) * H + offs, row, mask=mh & (sk >= 0))

    @triton.jit
    def synth_dispatch(x, peer_recv, my_recv, expert_x, slot_own, slot_peer, ids_own, ids_peer,
                       cursor, flag, T, RANK: tl.constexpr, H: tl.constexpr, K: tl.constexpr,
                       L: tl.constexpr, CAP: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_K: tl.constexpr, G: tl.constexpr, WIRE: tl.constexpr,
                       LOCAL: tl.constexpr, VEC: tl.constexpr, ATOMIC: tl.constexpr,
                       PHASED: tl.constexpr, ROUND: tl.constexpr, FENCE: tl.constexpr,
                       NT: tl.constexpr):
        """Tokens t = pid + j*G: x[t] -> peer_recv[t] (WIRE); x[t] into its own local slots
        and my_recv[t] into the slots of the peer's token t (LOCAL). Interleaved per token
        (the floor), or (PHASED) in rounds of ROUND tokens as the p2p "flags" dispatch: send
        the round, (FENCE) barrier + a posted release store to the peer, then the own
        copies (rows loaded again), then the received rows."""
        pid = tl.program_id(0)
        offs = tl.arange(0, BLOCK_H)
        mh = offs < H
        n = tl.cdiv(T - pid, G)
        if PHASED:
            for r0 in range(0, n, ROUND):
                r1 = tl.minimum(r0 + ROUND, n)
                for j in range(r0, r1):
                    t64 = tl.cast(pid + j * G, tl.int64)
                    row = tl.load(x + t64 * H + offs, mask=mh)
                    tl.store(peer_recv + t64 * H + offs, row, mask=mh)
                if FENCE:
                    _round_fence(flag + pid, r0, NT)
                for j in range(r0, r1):
                    t64 = tl.cast(pid + j * G, tl.int64)
                    row = tl.load(x + t64 * H + offs, mask=mh)
                    _place(row, t64, slot_own, ids_own, cursor, expert_x, RANK, H, K, L, CAP,
                           BLOCK_H, BLOCK_K, VEC, ATOMIC)
                for j in range(r0, r1):
                    t64 = tl.cast(pid + j * G, tl.int64)
                    r = tl.load(my_recv + t64 * H + offs, mask=mh)
                    _place(r, t64, slot_peer, ids_peer, cursor, expert_x, RANK, H, K, L, CAP,
                           BLOCK_H, BLOCK_K, VEC, ATOMIC)
        else:
            for j in range(0, n):
                t64 = tl.cast(pid + j * G, tl.int64)
                row = tl.load(x + t64 * H + offs, mask=mh)
                if WIRE:
                    tl.store(peer_recv + t64 * H + offs, row, mask=mh)
                if LOCAL:
                    r = tl.load(my_recv + t64 * H + offs, mask=mh)
                    _place(row, t64, slot_own, ids_own, cursor, expert_x, RANK, H, K, L, CAP,
                           BLOCK_H, BLOCK_K, VEC, ATOMIC)
                    _place(r, t64, slot_peer, ids_peer, cursor, expert_x, RANK, H, K, L, CAP,
                           BLOCK_H, BLOCK_K, VEC, ATOMIC)
                if FENCE:   # interleaved, with the p2p kernels' per-round barrier + release
                    if (j + 1) % ROUND == 0:
                        _round_fence(flag + pid, j, NT)

    @triton.jit
    def _partial(expert_out, slot_tab, w, t64, H: tl.constexpr, K: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr):
        offs = tl.arange(0, BLOCK_H)
        mh = offs < H
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_H], tl.float32)
        if VEC:
            sv = tl.load(slot_tab + t64 * K + offs_k, mask=offs_k < K, other=-1)
            wv = tl.load(w + t64 * K + offs_k, mask=offs_k < K, other=0.0)
        for k in tl.static_range(K):
            if VEC:
                sk = tl.max(tl.where(offs_k == k, sv, -1), axis=0)
                wk = tl.sum(tl.where(offs_k == k, wv, 0.0), axis=0)
            else:
                sk = tl.load(slot_tab + t64 * K + k)
                wk = tl.load(w + t64 * K + k)
            v = tl.load(expert_out + tl.maximum(sk, 0) * H + offs, mask=mh & (sk >= 0),
                        other=0.0)
            acc += wk * v.to(tl.float32)
        return acc

    @triton.jit
    def synth_combine(expert_out, slot_own, slot_peer, w, peer_comb, my_comb, y, flag, T,
                      H: tl.constexpr, K: tl.constexpr, BLOCK_H: tl.constexpr,
                      BLOCK_K: tl.constexpr, G: tl.constexpr, VEC: tl.constexpr,
                      PHASED: tl.constexpr, ROUND: tl.constexpr, FENCE: tl.constexpr,
                      NT: tl.constexpr):
        """Token t: the peer's partial (its rows here, weighted) -> peer_comb[t]; own partial
        plus my_comb[t] -> y[t]; fp32 sums. Interleaved per token (the floor), or (PHASED) in
        rounds as the p2p "flags" combine: push the round, (FENCE) barrier + posted release,
        then finish the own tokens."""
        pid = tl.program_id(0)
        offs = tl.arange(0, BLOCK_H)
        mh = offs < H
        n = tl.cdiv(T - pid, G)
        if PHASED:
            for r0 in range(0, n, ROUND):
                r1 = tl.minimum(r0 + ROUND, n)
                for j in range(r0, r1):
                    t64 = tl.cast(pid + j * G, tl.int64)
                    accp = _partial(expert_out, slot_peer, w, t64, H, K, BLOCK_H, BLOCK_K, VEC)
                    tl.store(peer_comb + t64 * H + offs, accp.to(peer_comb.dtype.element_ty),
                             mask=mh)
                if FENCE:
                    _round_fence(flag + pid, r0, NT)
                for j in range(r0, r1):
                    t64 = tl.cast(pid + j * G, tl.int64)
                    acco = _partial(expert_out, slot_own, w, t64, H, K, BLOCK_H, BLOCK_K, VEC)
                    c = tl.load(my_comb + t64 * H + offs, mask=mh)
                    tl.store(y + t64 * H + offs, (acco + c.to(tl.float32)).to(
                        y.dtype.element_ty), mask=mh)
        else:
            for j in range(0, n):
                t64 = tl.cast(pid + j * G, tl.int64)
                accp = _partial(expert_out, slot_peer, w, t64, H, K, BLOCK_H, BLOCK_K, VEC)
                acco = _partial(expert_out, slot_own, w, t64, H, K, BLOCK_H, BLOCK_K, VEC)
                tl.store(peer_comb + t64 * H + offs, accp.to(peer_comb.dtype.element_ty),
                         mask=mh)
                c = tl.load(my_comb + t64 * H + offs, mask=mh)
                tl.store(y + t64 * H + offs, (acco + c.to(tl.float32)).to(y.dtype.element_ty),
                         mask=mh)
                if FENCE:   # interleaved, with the p2p kernels' per-round barrier + release
                    if (j + 1) % ROUND == 0:
                        _round_fence(flag + pid, j, NT)

    @triton.jit
    def synth_combine_token(expert_out, ids, w, y, recv_w, comb, slot_map, flag, T,
                            RANK: tl.constexpr, M: tl.constexpr, H: tl.constexpr,
                            K: tl.constexpr, L: tl.constexpr, E: tl.constexpr,
                            BLOCK_H: tl.constexpr, G: tl.constexpr, ROUND: tl.constexpr,
                            FENCE: tl.constexpr, NT: tl.constexpr, LAGGED: tl.constexpr = 0):
        """The floor's combine loop (token t's push and finish in one step, optionally the
        per-round barrier + release) calling the real kernels' step, ``_combine_pair_token``,
        on the real workspace layout (``slot_map`` [W * M, K] int32, ``recv_w`` / ``comb`` one
        pointer per rank): what the real step costs without the real kernel's round loop.
        ``LAGGED``: the real kernels' schedule instead (rounds of ``ROUND`` tokens; the pushes
        of round r with the finishes of round r - 1; the first round's pushes and the last
        round's finishes two per step, as ``PAIR2``), still without waits."""
        pid = tl.program_id(0)
        n = tl.cdiv(T - pid, G)
        if LAGGED:
            nr = tl.cdiv(n, ROUND)
            for r in range(0, nr + 1):
                p0 = r * ROUND
                pc = tl.where(r < nr, tl.minimum(n - p0, ROUND), 0)
                o0 = (r - 1) * ROUND
                oc = tl.where(r >= 1, tl.minimum(n - o0, ROUND), 0)
                if (pc > 0) & (oc > 0):
                    for i in range(0, tl.maximum(pc, oc)):
                        _combine_two_tokens(tl.cast(pid + (p0 + i) * G, tl.int64), i < pc,
                                            tl.cast(pid + (o0 + i) * G, tl.int64), i < oc, 0, 1,
                                            expert_out, ids, w, y, recv_w, comb, slot_map, RANK,
                                            M, H, K, L, E, BLOCK_H)
                elif pc > 0:
                    h = tl.cdiv(pc, 2)
                    for i in range(0, h):
                        _combine_two_tokens(tl.cast(pid + (p0 + i) * G, tl.int64), i < pc,
                                            tl.cast(pid + (p0 + i + h) * G, tl.int64),
                                            i + h < pc, 0, 0, expert_out, ids, w, y, recv_w,
                                            comb, slot_map, RANK, M, H, K, L, E, BLOCK_H)
                else:
                    h = tl.cdiv(oc, 2)
                    for i in range(0, h):
                        _combine_two_tokens(tl.cast(pid + (o0 + i) * G, tl.int64), i < oc,
                                            tl.cast(pid + (o0 + i + h) * G, tl.int64),
                                            i + h < oc, 1, 1, expert_out, ids, w, y, recv_w,
                                            comb, slot_map, RANK, M, H, K, L, E, BLOCK_H)
                if FENCE:
                    _round_fence(flag + pid, r, NT)
        else:
            for j in range(0, n):
                t64 = tl.cast(pid + j * G, tl.int64)
                _combine_pair_token(t64, j >= 0, t64, j >= 0, expert_out, ids, w, y, recv_w,
                                    comb, slot_map, RANK, M, H, K, L, E, BLOCK_H)
                if FENCE:
                    if (j + 1) % ROUND == 0:
                        _round_fence(flag + pid, j, NT)

    return synth_dispatch, synth_combine, synth_combine_token


def _slots(ids_src, rank, L, CAP, fill):
    """[T, K] slot (local expert * CAP + position) of each id of ``ids_src`` owned by ``rank``
    (first occurrences; -1 elsewhere), positions continuing from ``fill`` [L] (updated)."""
    import torch

    out = torch.full(ids_src.shape, -1, dtype=torch.int64)
    for t, row in enumerate(ids_src.tolist()):
        seen = set()
        for k, e in enumerate(row):
            if e // L == rank and e not in seen:
                seen.add(e)
                out[t, k] = (e - rank * L) * CAP + fill[e - rank * L]
                fill[e - rank * L] += 1
    return out


def _worker(rank, world, T, H, E, K, G, warps, rungs=None, round_tokens=0):
    import torch
    import torch.distributed as dist
    import torch.distributed._symmetric_memory as symm_mem

    from benchmarks._common import time_graph

    synth_dispatch, synth_combine, synth_combine_token = _kernels()
    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    L, CAP = E // world, world * T
    dt = torch.bfloat16
    g = torch.Generator().manual_seed(7)
    ids = [torch.rand(T, E, generator=g).topk(K, dim=1).indices for _ in range(world)]
    peer = 1 - rank
    fill = [0] * L
    slot_own = _slots(ids[rank], rank, L, CAP, fill).to(dev)
    slot_peer = _slots(ids[peer], rank, L, CAP, fill).to(dev)
    ids_own, ids_peer = ids[rank].to(dev, torch.int32), ids[peer].to(dev, torch.int32)
    rows_to_peer = int((ids[rank] // L == peer).any(dim=1).sum())
    x = torch.randn(T, H, device=dev, dtype=dt)
    w = torch.rand(T, K, device=dev)
    expert_x = torch.empty(L * CAP, H, device=dev, dtype=dt)
    cursor = torch.zeros(L, dtype=torch.int32, device=dev)
    nrow = 2 * T * H * 2
    nbytes = nrow + 4 * 1024
    local = symm_mem.empty(nbytes, dtype=torch.uint8, device=dev)
    hdl = symm_mem.rendezvous(local, dist.group.WORLD.group_name)
    mine = local[:nrow].view(dt).view(2, T, H)
    pbuf = hdl.get_buffer(peer, [nbytes], torch.uint8)
    theirs = pbuf[:nrow].view(dt).view(2, T, H)
    flag = pbuf[nrow:].view(torch.int32)
    local.zero_()
    # the real kernels' layout for the real combine step (rung c_token*): rows s * T + t
    slot_map = torch.empty(2 * T, K, dtype=torch.int32, device=dev)
    slot_map[rank * T:(rank + 1) * T] = slot_own.to(torch.int32)
    slot_map[peer * T:(peer + 1) * T] = slot_peer.to(torch.int32)
    rw = torch.rand(2 * T, K, device=dev)
    cloc = symm_mem.empty(2 * T * H, dtype=dt, device=dev)
    chdl = symm_mem.rendezvous(cloc, dist.group.WORLD.group_name)
    cpeer = chdl.get_buffer(peer, [2 * T * H], dt)
    comb_t = (cloc, cpeer) if rank == 0 else (cpeer, cloc)
    cloc.zero_()
    ids_own64 = ids[rank].to(dev)
    torch.cuda.synchronize()
    dist.barrier()
    y = torch.empty(T, H, device=dev, dtype=dt)
    BLOCK_H = 1 << (H - 1).bit_length()
    kw = dict(H=H, K=K, BLOCK_H=BLOCK_H, BLOCK_K=1 << (K - 1).bit_length(), G=G,
              num_warps=warps, NT=32 * warps)

    def disp(wire=1, loc=1, vec=0, atomic=0, phased=0, fence=0):
        synth_dispatch[(G,)](x, theirs[0], mine[0], expert_x, slot_own, slot_peer, ids_own,
                             ids_peer, cursor, flag, T, RANK=rank, L=L, CAP=CAP, WIRE=wire,
                             LOCAL=loc, VEC=vec, ATOMIC=atomic, PHASED=phased, ROUND=ROUND,
                             FENCE=fence, **kw)

    def comb(vec=0, phased=0, fence=0):
        synth_combine[(G,)](expert_x, slot_own, slot_peer, w, theirs[1], mine[1], y, flag, T,
                            VEC=vec, PHASED=phased, ROUND=ROUND, FENCE=fence, **kw)

    # the "flags" kernels' default: 4 rounds (--round: tokens per round of the FENCE rungs)
    ROUND = round_tokens or max(1, -(-(-(-T // G)) // 4))
    res = {"rows_to_peer": rows_to_peer, "round_tokens": ROUND,
           "local_rows": int((slot_own >= 0).sum() + (slot_peer >= 0).sum())}

    def tg(fn):
        return round(time_graph(fn, iters=10, reps=7), 2)

    def comb_tok(fence=0, lagged=0):
        synth_combine_token[(G,)](expert_x, ids_own64, w, y, (rw, rw), comb_t, slot_map, flag,
                                  T, RANK=rank, M=T, L=L, E=E, ROUND=ROUND, FENCE=fence,
                                  H=H, K=K, BLOCK_H=BLOCK_H, G=G, num_warps=warps,
                                  NT=32 * warps, LAGGED=lagged)

    ladder = {
        "dispatch_us": disp, "combine_us": comb, "pair_us": lambda: (disp(), comb()),
        "wire_us": lambda: disp(1, 0), "expand_us": lambda: disp(0, 1),
        "ce_us": lambda: theirs[0].copy_(x),
        # the ladder from the floor towards the "flags" kernels' structure, one step at a time
        "d_vec_us": lambda: disp(vec=1), "d_vec_atomic_us": lambda: disp(vec=1, atomic=1),
        "d_phased_us": lambda: disp(vec=1, atomic=1, phased=1),
        "d_phased_fence_us": lambda: disp(vec=1, atomic=1, phased=1, fence=1),
        "d_phased_fence_noatomic_us": lambda: disp(vec=1, phased=1, fence=1),
        "c_vec_us": lambda: comb(vec=1), "c_phased_us": lambda: comb(vec=1, phased=1),
        "c_phased_fence_us": lambda: comb(vec=1, phased=1, fence=1),
        "pair_ladder_top_us": lambda: (disp(vec=1, atomic=1, phased=1, fence=1),
                                       comb(vec=1, phased=1, fence=1)),
        # the interleaved order (the kernels since session 7) with atomics and the round fence
        "d_interleaved_fence_us": lambda: disp(vec=1, atomic=1, fence=1),
        "c_interleaved_fence_us": lambda: comb(vec=1, fence=1),
        # the real combine step (session 8) in this loop, without / with the round fence
        "c_token_us": comb_tok, "c_token_fence_us": lambda: comb_tok(fence=1),
        # ... and in the real kernels' schedule (round r's pushes with round r - 1's finishes,
        # one-sided first and last rounds two tokens a step), no waits (untimed, session 8)
        "c_token_lagged_fence_us": lambda: comb_tok(fence=1, lagged=1),
    }
    for name, fn in ladder.items():
        if rungs is None or name in rungs:
            res[name] = tg(fn)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--programs", default="128,256")
    ap.add_argument("--warps", type=int, default=16)
    ap.add_argument("--round", type=int, default=0,
                    help="tokens per round of the rungs with a round fence (default: the "
                         "kernels' default, a quarter of a program's tokens)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--rungs", default="",
                    help="comma-separated result names to time (default: all), e.g. "
                         "combine_us,c_interleaved_fence_us,c_token_fence_us")
    args = ap.parse_args()
    rungs = [r for r in args.rungs.split(",") if r] or None

    from benchmarks._common import environment
    from tests._dist import run_ranks

    out = {"meta": environment(), "args": vars(args), "rows": []}
    for G in [int(v) for v in args.programs.split(",")]:
        res = run_ranks(_worker, 2, args.tokens, args.hidden, args.experts, args.top_k, G,
                        args.warps, rungs, args.round, backend="nccl", timeout=300)
        r = dict(res[0], programs=G)
        wire_bytes = r["rows_to_peer"] * args.hidden * 2   # one direction, one kernel
        for k in ("dispatch", "combine", "wire", "ce", "d_phased_fence", "c_phased_fence"):
            if f"{k}_us" in r:
                r[f"{k}_pct_nvlink"] = round(100 * wire_bytes / (r[f"{k}_us"] * 1e-6) / 1e9
                                             / NVLINK_GBPS, 1)
        for k in ("pair", "pair_ladder_top"):
            if f"{k}_us" in r:
                r[f"{k}_pct_nvlink"] = round(100 * 2 * wire_bytes / (r[f"{k}_us"] * 1e-6)
                                             / 1e9 / NVLINK_GBPS, 1)
        out["rows"].append(r)
        print(json.dumps(r), flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "moe_floor_ep2.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
