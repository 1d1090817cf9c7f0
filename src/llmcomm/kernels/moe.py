"""Triton kernels of the MoE ``p2p`` EP backend (one node, NVLink, symmetric memory).

``@triton.jit`` code only. The launcher is :mod:`llmcomm.moe.p2p`; it documents the workspace.

Protocol (``W`` ranks, grid of ``G`` programs, identical on every rank; program ``p`` handles the
tokens ``t = p + j*G`` of every source rank, so it only ever waits for program ``p`` of its
peers). A program's tokens go in *rounds* of ``CHUNK`` tokens (``round_tokens``), each round in
steps of ``TB`` tokens (``tile_tokens`` / ``combine_tile_tokens``), and every round is signalled
on its own: flags only move forward, round ``r`` of call ``e`` (a per-program epoch in device
memory) releases ``e * 65536 + r + 1`` and a waiter spins until the flag is ``>=`` that (int32,
wrap-safe). A program has ``max(1, ceil(n / CHUNK))`` rounds for its ``n`` tokens, so both sides
count the same rounds from the same token count.

dispatch, program p, iteration r:
  1. own round r: for each own token, its ids/weights into every peer (``recv_ids/recv_w``), its
     row once into every peer owning one of its experts (``recv_x[d][RANK, t]``), copies into
     the local experts' slots (``expert_x``, slots from a per-expert cursor atomic); then
     ``debug_barrier`` and release the round's value into ``flags[d][p, RANK]`` of every peer.
     ``T`` itself goes to ``recv_T[d][RANK]`` before round 0, so it is released with it.
  2. every peer's round r - 1 (acquired with a deadline; round 0 also brings that peer's count,
     hence its number of rounds): expand its rows into the local experts' slots. Receiving one
     round behind sending keeps our round r on the wire while round r - 1 is expanded.
  3. the last program to finish publishes ``counts`` and resets the cursors (graph-safe).
combine, program p, iteration r:
  1. for each peer s, its round r: ``sum_k w * expert_out[slot]`` in fp32 for each token with a
     local expert, stored once into ``comb[s][RANK, t]``; signal the round to s.
  2. own round r - 1 (acquired from every peer): ``y = sum over ranks d in order`` of the own
     partial (fp32, computed here) or ``comb[RANK][d, t]``.
The combine reads ``recv_T``/``recv_w`` only before it signals, and a peer's next dispatch, which
overwrites them, cannot start before it has every round of this combine: no buffer is rewritten
while it is read. Nothing host-side is frozen into a CUDA graph. Every spin has a deadline: on
expiry the program writes an error record (device + pinned host mirror) naming the missing rank
and stops waiting; later calls see the record and do not wait at all.

Every value a spin loop branches on is uniform over the program's threads (flags come from an
atomic, whose result Triton broadcasts, or from one thread's ``ld.acquire.sys`` through a
reduction; counts, the error flag and the timer through :func:`.sync.load_uniform` /
:func:`.sync.globaltimer_uniform`): a volatile scalar load executed by every thread can return
different values while a peer's write lands, and a branch on it would split the program.

Switchable variants (``tl.constexpr``; see :class:`llmcomm.moe.p2p.P2PBackend` for defaults):

* ``POSTED``: flags are signalled with a posted ``st.release.sys`` and polled with
  ``ld.acquire.sys`` (one thread, then a reduction) instead of system-scope atomics. GPU only
  (inline PTX); on by default there.
* ``PDL``: programmatic dependent launch (sm_90+, launched with ``launch_pdl=True``):
  ``griddepcontrol.wait`` precedes every memory access, so semantics are unchanged.

Slots of a token's local experts are taken with one masked vector ``atomic_add`` (its K
atomics in flight together), always 1-D (:func:`_take_slots`); the combine's K expert-row loads
are masked loads (no branch per k), so they overlap.
"""

import triton
import triton.language as tl

from .sync import (globaltimer_uniform, ld_acquire_sys, load_uniform, pdl_launch_dependents,
                   pdl_wait, st_release_sys)


