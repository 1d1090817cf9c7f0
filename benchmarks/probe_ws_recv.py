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
launch starts as this one did). Receivers, all in Gluon, the same loads and stores:

* ``serial`` (as ``_lamport_recv_token`` today): meta and row polled together by every warp
  (the row speculatively), then the claim, then the copies;
* ``split``: a 1-warp worker partition polls the meta, hands it over in shared memory (an
  mbarrier), claims, hands the slots over (a second mbarrier) and resets the meta; the 8-warp
  default partition waits for the meta, polls the row (the claim's round trip in flight
  meanwhile), waits for the slots and copies;
* ``serial_t`` / ``split_t`` (session 30): ``serial`` / ``split`` with the dispatch's
  per-thread spins (inline PTX, :func:`llmcomm.kernels.sync.spin_landed`: each thread
  re-loads its own words, no reduction a spin), as the triton dispatch polls since session 20;
* ``split2``: the 8-warp default partition polls meta and row together as ``serial`` does,
  while a 1-warp worker polls the meta on its own and claims; the default partition waits for
  the slots (one mbarrier: the worker's meta reads are then done too), copies, and resets.

Senders run before any partition (a split kernel's receivers only enter
``gl.warp_specialize``). ``--both`` (two-way, as the dispatch at EP=2, where each program sends
its own token and then receives one): every program sends its token, then receives its
partner's (program ``q`` reads ``q ^ 1``'s), the split kernels' partitions entered after the
send. (The first form of this probe, session 29 calls 2-3, ran the senders inside the
partitions too, beside an idle worker warp; its split kernels were par or slower.) Every spin
stops after ``2**16`` polls and raises an error flag the host checks; the mbarrier waits have
no deadline (``split2`` hung two-way at 4 pairs in session 29, not understood: run it under
``timeout``). The first launch of each kind is checked against the inputs.

Session 29 (one H100, two-way, hidden 7168): ``split`` 4.10-4.21 us a launch against
``serial`` 4.31-4.63 at one pair, 4.30-4.37 against 4.83-4.97 at 8 (calls 11-12 of
``results/s29_20261125_gpu.log``).

Session 30 (one H100, call 4 of ``results/s30_20261125_gpu.log``): with the dispatch's
per-thread spins on both sides the worker partition does not pay in the dispatch's shape.
Two-way, hidden 7168: ``serial_t`` 3.70-3.88 us against ``split_t`` 3.96-3.97 at one pair,
3.93-3.97 against 4.07-4.09 at 4, 4.71-4.86 against 4.86-4.90 at 33 (at 8 one sample of each
~5.1-5.4, the others 4.26 / 4.37); hidden 4096: 2.91-3.23 against 3.32-3.34 at one pair, par
at 33. One-way ``split_t`` is ahead (3.60-3.76 against 3.85-3.89 at one pair, 3.96-4.03
against 4.40-4.46 at 33), but no dispatch receives without sending. Session 29's gain of
``split`` was over ``serial``'s reduction polls (``serial`` 4.52-5.41 in the same run).
``split2`` two-way at 4 pairs with ``--iters 1 --reps 1`` ran, at 43 us a launch (no spin gave
up); with the default 20 x 7 it passed 60 s (session 29). Not pursued: the direction is
closed (``docs/moe.md``).

