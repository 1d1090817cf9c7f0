"""A one-token lamport receive with its claim in a worker warp, end to end (one GPU, session 29).

Session 28's ``probe_ws_claim.py`` timed one step of a receive in a loop: the slot claim in a
1-warp Gluon worker partition overlapped the row's wait (579 ns a step against 1257 in
series). This probe times the whole exchange the small-batch dispatch makes, once per launch,
as the kernel's length: ``P`` pairs of programs, in each a *sender* (loads a token's row and
ids, stores the meta -- ``K`` ids and ``K`` weight bits -- then the row, ``-0.0`` written as
``+0.0``, into sentinel-filled receive buffers) and a *receiver* (waits until the meta and,
where the token has a local expert, the row have landed, claims a slot per local expert with
a relaxed vector ``atomic_add`` on a cursor, copies the row into each slot's row of
``expert_x``, writes the slot map, then resets the meta and row to the sentinel, so the next
launch starts as this one did). Receivers, both in Gluon, the same loads and stores:

* ``serial`` (as ``_lamport_recv_token`` today): meta and row polled together by every warp
  (the row speculatively), then the claim, then the copies;
* ``split``: a 1-warp worker partition polls the meta, hands it over in shared memory (an
  mbarrier), claims, hands the slots over (a second mbarrier) and resets the meta; the 8-warp
  default partition waits for the meta, polls the row (the claim's round trip in flight
  meanwhile), waits for the slots and copies;
* ``split2``: the 8-warp default partition polls meta and row together as ``serial`` does,
  while a 1-warp worker polls the meta on its own and claims; the default partition waits for
  the slots (one mbarrier: the worker's meta reads are then done too), copies, and resets.

The sender's program is the same in both (a sender's worker warp does nothing), so the
kernels' difference is the receive's. Every spin stops after ``2**16`` polls and raises an
error flag the host checks; the first launch of each kind is checked against the inputs.

Usage (one GPU): ``python3 benchmarks/probe_ws_recv.py [--pairs 1,32] [--order serial,split]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks._common import time_graph, write_probe_json  # noqa: E402

#: a probe's experts a rank, slots an expert, top-k; the sender's ids put ``K // 2`` of its
#: ``K`` experts on the receiving rank (rank 0: experts ``[0, L)``), as at EP=2
L_, CAP_, K_ = 8, 64, 8


def _kernels():
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier

    # a CTA barrier: gl.thread_barrier in triton 3.6, gl.barrier from 3.7 on
    thread_barrier = getattr(gl, "thread_barrier", None) or gl.barrier

    @gluon.jit
    def _layouts(BLOCK_H: gl.constexpr, BLOCK_K: gl.constexpr):
        nw: gl.constexpr = gl.num_warps()
        lh: gl.constexpr = gl.BlockedLayout([8], [32], [nw], [0])
        lk: gl.constexpr = gl.BlockedLayout([1], [32], [nw], [0])
        return gl.arange(0, BLOCK_H, layout=lh), gl.arange(0, BLOCK_K, layout=lk)

    @gluon.jit
    def _send(p, x, ids_src, meta, rowbuf, H: gl.constexpr, K: gl.constexpr,
              BLOCK_H: gl.constexpr, BLOCK_K: gl.constexpr):
        offs_h, offs_k = _layouts(BLOCK_H, BLOCK_K)
        row = gl.load(x + p * H + offs_h, mask=offs_h < H)
        ids = gl.load(ids_src + p * K + offs_k, mask=offs_k < K)
        gl.store(meta + p * (2 * K) + offs_k, ids, mask=offs_k < K)
        gl.store(meta + p * (2 * K) + K + offs_k, ids * 0 + 1065353216, mask=offs_k < K)
        gl.store(rowbuf + p * H + offs_h, gl.where(row == 0, 0.0, row).to(row.dtype),
                 mask=offs_h < H)

    @gluon.jit
    def _claim(p, ids, offs_k, cursor, L: gl.constexpr, K: gl.constexpr, CAP: gl.constexpr):
        local = (offs_k < K) & (ids >= 0) & (ids < L)
        slot = gl.atomic_add(cursor + p * L + gl.where(local, ids, 0), ids * 0 + 1, mask=local,
                             sem="relaxed", scope="gpu")
        return gl.where(local, ids * CAP + (slot & (CAP - 1)), -1)

    @gluon.jit
    def _place(p, row, entry, offs_h, offs_k, expert_x, slot_map, H: gl.constexpr,
               K: gl.constexpr, L: gl.constexpr, CAP: gl.constexpr):
        for k in gl.static_range(K):
            e = gl.max(gl.where(offs_k == k, entry, -1), axis=0)
            gl.store(expert_x + (p * (L * CAP) + gl.maximum(e, 0)) * H + offs_h, row,
                     mask=offs_h < gl.where(e >= 0, H, 0))
        gl.store(slot_map + p * K + offs_k, entry, mask=offs_k < K)

    @gluon.jit
    def _sentinel_row(offs_h):
        return (offs_h * 0 - 32768).to(gl.int16).to(gl.bfloat16, bitcast=True)

    @gluon.jit
    def _row_pending(row, offs_h, n):
        bits = row.to(gl.int16, bitcast=True)
        return gl.sum(((offs_h < n) & (bits == -32768)).to(gl.int32), axis=0)

    @gluon.jit
    def _poll_token(mp, rp, offs_h, offs_k, err, pid, H: gl.constexpr, K: gl.constexpr,
                    L: gl.constexpr):
        """The meta and (speculatively) the row polled together until every part needed
        has landed; returns (ids, row, mine)."""
        mk = offs_k < K
        ids = gl.load(mp + offs_k, mask=mk, other=-1, volatile=True)
        wb = gl.load(mp + K + offs_k, mask=mk, other=0, volatile=True)
        row = gl.load(rp + offs_h, mask=offs_h < H, other=0.0, volatile=True)
        mine = gl.sum((mk & (ids >= 0) & (ids < L)).to(gl.int32), axis=0) > 0
        pend = gl.sum((mk & ((ids == -2147483647 - 1) | (wb == -2147483647 - 1))).to(gl.int32),
                      axis=0) + gl.where(mine, _row_pending(row, offs_h, H), 0)
        spins = 0
        while (pend > 0) & (spins < 65536):
            ids = gl.load(mp + offs_k, mask=mk, other=-1, volatile=True)
            wb = gl.load(mp + K + offs_k, mask=mk, other=0, volatile=True)
            row = gl.load(rp + offs_h, mask=offs_h < H, other=0.0, volatile=True)
            mine = gl.sum((mk & (ids >= 0) & (ids < L)).to(gl.int32), axis=0) > 0
            pend = gl.sum((mk & ((ids == -2147483647 - 1) | (wb == -2147483647 - 1))
                           ).to(gl.int32), axis=0) + gl.where(mine, _row_pending(row, offs_h, H),
                                                               0)
            spins += 1
        if pend > 0:
            gl.store(err + pid, 1)
        return ids, row, mine

    @gluon.jit
    def _reset(mp, rp, offs_h, offs_k, mine, H: gl.constexpr, K: gl.constexpr):
        mk = offs_k < K
        gl.store(mp + offs_k, offs_k * 0 + (-2147483647 - 1), mask=mk)
        gl.store(mp + K + offs_k, offs_k * 0 + (-2147483647 - 1), mask=mk)
        gl.store(rp + offs_h, _sentinel_row(offs_h), mask=offs_h < gl.where(mine, H, 0))

    @gluon.jit
    def serial_kernel(x, ids_src, meta, rowbuf, cursor, expert_x, slot_map, err,
                      H: gl.constexpr, K: gl.constexpr, L: gl.constexpr, CAP: gl.constexpr,
                      BLOCK_H: gl.constexpr, BLOCK_K: gl.constexpr):
        pid = gl.program_id(0)
        p = pid // 2
        if pid % 2 == 0:
            _send(p, x, ids_src, meta, rowbuf, H, K, BLOCK_H, BLOCK_K)
        else:
            offs_h, offs_k = _layouts(BLOCK_H, BLOCK_K)
            mp = meta + p * (2 * K)
            rp = rowbuf + p * H
            ids, row, mine = _poll_token(mp, rp, offs_h, offs_k, err, pid, H, K, L)
            entry = _claim(p, ids, offs_k, cursor, L, K, CAP)
            _place(p, row, entry, offs_h, offs_k, expert_x, slot_map, H, K, L, CAP)
            thread_barrier()
            _reset(mp, rp, offs_h, offs_k, mine, H, K)

    @gluon.jit
    def _ws2_default(x, ids_src, meta, rowbuf, expert_x, slot_map, err, sm, bars,
                     H: gl.constexpr, K: gl.constexpr, L: gl.constexpr, CAP: gl.constexpr,
                     BLOCK_H: gl.constexpr, BLOCK_K: gl.constexpr):
        bar_meta, bar_slot = bars
        sm_ids, sm_entry = sm
        pid = gl.program_id(0)
        p = pid // 2
        if pid % 2 == 0:
            _send(p, x, ids_src, meta, rowbuf, H, K, BLOCK_H, BLOCK_K)
        else:
            offs_h, offs_k = _layouts(BLOCK_H, BLOCK_K)
            mp = meta + p * (2 * K)
            rp = rowbuf + p * H
            ids, row, mine = _poll_token(mp, rp, offs_h, offs_k, err, pid, H, K, L)
            mbarrier.wait(bar_slot, 0)   # the worker's claim (and its meta reads) done
            entry = sm_entry.load(offs_k.type.layout)
            _place(p, row, entry, offs_h, offs_k, expert_x, slot_map, H, K, L, CAP)
            thread_barrier()
            _reset(mp, rp, offs_h, offs_k, mine, H, K)

    @gluon.jit
    def _ws2_worker(meta, cursor, err, sm, bars, K: gl.constexpr, L: gl.constexpr,
                    CAP: gl.constexpr, BLOCK_K: gl.constexpr):
        bar_meta, bar_slot = bars
        sm_ids, sm_entry = sm
        pid = gl.program_id(0)
        p = pid // 2
        if pid % 2 == 1:
            lk: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
            offs_k = gl.arange(0, BLOCK_K, layout=lk)
            ids = _poll_meta(meta + p * (2 * K), offs_k, err, pid, K)
            entry = _claim(p, ids, offs_k, cursor, L, K, CAP)
            sm_entry.store(entry)
            thread_barrier()
            mbarrier.arrive(bar_slot, count=1)

    @gluon.jit
    def _poll_meta(mp, offs_k, err, pid, K: gl.constexpr):
        mk = offs_k < K
        ids = gl.load(mp + offs_k, mask=mk, other=-1, volatile=True)
        wb = gl.load(mp + K + offs_k, mask=mk, other=0, volatile=True)
        pend = gl.sum((mk & ((ids == -2147483647 - 1) | (wb == -2147483647 - 1))).to(gl.int32),
                      axis=0)
        spins = 0
        while (pend > 0) & (spins < 65536):
            ids = gl.load(mp + offs_k, mask=mk, other=-1, volatile=True)
            wb = gl.load(mp + K + offs_k, mask=mk, other=0, volatile=True)
            pend = gl.sum((mk & ((ids == -2147483647 - 1) | (wb == -2147483647 - 1))
                           ).to(gl.int32), axis=0)
            spins += 1
        if pend > 0:
            gl.store(err + pid, 3)
        return ids

    @gluon.jit
    def _ws_default(x, ids_src, meta, rowbuf, expert_x, slot_map, err, sm, bars,
                    H: gl.constexpr, K: gl.constexpr, L: gl.constexpr, CAP: gl.constexpr,
                    BLOCK_H: gl.constexpr, BLOCK_K: gl.constexpr):
        bar_meta, bar_slot = bars
        sm_ids, sm_entry = sm
        pid = gl.program_id(0)
        p = pid // 2
        if pid % 2 == 0:
            _send(p, x, ids_src, meta, rowbuf, H, K, BLOCK_H, BLOCK_K)
        else:
            offs_h, offs_k = _layouts(BLOCK_H, BLOCK_K)
            mk = offs_k < K
            rp = rowbuf + p * H
            mbarrier.wait(bar_meta, 0)
            ids = sm_ids.load(offs_k.type.layout)
            mine = gl.sum((mk & (ids >= 0) & (ids < L)).to(gl.int32), axis=0) > 0
            rmask = offs_h < gl.where(mine, H, 0)
            row = gl.load(rp + offs_h, mask=rmask, other=0.0, volatile=True)
            pend = _row_pending(row, offs_h, gl.where(mine, H, 0))
            spins = 0
            while (pend > 0) & (spins < 65536):
                row = gl.load(rp + offs_h, mask=rmask, other=0.0, volatile=True)
                pend = _row_pending(row, offs_h, gl.where(mine, H, 0))
                spins += 1
            if pend > 0:
                gl.store(err + pid, 2)
            mbarrier.wait(bar_slot, 0)
            entry = sm_entry.load(offs_k.type.layout)
            _place(p, row, entry, offs_h, offs_k, expert_x, slot_map, H, K, L, CAP)
            thread_barrier()
            gl.store(rp + offs_h, _sentinel_row(offs_h), mask=rmask)

    @gluon.jit
    def _ws_worker(meta, cursor, err, sm, bars, K: gl.constexpr, L: gl.constexpr,
                   CAP: gl.constexpr, BLOCK_K: gl.constexpr):
        bar_meta, bar_slot = bars
        sm_ids, sm_entry = sm
        pid = gl.program_id(0)
        p = pid // 2
        if pid % 2 == 1:
            lk: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
            offs_k = gl.arange(0, BLOCK_K, layout=lk)
            mp = meta + p * (2 * K)
            ids = _poll_meta(mp, offs_k, err, pid, K)
            sm_ids.store(ids)
            thread_barrier()
            mbarrier.arrive(bar_meta, count=1)
            entry = _claim(p, ids, offs_k, cursor, L, K, CAP)
            sm_entry.store(entry)
            thread_barrier()
            mbarrier.arrive(bar_slot, count=1)
            gl.store(mp + offs_k, ids * 0 + (-2147483647 - 1), mask=offs_k < K)
            gl.store(mp + K + offs_k, ids * 0 + (-2147483647 - 1), mask=offs_k < K)

    def _split(default_fn, worker_fn):
        """A kernel whose receive is ``default_fn`` (the program's warps) beside ``worker_fn``
        (one more warp), two int32 [BLOCK_K] shared buffers and two mbarriers between them."""
        @gluon.jit
        def kernel(x, ids_src, meta, rowbuf, cursor, expert_x, slot_map, err, H: gl.constexpr,
                   K: gl.constexpr, L: gl.constexpr, CAP: gl.constexpr, BLOCK_H: gl.constexpr,
                   BLOCK_K: gl.constexpr):
            sl: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
            sm = (gl.allocate_shared_memory(gl.int32, [BLOCK_K], sl),
                  gl.allocate_shared_memory(gl.int32, [BLOCK_K], sl))
            bar_meta = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
            bar_slot = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
            mbarrier.init(bar_meta, count=1)
            mbarrier.init(bar_slot, count=1)
            bars = (bar_meta, bar_slot)
            gl.warp_specialize([(default_fn, (x, ids_src, meta, rowbuf, expert_x, slot_map, err,
                                              sm, bars, H, K, L, CAP, BLOCK_H, BLOCK_K)),
                                (worker_fn, (meta, cursor, err, sm, bars, K, L, CAP, BLOCK_K))],
                               [1], [48])
        return kernel

    return {"serial": serial_kernel, "split": _split(_ws_default, _ws_worker),
            "split2": _split(_ws2_default, _ws2_worker)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--pairs", default="1,32")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--order", default="serial,split,split2,split2,split,serial")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results"))
    args = ap.parse_args()

    import torch
    import triton

    kernels = _kernels()
    H, K, L = args.hidden, K_, L_
    BLOCK_H, BLOCK_K = triton.next_power_of_2(H), triton.next_power_of_2(K)
    rows = []
    for P in (int(v) for v in args.pairs.split(",")):
        x = torch.randn(P, H, device="cuda").to(torch.bfloat16)
        # each token: K // 2 experts on the receiving rank ([0, L)), K // 2 elsewhere
        loc = torch.stack([torch.randperm(L)[:K // 2] for _ in range(P)])
        far = L + torch.stack([torch.randperm(L)[:K - K // 2] for _ in range(P)])
        ids = torch.cat([loc, far], 1)[:, torch.randperm(K)].to(torch.int32).cuda()
        for kind in args.order.split(","):
            meta = torch.full((P, 2 * K), -2 ** 31, dtype=torch.int32, device="cuda")
            rowbuf = torch.full((P, H), -0.0, dtype=torch.bfloat16, device="cuda")
            cursor = torch.zeros(P, L, dtype=torch.int32, device="cuda")
            expert_x = torch.full((P, L * CAP_, H), float("nan"), dtype=torch.bfloat16,
                                  device="cuda")
            slot_map = torch.full((P, K), -7, dtype=torch.int32, device="cuda")
            err = torch.zeros(2 * P, dtype=torch.int32, device="cuda")

            def run(kern=kernels[kind]):
                kern[(2 * P,)](x, ids, meta, rowbuf, cursor, expert_x, slot_map, err, H, K, L,
                               CAP_, BLOCK_H, BLOCK_K, num_warps=8)
            run()
            torch.cuda.synchronize()
            if int(err.max()):
                raise SystemExit(f"{kind}, {P} pairs: a spin gave up (err {err.tolist()})")
            for p in range(P):   # every local expert's slot holds the row, the rest -1
                want = torch.where(ids[p] < L, ids[p] * CAP_, -1)
                if not torch.equal(slot_map[p].cpu(), want.cpu()):
                    raise SystemExit(f"{kind}: slot map {slot_map[p].tolist()} != "
                                     f"{want.tolist()}")
                for e in want[want >= 0].tolist():
                    if not torch.equal(expert_x[p, e], x[p]):
                        raise SystemExit(f"{kind}: pair {p}: wrong row in slot {e}")
            if not (torch.all(meta == -2 ** 31) and torch.all(rowbuf.view(torch.int16) == -32768)):
                raise SystemExit(f"{kind}: buffers not reset")
            us = time_graph(run, iters=args.iters, reps=args.reps)
            if int(err.max()):
                raise SystemExit(f"{kind}, {P} pairs: a spin gave up while timed")
            res = {"kind": kind, "pairs": P, "us_per_launch": round(us, 3)}
            rows.append(res)
            print(json.dumps(res), flush=True)
    write_probe_json(args, rows, "probe_ws_recv")


if __name__ == "__main__":
    main()