@triton.jit
def _now(USE_TIMER: tl.constexpr, NT: tl.constexpr):
    """``%globaltimer`` (ns), uniform over the program; 0 in the interpreter."""
    if USE_TIMER:
        t = globaltimer_uniform(NT)
    else:
        t = tl.full([], 0, tl.int64)
    return t


@triton.jit
def _dead(err_dev, NT: tl.constexpr):
    """The error flag (non-zero once any wait on this rank gave up), uniform over the program."""
    return load_uniform(err_dev, True, 0, NT)


@triton.jit
def _expired(t0, spins, timeout_ns, USE_TIMER: tl.constexpr, NT: tl.constexpr):
    """Uniform over the program (the timer read is), so every thread gives up together."""
    if USE_TIMER:
        elapsed = _now(USE_TIMER, NT) - t0
    else:
        elapsed = spins * 1000           # interpreter: 1 us per spin
    return elapsed > timeout_ns


@triton.jit
def _fail(err_dev, err_host, OP: tl.constexpr, peer):
    code = OP * 65536 + peer + 1
    tl.store(err_dev, code)
    tl.store(err_host, code)


@triton.jit
def _flag_load(flag_ptr, POSTED: tl.constexpr, NT: tl.constexpr):
    """Acquire load (system scope) of one flag: an atomic, or ``ld.acquire.sys`` by one thread."""
    if POSTED:
        i = tl.arange(0, NT)
        v = tl.sum(ld_acquire_sys(flag_ptr + i * 0, i == 0), axis=0)
    else:
        v = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")
    return v


@triton.jit
def _flag_signal(flag_ptr, epoch, POSTED: tl.constexpr, NT: tl.constexpr):
    """Release-store ``epoch`` into a peer's flag (after ``debug_barrier``): atomic or posted."""
    if POSTED:
        i = tl.arange(0, NT)
        st_release_sys(flag_ptr + i * 0, epoch + i * 0, i == 0)
    else:
        tl.atomic_xchg(flag_ptr, epoch, sem="release", scope="sys")


@triton.jit
def _wait_peer(flag_ptr, target, peer, dead, err_dev, err_host, timeout_ns, OP: tl.constexpr,
               USE_TIMER: tl.constexpr, POSTED: tl.constexpr, NT: tl.constexpr):
    """Spin (acquire, system scope) until ``*flag_ptr >= target`` (int32, wrap-safe: flags only
    move forward); returns the new ``dead``. Returns at once when ``dead`` is set."""
    v = target
    if dead == 0:
        v = _flag_load(flag_ptr, POSTED, NT)
    t0 = _now(USE_TIMER, NT)
    spins = tl.full([], 0, tl.int64)
    while ((v - target) < 0) & (dead == 0):
        v = _flag_load(flag_ptr, POSTED, NT)
        spins += 1
        if (v - target) < 0:
            if _expired(t0, spins, timeout_ns, USE_TIMER, NT):
                _fail(err_dev, err_host, OP, peer)
                dead = dead | 1
            else:
                dead = dead | _dead(err_dev, NT)
    return dead


@triton.jit
def _signal_peers(flags, pid, value, RANK: tl.constexpr, W: tl.constexpr,
                  POSTED: tl.constexpr, NT: tl.constexpr):
    """Release ``value`` into ``flags[d][pid, RANK]`` of every peer d: every earlier write of
    this program (``debug_barrier`` first) is visible to a peer that acquires it."""
    tl.debug_barrier()
    for d in tl.static_range(W):
        if d != RANK:
            _flag_signal(flags[d] + pid * W + RANK, value, POSTED, NT)


@triton.jit
def _rounds(T, pid, G: tl.constexpr, CHUNK: tl.constexpr):
    """(tokens of program ``pid`` among ``T``, its rounds of ``CHUNK`` tokens, at least 1)."""
    n = tl.maximum(tl.cdiv(T - pid, G), 0)
    return n, tl.maximum(tl.cdiv(n, CHUNK), 1)