Usage (one GPU): ``python3 benchmarks/probe_ws_recv.py [--both] [--pairs 1,8]
[--order serial,split,split,serial] [--hidden 4096]``.
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

    from llmcomm.kernels.sync import _spin_asm

    # a CTA barrier: gl.thread_barrier in triton 3.6, gl.barrier from 3.7 on
    thread_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    # the dispatch's per-thread spins (inline PTX): 8 bf16 row elements or one int32 a pack
    S16, C16 = (gl.constexpr(v) for v in _spin_asm(16, 8))
    S32, C32 = (gl.constexpr(v) for v in _spin_asm(32, 1))

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
    def _roles(BOTH: gl.constexpr):
        """A receiving program's (slot it reads, its own region of cursor / expert_x /
        slot_map): one-way, receiver ``2p + 1`` reads sender ``2p``'s slot ``p``; two-way
        (``BOTH``), program ``q`` reads its partner's slot ``q ^ 1``."""
        pid = gl.program_id(0)
        if BOTH:
            return pid ^ 1, pid
        else:
            return pid // 2, pid // 2

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
    def _meta_pending(ids, wb, mk):
        sent = (ids == -2147483647 - 1) | (wb == -2147483647 - 1)
        return gl.sum((mk & sent).to(gl.int32), axis=0)

    @gluon.jit
    def _mine(ids, mk, L: gl.constexpr):
        return gl.sum((mk & (ids >= 0) & (ids < L)).to(gl.int32), axis=0) > 0

    @gluon.jit
    def _load_token(mp, rp, offs_h, offs_k, H: gl.constexpr, K: gl.constexpr, L: gl.constexpr):
        """One poll of a token: (ids, row, mine, what is still the sentinel)."""
        mk = offs_k < K
        ids = gl.load(mp + offs_k, mask=mk, other=-1, volatile=True)
        wb = gl.load(mp + K + offs_k, mask=mk, other=0, volatile=True)
        row = gl.load(rp + offs_h, mask=offs_h < H, other=0.0, volatile=True)
        mine = _mine(ids, mk, L)
        return ids, row, mine, _meta_pending(ids, wb, mk) + gl.where(
            mine, _row_pending(row, offs_h, H), 0)

    @gluon.jit
    def _load_meta(mp, offs_k, K: gl.constexpr):
        """One poll of a token's meta: (ids, what is still the sentinel)."""
        mk = offs_k < K
        ids = gl.load(mp + offs_k, mask=mk, other=-1, volatile=True)
        wb = gl.load(mp + K + offs_k, mask=mk, other=0, volatile=True)
        return ids, _meta_pending(ids, wb, mk)

    @gluon.jit
    def _poll_token(mp, rp, offs_h, offs_k, err, pid, H: gl.constexpr, K: gl.constexpr,
                    L: gl.constexpr):
        """The meta and (speculatively) the row polled together until every part needed
        has landed; returns (ids, row, mine)."""
        ids, row, mine, pend = _load_token(mp, rp, offs_h, offs_k, H, K, L)
        spins = 0
        while (pend > 0) & (spins < 65536):
            ids, row, mine, pend = _load_token(mp, rp, offs_h, offs_k, H, K, L)
            spins += 1
        if pend > 0:
            gl.store(err + pid, 1)
        return ids, row, mine

    @gluon.jit
    def _poll_meta(mp, offs_k, err, pid, K: gl.constexpr):
        ids, pend = _load_meta(mp, offs_k, K)
        spins = 0
        while (pend > 0) & (spins < 65536):
            ids, pend = _load_meta(mp, offs_k, K)
            spins += 1
        if pend > 0:
            gl.store(err + pid, 3)
        return ids

    @gluon.jit
    def _reset_meta(mp, offs_k, K: gl.constexpr):
        mk = offs_k < K
        gl.store(mp + offs_k, offs_k * 0 + (-2147483647 - 1), mask=mk)
        gl.store(mp + K + offs_k, offs_k * 0 + (-2147483647 - 1), mask=mk)

    @gluon.jit
    def _spin(v, ptrs, mask, errp, BITS: gl.constexpr):
        """``*_t`` kinds: each thread re-loads its own masked elements of ``v`` until none is
        the sentinel (:func:`llmcomm.kernels.sync.spin_landed`'s PTX; a 1 s deadline, code
        4 at ``errp``)."""
        z = ptrs.to(gl.int64) * 0
        args = [ptrs.to(gl.int64), mask.to(gl.int32), z + 1000000000, errp.to(gl.int64) + z,
                errp.to(gl.int64) + z, (z + 4).to(gl.int32)]
        if BITS == 16:
            r = gl.inline_asm_elementwise(S16, C16, [v.to(gl.int16, bitcast=True)] + args,
                                          dtype=gl.int16, is_pure=False, pack=8)
        else:
            r = gl.inline_asm_elementwise(S32, C32, [v.to(gl.int32, bitcast=True)] + args,
                                          dtype=gl.int32, is_pure=False, pack=1)
        return r.to(v.dtype, bitcast=True)

    @gluon.jit
    def _spin_meta(mp, offs_k, errp, K: gl.constexpr):
        """``*_t``: a token's ids and weight bits, each thread spinning on its own copies."""
        mk = offs_k < K
        ids = gl.load(mp + offs_k, mask=mk, other=-1, volatile=True)
        wb = gl.load(mp + K + offs_k, mask=mk, other=0, volatile=True)
        return _spin(ids, mp + offs_k, mk, errp, 32), _spin(wb, mp + K + offs_k, mk, errp, 32)

    @gluon.jit
    def _spin_token_row(rp, ids, offs_h, offs_k, errp, H: gl.constexpr, K: gl.constexpr,
                        L: gl.constexpr):
        """``*_t``: the row (where the token has a local expert), each thread spinning on its
        own elements. Returns (row, row mask)."""
        n = gl.where(_mine(ids, offs_k < K, L), H, 0)
        rmask = offs_h < n
        row = gl.load(rp + offs_h, mask=rmask, other=0.0, volatile=True)
        return _spin(row, rp + offs_h, rmask, errp, 16), rmask

    @gluon.jit
    def _recv_serial_t(meta, rowbuf, cursor, expert_x, slot_map, err, H: gl.constexpr,
                       K: gl.constexpr, L: gl.constexpr, CAP: gl.constexpr,
                       BLOCK_H: gl.constexpr, BLOCK_K: gl.constexpr, BOTH: gl.constexpr):
        """``serial_t``: ``serial`` with the dispatch's per-thread spins (meta, then row),
        as ``_lamport_recv_token`` with TSPIN and MSPIN."""
        slot, p = _roles(BOTH)
        offs_h, offs_k = _layouts(BLOCK_H, BLOCK_K)
        mp = meta + slot * (2 * K)
        rp = rowbuf + slot * H
        errp = err + gl.program_id(0)
        ids, wb = _spin_meta(mp, offs_k, errp, K)
        row, rmask = _spin_token_row(rp, ids, offs_h, offs_k, errp, H, K, L)
        entry = _claim(p, ids, offs_k, cursor, L, K, CAP)
        _place(p, row, entry, offs_h, offs_k, expert_x, slot_map, H, K, L, CAP)
        thread_barrier()
        _reset_meta(mp, offs_k, K)
        gl.store(rp + offs_h, _sentinel_row(offs_h), mask=rmask)

    @gluon.jit
    def _place_handed_slots(p, row, rmask, rp, offs_h, offs_k, sm, bars, expert_x, slot_map,
                            H: gl.constexpr, K: gl.constexpr, L: gl.constexpr,
                            CAP: gl.constexpr):
        """``split`` / ``split_t``'s default partition once the row has landed: wait for the
        worker's slots, copy, reset the row."""
        mbarrier.wait(bars[1], 0)
        entry = sm[1].load(offs_k.type.layout)
        _place(p, row, entry, offs_h, offs_k, expert_x, slot_map, H, K, L, CAP)
        thread_barrier()
        gl.store(rp + offs_h, _sentinel_row(offs_h), mask=rmask)

    @gluon.jit
    def _hand_over(p, ids, mp, offs_k, cursor, sm, bars, K, L, CAP):
        """``split`` / ``split_t``'s worker once the meta has landed: hand the ids over,
        claim, hand the slots over, reset the meta (``K``, ``L``, ``CAP`` the callers'
        constexprs; no annotation: the body does not name ``gl``, so the jit could not
        resolve it)."""
        sm[0].store(ids)
        thread_barrier()
        mbarrier.arrive(bars[0], count=1)
        sm[1].store(_claim(p, ids, offs_k, cursor, L, K, CAP))
        thread_barrier()
        mbarrier.arrive(bars[1], count=1)
        _reset_meta(mp, offs_k, K)

    @gluon.jit
    def _wst_default(meta, rowbuf, expert_x, slot_map, err, sm, bars, H: gl.constexpr,
                     K: gl.constexpr, L: gl.constexpr, CAP: gl.constexpr,
                     BLOCK_H: gl.constexpr, BLOCK_K: gl.constexpr, BOTH: gl.constexpr):
        """``split_t``: ``split``'s default partition with the per-thread row spin."""
        slot, p = _roles(BOTH)
        offs_h, offs_k = _layouts(BLOCK_H, BLOCK_K)
        rp = rowbuf + slot * H
        mbarrier.wait(bars[0], 0)
        ids = sm[0].load(offs_k.type.layout)
        row, rmask = _spin_token_row(rp, ids, offs_h, offs_k, err + gl.program_id(0), H, K, L)
        _place_handed_slots(p, row, rmask, rp, offs_h, offs_k, sm, bars, expert_x, slot_map, H,
                            K, L, CAP)

    @gluon.jit
    def _wst_worker(meta, cursor, err, sm, bars, K: gl.constexpr, L: gl.constexpr,
                    CAP: gl.constexpr, BLOCK_K: gl.constexpr, BOTH: gl.constexpr):
        """``split_t``: ``split``'s worker with the per-thread meta spin."""
        slot, p = _roles(BOTH)
        offs_k = gl.arange(0, BLOCK_K, layout=gl.BlockedLayout([1], [32], [1], [0]))
        mp = meta + slot * (2 * K)
        ids, wb = _spin_meta(mp, offs_k, err + gl.program_id(0), K)
        _hand_over(p, ids, mp, offs_k, cursor, sm, bars, K, L, CAP)

    @gluon.jit
    def _recv_serial(meta, rowbuf, cursor, expert_x, slot_map, err, H: gl.constexpr,
                     K: gl.constexpr, L: gl.constexpr, CAP: gl.constexpr,
                     BLOCK_H: gl.constexpr, BLOCK_K: gl.constexpr, BOTH: gl.constexpr):
        slot, p = _roles(BOTH)
        offs_h, offs_k = _layouts(BLOCK_H, BLOCK_K)
        mp = meta + slot * (2 * K)
        rp = rowbuf + slot * H
        ids, row, mine = _poll_token(mp, rp, offs_h, offs_k, err, gl.program_id(0), H, K, L)
        entry = _claim(p, ids, offs_k, cursor, L, K, CAP)
        _place(p, row, entry, offs_h, offs_k, expert_x, slot_map, H, K, L, CAP)
        thread_barrier()
        _reset_meta(mp, offs_k, K)
        gl.store(rp + offs_h, _sentinel_row(offs_h), mask=offs_h < gl.where(mine, H, 0))

    # the receivers' partitions of the split kernels (slot read and own region from
    # :func:`_roles`): the default one on the program's warps, the worker on one more warp;
    # ``sm`` = shared int32 [BLOCK_K] buffers (ids, slot entries), ``bars`` = (meta handed
    # over, slots handed over)

    @gluon.jit
    def _ws_default(meta, rowbuf, expert_x, slot_map, err, sm, bars, H: gl.constexpr,
                    K: gl.constexpr, L: gl.constexpr, CAP: gl.constexpr, BLOCK_H: gl.constexpr,
                    BLOCK_K: gl.constexpr, BOTH: gl.constexpr):
        """``split``: wait for the meta, poll the row, wait for the slots, copy."""
        pid = gl.program_id(0)
        slot, p = _roles(BOTH)
        offs_h, offs_k = _layouts(BLOCK_H, BLOCK_K)
        rp = rowbuf + slot * H
        mbarrier.wait(bars[0], 0)
        ids = sm[0].load(offs_k.type.layout)
        n = gl.where(_mine(ids, offs_k < K, L), H, 0)
        rmask = offs_h < n
        row = gl.load(rp + offs_h, mask=rmask, other=0.0, volatile=True)
        pend = _row_pending(row, offs_h, n)
        spins = 0
        while (pend > 0) & (spins < 65536):
            row = gl.load(rp + offs_h, mask=rmask, other=0.0, volatile=True)
            pend = _row_pending(row, offs_h, n)
            spins += 1
        if pend > 0:
            gl.store(err + pid, 2)
        _place_handed_slots(p, row, rmask, rp, offs_h, offs_k, sm, bars, expert_x, slot_map, H,
                            K, L, CAP)

    @gluon.jit
    def _ws_worker(meta, cursor, err, sm, bars, K: gl.constexpr, L: gl.constexpr,
                   CAP: gl.constexpr, BLOCK_K: gl.constexpr, BOTH: gl.constexpr):
        """``split``: poll the meta, hand it over, claim, hand the slots over, reset the
        meta."""
        pid = gl.program_id(0)
        slot, p = _roles(BOTH)
        offs_k = gl.arange(0, BLOCK_K, layout=gl.BlockedLayout([1], [32], [1], [0]))
        mp = meta + slot * (2 * K)
        ids = _poll_meta(mp, offs_k, err, pid, K)
        _hand_over(p, ids, mp, offs_k, cursor, sm, bars, K, L, CAP)

    @gluon.jit
    def _ws2_default(meta, rowbuf, expert_x, slot_map, err, sm, bars, H: gl.constexpr,
                     K: gl.constexpr, L: gl.constexpr, CAP: gl.constexpr,
                     BLOCK_H: gl.constexpr, BLOCK_K: gl.constexpr, BOTH: gl.constexpr):
        """``split2``: poll meta and row together (as ``serial``), wait for the slots (the
        worker's meta reads are then done too), copy, reset both."""
        pid = gl.program_id(0)
        slot, p = _roles(BOTH)
        offs_h, offs_k = _layouts(BLOCK_H, BLOCK_K)
        mp = meta + slot * (2 * K)
        rp = rowbuf + slot * H
        ids, row, mine = _poll_token(mp, rp, offs_h, offs_k, err, pid, H, K, L)
        mbarrier.wait(bars[1], 0)
        entry = sm[1].load(offs_k.type.layout)
        _place(p, row, entry, offs_h, offs_k, expert_x, slot_map, H, K, L, CAP)
        thread_barrier()
        _reset_meta(mp, offs_k, K)
        gl.store(rp + offs_h, _sentinel_row(offs_h), mask=offs_h < gl.where(mine, H, 0))

    @gluon.jit
    def _ws2_worker(meta, cursor, err, sm, bars, K: gl.constexpr, L: gl.constexpr,
                    CAP: gl.constexpr, BLOCK_K: gl.constexpr, BOTH: gl.constexpr):
        """``split2``: poll the meta, claim, hand the slots over."""
        slot, p = _roles(BOTH)
        offs_k = gl.arange(0, BLOCK_K, layout=gl.BlockedLayout([1], [32], [1], [0]))
        ids = _poll_meta(meta + slot * (2 * K), offs_k, err, gl.program_id(0), K)
        sm[1].store(_claim(p, ids, offs_k, cursor, L, K, CAP))
        thread_barrier()
        mbarrier.arrive(bars[1], count=1)

    def _with_senders(recv):
        """A kernel whose senders run before any receive: two-way (``BOTH``) every program
        sends its token, then runs ``recv``; one-way even programs send, odd ones receive."""
        @gluon.jit
        def kernel(x, ids_src, meta, rowbuf, cursor, expert_x, slot_map, err, H: gl.constexpr,
                   K: gl.constexpr, L: gl.constexpr, CAP: gl.constexpr, BLOCK_H: gl.constexpr,
                   BLOCK_K: gl.constexpr, BOTH: gl.constexpr):
            pid = gl.program_id(0)
            if BOTH:
                _send(pid, x, ids_src, meta, rowbuf, H, K, BLOCK_H, BLOCK_K)
                recv(meta, rowbuf, cursor, expert_x, slot_map, err, H, K, L, CAP, BLOCK_H,
                     BLOCK_K, BOTH)
            elif pid % 2 == 0:
                _send(pid // 2, x, ids_src, meta, rowbuf, H, K, BLOCK_H, BLOCK_K)
            else:
                recv(meta, rowbuf, cursor, expert_x, slot_map, err, H, K, L, CAP, BLOCK_H,
                     BLOCK_K, BOTH)
        return kernel

    def _split(default_fn, worker_fn):
        """The receive as ``default_fn`` (the program's warps) beside ``worker_fn`` (one more
        warp)."""
        @gluon.jit
        def recv(meta, rowbuf, cursor, expert_x, slot_map, err, H: gl.constexpr,
                 K: gl.constexpr, L: gl.constexpr, CAP: gl.constexpr, BLOCK_H: gl.constexpr,
                 BLOCK_K: gl.constexpr, BOTH: gl.constexpr):
            sl: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
            sm = (gl.allocate_shared_memory(gl.int32, [BLOCK_K], sl),
                  gl.allocate_shared_memory(gl.int32, [BLOCK_K], sl))
            bars = (gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout()),
                    gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout()))
            mbarrier.init(bars[0], count=1)
            mbarrier.init(bars[1], count=1)
            gl.warp_specialize(
                [(default_fn, (meta, rowbuf, expert_x, slot_map, err, sm, bars, H, K, L, CAP,
                               BLOCK_H, BLOCK_K, BOTH)),
                 (worker_fn, (meta, cursor, err, sm, bars, K, L, CAP, BLOCK_K, BOTH))],
                [1], [48])
        return _with_senders(recv)

    return {"serial": _with_senders(_recv_serial), "split": _split(_ws_default, _ws_worker),
            "split2": _split(_ws2_default, _ws2_worker),
            "serial_t": _with_senders(_recv_serial_t), "split_t": _split(_wst_default, _wst_worker)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--pairs", default="1,32")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--order", default="serial,split,split2,split2,split,serial")
    ap.add_argument("--both", action="store_true",
                    help="two-way: every program sends its token, then receives its partner's")
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
        n = 2 * P if args.both else P   # tokens: one a sender (one-way) or a program (two-way)
        x = torch.randn(n, H, device="cuda").to(torch.bfloat16)
        # each token: K // 2 experts on the receiving rank ([0, L)), K // 2 elsewhere
        loc = torch.stack([torch.randperm(L)[:K // 2] for _ in range(n)])
        far = L + torch.stack([torch.randperm(L)[:K - K // 2] for _ in range(n)])
        ids = torch.cat([loc, far], 1)[:, torch.randperm(K)].to(torch.int32).cuda()
        for kind in args.order.split(","):
            meta = torch.full((n, 2 * K), -2 ** 31, dtype=torch.int32, device="cuda")
            rowbuf = torch.full((n, H), -0.0, dtype=torch.bfloat16, device="cuda")
            cursor = torch.zeros(n, L, dtype=torch.int32, device="cuda")
            expert_x = torch.full((n, L * CAP_, H), float("nan"), dtype=torch.bfloat16,
                                  device="cuda")
            slot_map = torch.full((n, K), -7, dtype=torch.int32, device="cuda")
            err = torch.zeros(2 * P, dtype=torch.int32, device="cuda")

            def run(kern=kernels[kind]):
                kern[(2 * P,)](x, ids, meta, rowbuf, cursor, expert_x, slot_map, err, H, K, L,
                               CAP_, BLOCK_H, BLOCK_K, args.both, num_warps=8)
            run()
            torch.cuda.synchronize()
            if int(err.max()):
                raise SystemExit(f"{kind}, {P} pairs: a spin gave up (err {err.tolist()})")
            for r in range(n):   # region r: its source token's local experts hold the row
                src = r ^ 1 if args.both else r
                want = torch.where(ids[src] < L, ids[src] * CAP_, -1)
                if not torch.equal(slot_map[r].cpu(), want.cpu()):
                    raise SystemExit(f"{kind}: slot map {slot_map[r].tolist()} != "
                                     f"{want.tolist()}")
                for e in want[want >= 0].tolist():
                    if not torch.equal(expert_x[r, e], x[src]):
                        raise SystemExit(f"{kind}: region {r}: wrong row in slot {e}")
            if not (torch.all(meta == -2 ** 31) and torch.all(rowbuf.view(torch.int16) == -32768)):
                raise SystemExit(f"{kind}: buffers not reset")
            us = time_graph(run, iters=args.iters, reps=args.reps)
            if int(err.max()):
                raise SystemExit(f"{kind}, {P} pairs: a spin gave up while timed")
            res = {"kind": kind, "pairs": P, "both": args.both, "us_per_launch": round(us, 3)}
            rows.append(res)
            print(json.dumps(res), flush=True)
    write_probe_json(args, rows, "probe_ws_recv")


if __name__ == "__main__":
    main()