@triton.jit
def _take_slots(ids, valid, cursor, RANK: tl.constexpr, L: tl.constexpr, CAP: tl.constexpr,
                K: tl.constexpr, BLOCK_K: tl.constexpr):
    """Slots of one token (``ids`` [BLOCK_K], ``valid`` scalar) in its local experts.

    Every new local expert takes its slot in one masked vector ``atomic_add`` (its K atomics in
    flight together); repeated ids share the entry of their first occurrence. Returns
    ``(entry, sm)`` [BLOCK_K]: ``entry = el * CAP + slot`` at first occurrences that took a slot
    (else -1), ``sm`` the token's slot-map row (its entry for every local id, else -1). Always
    1-D: the return value of a vector atomic is only used in the shape the GPU tests cover.
    """
    offs_k = tl.arange(0, BLOCK_K)
    mk = offs_k < K
    el = ids - RANK * L
    valid_k = (offs_k * 0 + valid.to(tl.int32)) != 0   # (a full vector: the interpreter
    local = mk & (ids >= 0) & (el >= 0) & (el < L) & valid_k  # rejects a broadcast 0-d mask)
    same = (ids[:, None] == ids[None, :]) & mk[None, :]
    first = tl.min(tl.where(same, offs_k[None, :], BLOCK_K), axis=1)  # first k with this id
    new = local & (first == offs_k)
    slot = tl.atomic_add(cursor + tl.where(new, el, 0), tl.full([BLOCK_K], 1, tl.int32),
                         mask=new, sem="relaxed", scope="gpu")
    new = new & (slot < CAP)             # cannot fail (CAP is the worst case); never write OOB
    entry = tl.where(new, el * CAP + slot, -1)
    shared = tl.max(tl.where(offs_k[None, :] == first[:, None], entry[None, :], -1), axis=1)
    sm = tl.where(local, shared, -1)
    return entry, sm


@triton.jit
def _expand_tile(row, ids, vt, s, t64, expert_x, cursor, slot_map, RANK: tl.constexpr,
                 M: tl.constexpr, H: tl.constexpr, K: tl.constexpr, L: tl.constexpr,
                 CAP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """Copy the valid (``vt`` [TB]) rows of ``row`` [TB, BLOCK_H] (tokens ``t64`` of source rank
    ``s``) into fresh slots of their local experts; write ``slot_map[s, t, :]``.

    Slots are taken token by token with :func:`_take_slots` (the TB vector atomics are
    independent, so they are in flight together); the row copies are 2-D stores.
    """
    TB: tl.constexpr = row.shape[0]
    offs_h = tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_K)
    offs_b = tl.arange(0, TB)
    mk = offs_k < K
    entry = tl.full([TB, BLOCK_K], -1, tl.int32)
    sm = tl.full([TB, BLOCK_K], -1, tl.int32)
    for b in tl.static_range(TB):
        sel = offs_b[:, None] == b
        ids_b = tl.sum(tl.where(sel, ids, 0), axis=0)
        v_b = tl.sum(tl.where(offs_b == b, vt.to(tl.int32), 0), axis=0) > 0
        entry_b, sm_b = _take_slots(ids_b, v_b, cursor, RANK, L, CAP, K, BLOCK_K)
        entry = tl.where(sel, entry_b[None, :], entry)
        sm = tl.where(sel, sm_b[None, :], sm)
    for k in tl.static_range(K):
        e = tl.max(tl.where(offs_k[None, :] == k, entry, -1), axis=1)
        dst = expert_x + tl.cast(tl.maximum(e, 0), tl.int64)[:, None] * H + offs_h[None, :]
        tl.store(dst, row, mask=(e >= 0)[:, None] & (offs_h < H)[None, :])
    tl.store(slot_map + (s * M + t64)[:, None] * K + offs_k[None, :], sm,
             mask=vt[:, None] & mk[None, :])


@triton.jit
def _tile(j, jend, pid, G: tl.constexpr, TB: tl.constexpr):
    """Tokens ``pid + (j + b) * G`` for ``b < TB`` (valid where ``j + b < jend``), as int64."""
    jj = j + tl.arange(0, TB)
    vt = jj < jend
    return tl.cast(pid + jj * G, tl.int64), vt


@triton.jit
def _send_tile(t64, vt, x_ptr, ids_ptr, w_ptr, recv_x, recv_ids, recv_w, expert_x, cursor,
               slot_map, RANK: tl.constexpr, W: tl.constexpr, M: tl.constexpr, H: tl.constexpr,
               K: tl.constexpr, L: tl.constexpr, E: tl.constexpr, CAP: tl.constexpr,
               BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """Own tokens ``t64`` [TB]: ids/weights to every peer, each row once to every peer owning
    one of its experts, and copies into the local experts' slots."""
    offs_h = tl.arange(0, BLOCK_H)
    mh = offs_h < H
    offs_k = tl.arange(0, BLOCK_K)
    m2 = vt[:, None] & (offs_k < K)[None, :]
    ids = tl.load(ids_ptr + t64[:, None] * K + offs_k[None, :], mask=m2, other=-1).to(tl.int32)
    ids = tl.where(m2 & (ids >= 0) & (ids < E), ids, -1)
    w = tl.load(w_ptr + t64[:, None] * K + offs_k[None, :], mask=m2, other=0.0).to(tl.float32)
    row = tl.load(x_ptr + t64[:, None] * H + offs_h[None, :], mask=vt[:, None] & mh[None, :])
    owner = tl.where(ids >= 0, ids // L, -1)
    for d in tl.static_range(W):
        if d != RANK:
            mrow = RANK * M + t64
            tl.store(recv_ids[d] + mrow[:, None] * K + offs_k[None, :], ids, mask=m2)
            tl.store(recv_w[d] + mrow[:, None] * K + offs_k[None, :], w, mask=m2)
            to_d = vt & (tl.sum((owner == d).to(tl.int32), axis=1) > 0)
            tl.store(recv_x[d] + mrow[:, None] * H + offs_h[None, :], row,
                     mask=to_d[:, None] & mh[None, :])
    _expand_tile(row, ids, vt, RANK, t64, expert_x, cursor, slot_map, RANK, M, H, K, L, CAP,
                 BLOCK_H, BLOCK_K)


@triton.jit
def _recv_tile(s, t64, vt, recv_x, recv_ids, expert_x, cursor, slot_map, RANK: tl.constexpr,
               M: tl.constexpr, H: tl.constexpr, K: tl.constexpr, L: tl.constexpr,
               CAP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """Tokens ``t64`` of peer ``s`` (already acquired): their rows into local experts' slots."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_K)
    m2 = vt[:, None] & (offs_k < K)[None, :]
    mrow = s * M + t64
    ids = tl.load(recv_ids[RANK] + mrow[:, None] * K + offs_k[None, :], mask=m2, other=-1,
                  cache_modifier=".cg")
    owner = tl.where(ids >= 0, ids // L, -1)
    mine = vt & (tl.sum((owner == RANK).to(tl.int32), axis=1) > 0)
    row = tl.load(recv_x[RANK] + mrow[:, None] * H + offs_h[None, :],
                  mask=mine[:, None] & (offs_h < H)[None, :], cache_modifier=".cg")
    _expand_tile(row, ids, vt, s, t64, expert_x, cursor, slot_map, RANK, M, H, K, L, CAP,
                 BLOCK_H, BLOCK_K)


@triton.jit
def ep_dispatch_kernel(x_ptr, ids_ptr, w_ptr, T,
                       recv_x, recv_ids, recv_w, recv_T, flags,
                       expert_x, counts, cursor, done, slot_map, epoch_ptr, err_dev,
                       err_host_addr, timeout_ns,
                       RANK: tl.constexpr, W: tl.constexpr, G: tl.constexpr, M: tl.constexpr,
                       H: tl.constexpr, K: tl.constexpr, L: tl.constexpr, E: tl.constexpr,
                       CAP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_L: tl.constexpr, BLOCK_W: tl.constexpr, CHUNK: tl.constexpr,
                       TB: tl.constexpr, USE_TIMER: tl.constexpr, POSTED: tl.constexpr = False,
                       PDL: tl.constexpr = False, NT: tl.constexpr = 256):
    if PDL:  # nothing is touched before the previous grid finished
        pdl_wait()
        pdl_launch_dependents()
    pid = tl.program_id(0)
    err_host = err_host_addr.to(tl.pointer_type(tl.int32))
    epoch = tl.load(epoch_ptr + pid) + 1
    base = epoch * 65536                      # round r of this call signals base + r + 1
    offs_w = tl.arange(0, BLOCK_W)
    n_own, r_own = _rounds(T, pid, G, CHUNK)
    for d in tl.static_range(W):              # released with round 0
        if d != RANK:
            tl.store(recv_T[d] + RANK, T)
    dead = _dead(err_dev, NT)
    n_in = tl.zeros([BLOCK_W], tl.int32)      # peers' token counts for this program
    r_in = tl.full([BLOCK_W], 1, tl.int32)    # peers' rounds (1 until round 0 told us)
    r = 0
    more = True
    while more:
        # send own round r (tokens pid + j*G, j in [r*CHUNK, r*CHUNK + CHUNK)), then signal it
        if r < r_own:
            jend = tl.minimum(r * CHUNK + CHUNK, n_own)
            for j in range(r * CHUNK, jend, TB):
                t64, vt = _tile(j, jend, pid, G, TB)
                _send_tile(t64, vt, x_ptr, ids_ptr, w_ptr, recv_x, recv_ids, recv_w, expert_x,
                           cursor, slot_map, RANK, W, M, H, K, L, E, CAP, BLOCK_H, BLOCK_K)
            _signal_peers(flags, pid, base + r + 1, RANK, W, POSTED, NT)
        # receive every peer's round r - 1 while our round r is on the wire
        rr = r - 1
        if rr >= 0:
            for s in tl.static_range(W):
                if s != RANK:
                    rs = tl.sum(tl.where(offs_w == s, r_in, 0), axis=0)
                    if rr < rs:
                        dead = _wait_peer(flags[RANK] + pid * W + s, base + rr + 1, s, dead,
                                          err_dev, err_host, timeout_ns, 1, USE_TIMER,
                                          POSTED, NT)
                        if dead == 0:
                            if rr == 0:
                                ns, rs = _rounds(load_uniform(recv_T[RANK] + s, True, 0, NT),
                                                 pid, G, CHUNK)
                                n_in = tl.where(offs_w == s, ns, n_in)
                                r_in = tl.where(offs_w == s, rs, r_in)
                            ns = tl.sum(tl.where(offs_w == s, n_in, 0), axis=0)
                            jend = tl.minimum(rr * CHUNK + CHUNK, ns)
                            for j in range(rr * CHUNK, jend, TB):
                                t64, vt = _tile(j, jend, pid, G, TB)
                                _recv_tile(s, t64, vt, recv_x, recv_ids, expert_x, cursor,
                                           slot_map, RANK, M, H, K, L, CAP, BLOCK_H, BLOCK_K)
        r += 1
        more = (r < r_own) | (r - 1 < tl.max(tl.where(dead == 0, r_in, 0), axis=0))
    tl.store(epoch_ptr + pid, epoch)
    # the last program out publishes the counts and resets the cursors for the next call
    tl.debug_barrier()
    prev = tl.atomic_add(done, 1, sem="acq_rel", scope="gpu")
    if prev == G - 1:
        offs_l = tl.arange(0, BLOCK_L)
        ml = offs_l < L
        c = tl.atomic_xchg(cursor + offs_l, tl.zeros([BLOCK_L], tl.int32), mask=ml,
                           sem="acq_rel", scope="gpu")
        tl.store(counts + offs_l, c, mask=ml)
        tl.atomic_xchg(done, 0, sem="relaxed", scope="gpu")


@triton.jit
def _partial_tile(expert_out, sm, wv, H: tl.constexpr, K: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """[TB, BLOCK_H] fp32: ``sum_k wv[:, k] * expert_out[sm[:, k]]``, k ascending, entries with
    ``sm < 0`` skipped. Masked loads (no branch per k), so the K row loads overlap; a skipped
    entry leaves the sum untouched (bitwise the same as skipping it)."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([sm.shape[0], BLOCK_H], tl.float32)
    for k in tl.static_range(K):
        e = tl.max(tl.where(offs_k[None, :] == k, sm, -1), axis=1)
        wk = tl.sum(tl.where(offs_k[None, :] == k, wv, 0.0), axis=1)
        ok = e >= 0
        v = tl.load(expert_out + tl.cast(tl.maximum(e, 0), tl.int64)[:, None] * H
                    + offs_h[None, :], mask=ok[:, None] & (offs_h < H)[None, :], other=0.0)
        acc = tl.where(ok[:, None], acc + wk[:, None] * v.to(tl.float32), acc)
    return acc


@triton.jit
def _push_tile(s, t64, vt, expert_out, recv_w, comb, slot_map, RANK: tl.constexpr,
               M: tl.constexpr, H: tl.constexpr, K: tl.constexpr, BLOCK_H: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """Tokens ``t64`` of peer ``s``: the weighted sum of their rows in our experts (fp32),
    rounded to the dtype once, into ``comb[s][RANK, t]`` (tokens with a local expert only)."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_K)
    m2 = vt[:, None] & (offs_k < K)[None, :]
    mrow = s * M + t64
    sm = tl.load(slot_map + mrow[:, None] * K + offs_k[None, :], mask=m2, other=-1)
    wv = tl.load(recv_w[RANK] + mrow[:, None] * K + offs_k[None, :], mask=m2, other=0.0,
                 cache_modifier=".cg")
    acc = _partial_tile(expert_out, sm, wv, H, K, BLOCK_H, BLOCK_K)
    has = vt & (tl.max(sm, axis=1) >= 0)
    dst = comb[s] + (RANK * M + t64)[:, None] * H + offs_h[None, :]
    tl.store(dst, acc.to(comb[s].dtype.element_ty), mask=has[:, None] & (offs_h < H)[None, :])


@triton.jit
def _finish_tile(t64, vt, expert_out, ids_ptr, w_ptr, y_ptr, comb, slot_map,
                 RANK: tl.constexpr, W: tl.constexpr, M: tl.constexpr, H: tl.constexpr,
                 K: tl.constexpr, L: tl.constexpr, E: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """Own tokens ``t64``: ``y = sum over ranks d in order`` of the own partial (fp32, computed
    here) or ``comb[RANK][d, t]`` (already acquired)."""
    offs_h = tl.arange(0, BLOCK_H)
    mh = (offs_h < H)[None, :]
    offs_k = tl.arange(0, BLOCK_K)
    m2 = vt[:, None] & (offs_k < K)[None, :]
    ids = tl.load(ids_ptr + t64[:, None] * K + offs_k[None, :], mask=m2, other=-1).to(tl.int32)
    ids = tl.where(m2 & (ids >= 0) & (ids < E), ids, -1)
    owner = tl.where(ids >= 0, ids // L, -1)
    acc = tl.zeros([t64.shape[0], BLOCK_H], tl.float32)
    for d in tl.static_range(W):
        if d == RANK:
            sm = tl.load(slot_map + (RANK * M + t64)[:, None] * K + offs_k[None, :], mask=m2,
                         other=-1)
            wv = tl.load(w_ptr + t64[:, None] * K + offs_k[None, :], mask=m2,
                         other=0.0).to(tl.float32)
            acc += _partial_tile(expert_out, sm, wv, H, K, BLOCK_H, BLOCK_K)
        else:
            from_d = vt & (tl.sum((owner == d).to(tl.int32), axis=1) > 0)
            src = comb[RANK] + (d * M + t64)[:, None] * H + offs_h[None, :]
            acc += tl.load(src, mask=from_d[:, None] & mh, other=0.0,
                           cache_modifier=".cg").to(tl.float32)
    tl.store(y_ptr + t64[:, None] * H + offs_h[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=vt[:, None] & mh)


@triton.jit
def ep_combine_kernel(expert_out, ids_ptr, w_ptr, y_ptr, T,
                      recv_w, recv_T, comb, flags, slot_map, epoch_ptr, err_dev,
                      err_host_addr, timeout_ns,
                      RANK: tl.constexpr, W: tl.constexpr, G: tl.constexpr, M: tl.constexpr,
                      H: tl.constexpr, K: tl.constexpr, L: tl.constexpr, E: tl.constexpr,
                      BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr,
                      CHUNK: tl.constexpr, TB: tl.constexpr, USE_TIMER: tl.constexpr,
                      POSTED: tl.constexpr = False, PDL: tl.constexpr = False,
                      NT: tl.constexpr = 256):
    if PDL:  # nothing is touched before the previous grid finished
        pdl_wait()
        pdl_launch_dependents()
    pid = tl.program_id(0)
    err_host = err_host_addr.to(tl.pointer_type(tl.int32))
    epoch = tl.load(epoch_ptr + pid) + 1
    base = epoch * 65536
    offs_w = tl.arange(0, BLOCK_W)
    dead = _dead(err_dev, NT)
    n_own, r_own = _rounds(T, pid, G, CHUNK)
    # the peers' token counts (from the dispatch; read before any signal, see docs/moe.md)
    n_in = tl.zeros([BLOCK_W], tl.int32)
    r_in = tl.zeros([BLOCK_W], tl.int32)
    for s in tl.static_range(W):
        if s != RANK:
            ns, rs = _rounds(load_uniform(recv_T[RANK] + s, True, 0, NT), pid, G, CHUNK)
            n_in = tl.where(offs_w == s, ns, n_in)
            r_in = tl.where(offs_w == s, rs, r_in)
    r = 0
    more = True
    while more:
        # push the partials of every peer's round r, then signal it to that peer
        for s in tl.static_range(W):
            if s != RANK:
                rs = tl.sum(tl.where(offs_w == s, r_in, 0), axis=0)
                if r < rs:
                    ns = tl.sum(tl.where(offs_w == s, n_in, 0), axis=0)
                    if dead == 0:
                        jend = tl.minimum(r * CHUNK + CHUNK, ns)
                        for j in range(r * CHUNK, jend, TB):
                            t64, vt = _tile(j, jend, pid, G, TB)
                            _push_tile(s, t64, vt, expert_out, recv_w, comb, slot_map, RANK, M,
                                       H, K, BLOCK_H, BLOCK_K)
                    tl.debug_barrier()
                    _flag_signal(flags[s] + pid * W + RANK, base + r + 1, POSTED, NT)
        # finish own round r - 1 (the peers pushed it while we pushed round r)
        rr = r - 1
        if (rr >= 0) & (rr < r_own):
            for d in tl.static_range(W):
                if d != RANK:
                    dead = _wait_peer(flags[RANK] + pid * W + d, base + rr + 1, d, dead,
                                      err_dev, err_host, timeout_ns, 2, USE_TIMER, POSTED, NT)
            tl.debug_barrier()
            jend = tl.minimum(rr * CHUNK + CHUNK, n_own)
            for j in range(rr * CHUNK, jend, TB):
                t64, vt = _tile(j, jend, pid, G, TB)
                _finish_tile(t64, vt, expert_out, ids_ptr, w_ptr, y_ptr, comb, slot_map, RANK,
                             W, M, H, K, L, E, BLOCK_H, BLOCK_K)
        r += 1
        more = (r - 1 < r_own) | (r < tl.max(r_in, axis=0))
    tl.store(epoch_ptr + pid, epoch)
