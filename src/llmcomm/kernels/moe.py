"""Triton kernels of the MoE ``p2p`` EP backend (one node, NVLink, symmetric memory).

``@triton.jit`` code only. The launcher is :mod:`llmcomm.moe.p2p`; it documents the workspace. Two
protocols, chosen per backend (``P2PBackend(protocol=...)``, by default through
:func:`llmcomm.policy.ep_p2p_protocol`): ``"flags"`` and ``"lamport"`` (after the flags kernels, at
the end of this module); both pass the GPU tests (``tests/gpu/test_moe_p2p.py``). Both give the
same ``expert_x``/``counts`` contract and the same combine arithmetic (per-rank partial sums
``sum_k w * expert_out`` in fp32, k ascending, the peers' partials rounded to the dtype, then
summed over ranks in fixed rank order), so the output never depends on timing.

Protocol ``"flags"`` (``ep_dispatch_kernel`` / ``ep_combine_kernel``; ``W`` ranks, grid of
``G`` programs, identical on every rank; program ``p`` handles the tokens ``t = p + j*G`` of
every source rank, so it only ever waits for program ``p`` of its peers). A program's tokens
go in *rounds* of ``CHUNK`` tokens (``round_tokens``), each round in steps of ``TB`` tokens
(``tile_tokens`` / ``combine_tile_tokens``), and every round is signalled on its own: flags
only move forward, round ``r`` of call ``e`` (a per-program epoch in device memory) releases
``e * 65536 + r + 1`` and a waiter spins until the flag is ``>=`` that (int32, wrap-safe).
A program has ``max(1, ceil(n / CHUNK))`` rounds for its ``n`` tokens, so both sides count the
same rounds from the same token count.

``INTERLEAVE`` (the default, ``P2PBackend(interleave=True)``): iteration r of a program first
waits for every peer's round ``r - 1``, then walks the own round r
and that peer round *together*, one tile per step, and signals own round r last. Dispatch: a
step sends an own tile, copies it into the local experts from the same registers, and expands
a tile of the peer's round; combine: a step pushes the partials of a peer tile and finishes an
own tile. NVLink stores and local HBM traffic are thus in flight together: a data-movement
ladder (``benchmarks/bench_moe_floor.py``) measured the phased order below at +80 us per
kernel at 4096 tokens over the interleaved one. A round of a single own tile (small batches)
keeps the phased order (send, signal, expand; push, signal, own partial, wait, finish), which
signals early. ``FUSE`` (two ranks): a step's own and peer tiles share one step function
(``_dispatch_pair_step`` / ``_combine_pair_step``): every load of both tiles is issued before
either is used, so a step costs two dependent round trips instead of four to five. With
one-token tiles those steps run on 1-D rows with scalar slot / weight loads
(``_dispatch_two_tokens`` / ``_combine_two_tokens``; the combine then fuses at every hidden
size), and ``CLAIM_RB`` > 0 (rounds of <= 16 tokens) takes the slots of a round's fused
dispatch steps at the round's start, one vector atomic for the round, written to ``slot_map``
and read back by each step beside its row load (``_claim_round``). Where the two sides of an
iteration have unequal token counts (a program's first round: own sends / pushes only; its
last: the peer's expansions / own finishes only), the longer side's rest takes two of its
tokens per step -- a step costs about its latency, one token or two. Two A/B candidates, off
by default (session 11, untimed on 2 GPUs): ``RT``, the rounds sized per call from each
stream's token count (:func:`_chunk`) instead of the capacity share, and
:func:`ep_combine_roles_kernel`, the combine's push and finish in separate programs. Both
sides derive every round's span from the token count alike (:func:`_rounds`, :func:`_span`).
Variants measured and removed (session 13; docs/moe.md lists them with their numbers): a lag
of 2 rounds, a smaller first round, combine steps in column chunks, 2-D one-token steps,
one token a step on one-sided rounds, acq_rel count publishing, the lamport receive lag.
The phased order (``interleave=False``):

dispatch, program p, iteration r:
  1. own round r: for each own token, its ids/weights into every peer (``recv_ids/recv_w``), its
     row once into every peer owning one of its experts (``recv_x[d][RANK, t]``); then
     ``debug_barrier`` and release the round's value into ``flags[d][p, RANK]`` of every peer;
     then the copies into the local experts' slots (``expert_x``, slots from a per-expert cursor
     atomic), which the peers do not wait for. ``T`` itself goes to ``recv_T[d][RANK]`` before
     round 0, so it is released with it.
  2. every peer's round r - 1 (all peers' flags acquired in one poll, one thread per peer, with
     a deadline; round 0 also brings every peer's count, read in one load, hence its number of
     rounds): expand its rows into the local experts' slots. Receiving one round behind sending
     keeps our round r on the wire while round r - 1 is expanded.
  3. the last program to finish publishes ``counts`` and resets the cursors (graph-safe).
combine, program p, iteration r:
  1. for each peer s, its round r: ``sum_k w * expert_out[slot]`` in fp32 for each token with a
     local expert, stored once into ``comb[s][RANK, t]``; signal the round to s.
  2. own round r - 1 (acquired from every peer in one poll): ``y = sum over ranks d in order``
     of the own partial (fp32, computed here) or ``comb[RANK][d, t]``.
The combine reads ``recv_T``/``recv_w`` only before it signals, and a peer's next dispatch, which
overwrites them, cannot start before it has every round of this combine: no buffer is rewritten
while it is read. Nothing host-side is frozen into a CUDA graph. Every spin has a deadline: on
expiry the program writes an error record (device + pinned host mirror) naming the missing rank
and stops waiting; later calls see the record and do not wait at all (the lamport kernels, since
session 16, at their poll loops' first deadline check, ``SPIN_CHECK`` spins in, instead of at
entry: the entry read is a reduction whose barrier held back their first loads).

Every value a spin loop branches on is uniform over the program's threads (flags and counts are
read one thread per peer and combined by reductions; the error flag and the timer through
:func:`.sync.load_uniform` / :func:`.sync.globaltimer_uniform`): a volatile scalar load executed
by every thread can return different values while a peer's write lands, and a branch on it
would split the program. The lamport one-token receive instead lets every thread load its own
copies (count, meta, row) and branches only on :func:`.sync.every_thread_max` of what each thread
still misses: at zero every copy has landed, and a value written once is then the same in all.

Protocol ``"lamport"`` (``ep_dispatch_lamport_kernel`` / ``ep_combine_lamport_kernel``): no flags,
no system-scope fence, no waiting for a whole program's sends. Every receive slot of the workspace
starts as a *sentinel* (the sign bit alone: ``-0.0`` for float rows, ``INT_MIN`` for int32 meta and
counts); senders write ``-0.0`` as ``+0.0`` (invisible to every arithmetic use; compared by
bits, :func:`_no_sentinel`, so in an fp8 dispatch's wire rows -- fp8 bytes packed into ``dtype``
elements -- a ``+0, -0`` byte pair goes as ``+0, +0``, and a caller's scale whose low half is the
sentinel goes one ulp up), so a receiver knows an element has landed when it is no longer the
sentinel, polls with volatile loads until no element of what it needs is, and then writes the
sentinel back. Receive
buffers come in ``NBUF = 3`` copies, selected by a per-program index in device memory that advances
every call (``buf = call mod 3``): a slot is reset in call ``e`` and written again only in call
``e + 3``, which the peer cannot start before this rank has started call ``e + 2`` (the peer's
dispatch ``e + 2`` waits for this rank's counts of that call), long after call ``e`` ended: the
reset never races the peer's write. No host counter is involved. Tokens are handled in tiles of
``TB`` consecutive tokens (``[TB, BLOCK_H]`` rows; ``tile_tokens`` / ``combine_tile_tokens``);
there are no rounds. The dispatch's one-token tiles (the default) run on 1-D vectors
(:func:`_lamport_send_token`, :func:`_lamport_recv_token`; session 13, loopback: the dispatch
0.9-1.3 us faster at 64 tokens, 2.5-2.8 at 128, unchanged at 1-8), and since session 14 their
receive polls the count, meta and row in one loop that ends only when *every* thread's copies
have landed (:func:`.sync.every_thread_max`), so the values polled are used as they are (no
barrier and re-read), and a batch that fits half the grid has its own rows copied by the other
half (loopback: the dispatch 1.6-2.8 us faster at 1-128 tokens; ``docs/moe_sessions.md``,
session 14).

dispatch, program p (own tiles ``p, p+G, ...``; received tiles ``q, q+G, ...`` with
``q = (p + SHIFT) mod G``; ``SHIFT = 0`` by default, see :class:`llmcomm.moe.p2p.P2PBackend`):
  * store the own token count into ``lcnt[d][buf, RANK, p]`` of every peer (one slot per
    receiving program, so every program polls and resets only its own);
  * iteration i: send own tile i (meta = ids + weight bits to every peer, the rows to peers
    owning one of their experts) and claim its local slots (:func:`_claim_slots`: one vector
    atomic, not waited for until the rows are copied at the end of the iteration), then
    receive tile ``q + i*G`` of every peer: poll the count (first tile only) and the meta until
    nothing is the sentinel (a decision made uniform over the program through
    :func:`.sync.uniform`); barrier; re-read
    the meta (only these values are used: replicated volatile loads of a small tile can disagree
    across warps, see ``docs/wip/moe_lamport_review_s3.md``), poll the rows of the tokens with a
    local expert; barrier; reset, keep the weights (``wloc``) for the combine, expand into local
    experts; then copy own tile i into the slots claimed at its send. (One-token tiles, the
    default: count, meta and row polled in one loop until every thread's copies landed,
    expanded from those values, then a barrier and the resets; and own tile ``hp + i*G`` is
    the one claimed and copied, ``hp = (p + G // 2) mod G`` when the batch has at most
    ``G // 2`` tiles, else ``p`` -- placing never waits, so this needs no residency.) Nothing
    is carried from one iteration to the next (with the decode grid a program has one tile
    anyway; triton 3.6 cannot compile a loop-carried row here).
  * record the peers' counts (``peer_T``), advance ``buf``. ``counts``: the slot claims
    themselves, zeroed by one program at entry (``DIRECT``, the default since session 27: every
    program waits for its released flag before its first claim); with
    ``_direct_counts=False`` the last program out publishes them from the cursors and resets
    those (as in ``"flags"``).
combine, program p (small batches, when every rank's tiles times ``SPLIT`` -- else times
``SPLIT / 2`` -- fit the grid: tile ``p // S``, column chunk ``p mod S`` of it, pushed and
finished in one step, see :func:`_lamport_split_combine`; otherwise whole rows; at EP=2 the
small-batch push's slot map and weights are loaded beside ``peer_T`` at entry, not after it,
:func:`_push_routing`, session 14):
  * iteration i: push the partial sums of the peers' tile ``p + i*G`` (``lcomb[s][buf, RANK]``,
    rows with at least one local expert), then finish own tile ``q + (i-1)*G``: own partial
    (fp32), poll + reset each peer's partial, sum in fixed rank order, store ``y``.
A missing peer leaves its slots at the sentinel: the poll's deadline writes the error record.

Switchable variants (``tl.constexpr``; see :class:`llmcomm.moe.p2p.P2PBackend` for defaults;
``POSTED`` is ``"flags"`` only, ``PDL`` applies to both protocols):

* ``POSTED``: flags are signalled with a posted ``st.release.sys`` and polled with
  ``ld.acquire.sys`` (one thread, then a reduction) instead of system-scope atomics. GPU only
  (inline PTX); on by default there.
* ``PDL``: programmatic dependent launch (sm_90+, launched with ``launch_pdl=True``):
  ``griddepcontrol.wait`` precedes every memory access, so semantics are unchanged.
* (``ONE``, session 16's one-token path -- slots computed without atomics and ``counts``
  written by the receiver of token 0 when both ranks hold <= 1 token -- was removed in session
  29: off by default since session 17 for an intermittent wrong count on 2 GPUs never found,
  no gain on top of PDL in loopback (session 20), and covered since by ``DIRECT``, with which
  it could not run; ``docs/moe.md`` keeps its numbers, commit 9a70089 its code.)
* ``TSPIN`` (lamport, GPU, 16/32-bit; session 20; ``P2PBackend(_thread_spin=True)``): the
  combine's wait for a peer's partial sums (:func:`_poll_rows`) and the dispatch's wait for a
  received row (:func:`_lamport_recv_token`, after the count and meta, which keep the
  program-wide poll) are per-thread spins in inline PTX (:func:`.sync.spin_landed`): each
  thread re-loads only its own elements until none is the sentinel, with no reduction or
  barrier in the loop, then one barrier before the resets. ``MSPIN`` (with ``TSPIN``, at <= 8
  warps): the dispatch's count and meta too (:func:`.sync.spin_meta`), then one reduction.

Slots of a token's local experts are taken with one masked vector ``atomic_add`` (its K
atomics in flight together), always 1-D (:func:`_claim_slots`); the combine's K expert-row loads
are masked loads (no branch per k), so they overlap.
"""

import triton
import triton.language as tl

from .sync import (every_thread_max, globaltimer_threads, globaltimer_uniform, ld_acquire_sys,
                   load_uniform, pdl_launch_dependents, pdl_wait, spin_equal, spin_landed,
                   spin_meta, st_release_sys, uniform)


#: spins of a poll loop between two checks of the deadline and of this rank's error flag: each
#: check is two more reductions across the program and a dependent load, which at 16 warps
#: would slow every spin, and a spin's length is how late a landed value is seen
SPIN_CHECK = tl.constexpr(16)


@triton.jit
def _now(USE_TIMER: tl.constexpr, NT: tl.constexpr):
    """``%globaltimer`` (ns), uniform over the program; 0 in the interpreter."""
    if USE_TIMER:
        t = globaltimer_uniform(NT)
    else:
        t = tl.full([], 0, tl.int64)
    return t


#: ``TRACE`` (a diagnostic, off): the stages the lamport dispatch stamps, in order -- stage ``s``
#: of program ``p`` adds (ns since the program's entry, 1) to ``trace[p, s]`` (int64 [G, NS, 2])
#: each time the program passes it. "peer ..." stages are per receive (a program with no token
#: to receive still polls the count: "peer meta seen" is then its count's landing);
#: "counts published" is the last program out's only (none with ``DIRECT``, the default).
TRACE_STAGES = ("counts sent", "own token sent", "own slots claimed", "peer meta seen",
                "peer row seen", "peer slots claimed", "peer rows placed", "peer token reset",
                "own rows placed", "loop done", "counts published", "end")
TRACE_NS = tl.constexpr(len(TRACE_STAGES))


@triton.jit
def _clock(TRACE: tl.constexpr, USE_TIMER: tl.constexpr, NT: tl.constexpr):
    """``TRACE``: each thread's ``%globaltimer`` (int64 [NT]; zeros in the interpreter)."""
    if TRACE and USE_TIMER:
        t = globaltimer_threads(NT)
    else:
        t = tl.zeros([NT], tl.int64)
    return t


@triton.jit
def _stamp(trace, pid, S: tl.constexpr, t0, TRACE: tl.constexpr, USE_TIMER: tl.constexpr,
           NT: tl.constexpr):
    """``TRACE``: add (thread 0's ns since ``t0``, 1) to ``trace[pid, S]`` by relaxed atomics
    whose results nobody waits for, and no barrier: the stamp holds the program back by two
    instructions' issue. Nothing at all without ``TRACE`` (the default kernels' PTX)."""
    if TRACE:
        i = tl.arange(0, NT)
        p = trace + (pid * TRACE_NS + S) * 2 + i * 0
        tl.atomic_add(p, _clock(TRACE, USE_TIMER, NT) - t0, mask=i == 0, sem="relaxed",
                      scope="gpu")
        tl.atomic_add(p + 1, tl.full([NT], 1, tl.int64), mask=i == 0, sem="relaxed",
                      scope="gpu")


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
def _spin_deadline(pending, spins, t0, dead, err_dev, err_host, timeout_ns, OP: tl.constexpr,
                   peer, USE_TIMER: tl.constexpr, NT: tl.constexpr):
    """The deadline of a poll loop, checked every ``SPIN_CHECK``-th spin while ``pending``:
    the clock is first read at the first check (a wait already satisfied reads none); past
    the deadline the error record names ``peer`` (phase ``OP``) and ``dead`` is set, else
    another program's error is picked up. Returns ``(t0, dead)``."""
    if (pending > 0) & (spins % SPIN_CHECK == 0):
        if spins == SPIN_CHECK:   # the deadline counts from the first check
            t0 = _now(USE_TIMER, NT)
        if _expired(t0, spins, timeout_ns, USE_TIMER, NT):
            _fail(err_dev, err_host, OP, peer)
            dead = dead | 1
        else:
            dead = dead | _dead(err_dev, NT)
    return t0, dead


@triton.jit
def _fail(err_dev, err_host, OP: tl.constexpr, peer):
    code = OP * 65536 + peer + 1
    tl.store(err_dev, code)
    tl.store(err_host, code)


@triton.jit
def _flag_signal(flag_ptr, epoch, POSTED: tl.constexpr, NT: tl.constexpr):
    """Release-store ``epoch`` into a peer's flag (after ``debug_barrier``): atomic or posted."""
    if POSTED:
        i = tl.arange(0, NT)
        st_release_sys(flag_ptr + i * 0, epoch + i * 0, i == 0)
    else:
        tl.atomic_xchg(flag_ptr, epoch, sem="release", scope="sys")


@triton.jit
def _lanes(vec, BLOCK_W: tl.constexpr, NT: tl.constexpr):
    """``vec`` [BLOCK_W] (one entry per rank) spread over one thread per rank: [NT], lane ``i``
    holds ``vec[i]`` (0 past BLOCK_W), so no value is held (and loaded) by two threads."""
    i = tl.arange(0, NT)
    offs_w = tl.arange(0, BLOCK_W)
    return tl.sum(tl.where(i[:, None] == offs_w[None, :], vec[None, :], 0), axis=1)


@triton.jit
def _wait_peers(flag_row, target, need, dead, err_dev, err_host, timeout_ns, OP: tl.constexpr,
                USE_TIMER: tl.constexpr, POSTED: tl.constexpr, BLOCK_W: tl.constexpr,
                NT: tl.constexpr):
    """Spin (acquire, system scope) until ``flag_row[s] >= target`` (int32, wrap-safe: flags
    only move forward) for every rank ``s`` with ``need[s]`` ([BLOCK_W] bool). Every needed flag
    is read in the same poll, one thread per rank (``ld.acquire.sys``, or an atomic), so W - 1
    peers cost one round trip, not W - 1; "still pending" is a reduction, uniform over the
    program. Returns the new ``dead``; at once when ``dead`` is set. On expiry the lowest rank
    still behind is named."""
    i = tl.arange(0, NT)
    lane = _lanes(need.to(tl.int32), BLOCK_W, NT) != 0
    ptrs = flag_row + tl.where(lane, i, 0)
    if POSTED:
        v = ld_acquire_sys(ptrs, lane)
    else:
        v = tl.atomic_add(ptrs, tl.zeros([NT], tl.int32), mask=lane, sem="acquire", scope="sys")
    behind = lane & ((v - target) < 0)
    pending = tl.sum(behind.to(tl.int32), axis=0)
    t0 = tl.full([], 0, tl.int64)   # set at the first check: no clock read unless waiting
    spins = tl.full([], 0, tl.int64)
    while (pending > 0) & (dead == 0):
        if POSTED:
            v = ld_acquire_sys(ptrs, lane)
        else:
            v = tl.atomic_add(ptrs, tl.zeros([NT], tl.int32), mask=lane, sem="acquire",
                              scope="sys")
        behind = lane & ((v - target) < 0)
        pending = tl.sum(behind.to(tl.int32), axis=0)
        spins += 1
        if (pending > 0) & (spins % SPIN_CHECK == 0):
            if spins == SPIN_CHECK:   # the deadline counts from the first check
                t0 = _now(USE_TIMER, NT)
            if _expired(t0, spins, timeout_ns, USE_TIMER, NT):
                _fail(err_dev, err_host, OP, tl.min(tl.where(behind, i, NT), axis=0))
                dead = dead | 1
            else:
                dead = dead | _dead(err_dev, NT)
    return dead


@triton.jit
def _peer_rounds(recv_T_row, pid, RANK: tl.constexpr, W: tl.constexpr, G: tl.constexpr,
                 CHUNK: tl.constexpr, BLOCK_W: tl.constexpr, NT: tl.constexpr,
                 RT: tl.constexpr = False):
    """Every peer's token count (``recv_T_row[s]``, already released to us) read in one load,
    one thread per peer; returns ``(n_in, r_in)`` [BLOCK_W]: this program's share of each
    peer's tokens and its rounds (uniform: every value comes out of a reduction)."""
    i = tl.arange(0, NT)
    lane = (i < W) & (i != RANK)
    cnt = tl.load(recv_T_row + tl.where(lane, i, 0), mask=lane, other=0, volatile=True)
    offs_w = tl.arange(0, BLOCK_W)
    n_in = tl.zeros([BLOCK_W], tl.int32)
    r_in = tl.zeros([BLOCK_W], tl.int32)
    for s in tl.static_range(W):
        if s != RANK:
            ns, rs = _rounds(tl.sum(tl.where(i == s, cnt, 0), axis=0), pid, G, CHUNK, RT)
            n_in = tl.where(offs_w == s, ns, n_in)
            r_in = tl.where(offs_w == s, rs, r_in)
    return n_in, r_in


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
def _chunk(n, CHUNK: tl.constexpr):
    """``RT``: tokens per round of a stream of ``n`` tokens, the launcher's rule applied to
    ``n`` itself -- ``max(ceil(n / 4), min(ceil(n / 2), 8), min(n, 2))``, at most ``CHUNK``
    (the rule at the capacity share) -- so a batch below capacity keeps 2 to 4 rounds
    (session 9: at 8 tokens a program 2 rounds of 4 take 145 us, 1 round of 8 154; at 2 tokens
    one round of 2 52 us, two of 1 58)."""
    c = tl.maximum(tl.maximum(tl.cdiv(n, 4), tl.minimum(tl.cdiv(n, 2), 8)), tl.minimum(n, 2))
    return tl.maximum(tl.minimum(c, CHUNK), 1)


@triton.jit
def _rounds(T, pid, G: tl.constexpr, CHUNK: tl.constexpr, RT: tl.constexpr = False):
    """(tokens of program ``pid`` among ``T``, its rounds of ``CHUNK`` tokens; at least 1).
    ``RT``: rounds of :func:`_chunk` tokens."""
    n = tl.maximum(tl.cdiv(T - pid, G), 0)
    if RT:
        c = _chunk(n, CHUNK)
        rounds = 1 + tl.cdiv(tl.maximum(n - c, 0), c)
    else:   # constexpr sizes, as before RT: divisions by constants, scalars stay scalars
        rounds = 1 + tl.cdiv(tl.maximum(n - CHUNK, 0), CHUNK)
    return n, rounds


@triton.jit
def _span(r, n, CHUNK: tl.constexpr, RT: tl.constexpr = False):
    """(first token index, token count) of round ``r`` of ``n`` tokens (see :func:`_rounds`).
    The count is per peer where ``n`` is; the first index too with ``RT`` (each peer's rounds
    have their own size), a scalar without (:func:`_of_peer` reads either)."""
    if RT:
        c = _chunk(n, CHUNK)
        j0 = tl.where(r == 0, 0, c + (r - 1) * c)
        cnt = tl.minimum(tl.where(r == 0, c, c + r * c), n) - j0
    else:
        j0 = tl.where(r == 0, 0, CHUNK + (r - 1) * CHUNK)
        cnt = tl.minimum(tl.where(r == 0, CHUNK, CHUNK + r * CHUNK), n) - j0
    return j0, cnt


@triton.jit
def _of_peer(v, s, BLOCK_W: tl.constexpr, RT: tl.constexpr):
    """Peer ``s``'s entry of a round start from :func:`_span`: a [BLOCK_W] vector with ``RT``
    (a reduction, uniform), else the scalar every peer shares, as it is (no reduction)."""
    if RT:
        out = tl.sum(tl.where(tl.arange(0, BLOCK_W) == s, v, 0), axis=0)
    else:
        out = v
    return out


@triton.jit
def _slot_masks(ids, vt, RANK: tl.constexpr, L: tl.constexpr, K: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """For ``R`` tokens (``ids`` [R, BLOCK_K], valid ``vt`` [R]): ``(el, local, first, new)``
    [R, BLOCK_K]: the local expert index, whether the id is a local expert of a valid token, the
    first k with the same id, and whether this k takes a slot (first occurrence, local)."""
    offs_k = tl.arange(0, BLOCK_K)
    mk = offs_k < K
    el = ids - RANK * L
    local = mk[None, :] & (ids >= 0) & (el >= 0) & (el < L) & vt[:, None]
    same = (ids[:, :, None] == ids[:, None, :]) & mk[None, None, :]
    first = tl.min(tl.where(same, offs_k[None, None, :], BLOCK_K), axis=2)
    return el, local, first, local & (first == offs_k[None, :])


@triton.jit
def _claim_slots(ids, vt, cursor, RANK: tl.constexpr, L: tl.constexpr, K: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """Take a slot for every new local expert of ``R`` tokens in *one* masked vector
    ``atomic_add`` on the per-expert cursors (all in flight together, one round trip). Returns
    the raw slots [R, BLOCK_K] (meaningful where :func:`_slot_masks` says ``new``); nothing
    waits for them until they are used, so a caller may issue this early and use the slots late
    (:func:`_place_rows`). The atomic itself is 1-D (the tile is reshaped, in order, around
    it): the return value of a vector atomic is only used in that shape."""
    R: tl.constexpr = ids.shape[0]
    N: tl.constexpr = R * BLOCK_K
    el, local, first, new = _slot_masks(ids, vt, RANK, L, K, BLOCK_K)
    slot = tl.atomic_add(cursor + tl.reshape(tl.where(new, el, 0), [N]),
                         tl.full([N], 1, tl.int32), mask=tl.reshape(new, [N]), sem="relaxed",
                         scope="gpu")
    return tl.reshape(slot, [R, BLOCK_K])


@triton.jit
def _place_rows(row, ids, vt, slot, srow, expert_x, slot_map, RANK: tl.constexpr,
                H: tl.constexpr, K: tl.constexpr, L: tl.constexpr, CAP: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """Copy the valid (``vt`` [R]) rows of ``row`` [R, BLOCK_H] into the slots ``slot`` taken by
    :func:`_claim_slots` for the same ``ids``; write their slot-map rows ``slot_map[srow]``
    (``srow`` [R] = ``source * M + token``): the entry ``el * CAP + slot`` of every local id
    (repeated ids share their first occurrence's), -1 for the others."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_K)
    entry, smrow = _slot_entries(ids, vt, slot, RANK, L, K, CAP, BLOCK_K)
    for k in tl.static_range(K):
        e = tl.max(tl.where(offs_k[None, :] == k, entry, -1), axis=1)
        dst = expert_x + tl.cast(tl.maximum(e, 0), tl.int64)[:, None] * H + offs_h[None, :]
        tl.store(dst, row, mask=(e >= 0)[:, None] & (offs_h < H)[None, :])
    tl.store(slot_map + srow[:, None] * K + offs_k[None, :], smrow,
             mask=vt[:, None] & (offs_k < K)[None, :])


@triton.jit
def _slot_entries(ids, vt, slot, RANK: tl.constexpr, L: tl.constexpr, K: tl.constexpr,
                  CAP: tl.constexpr, BLOCK_K: tl.constexpr):
    """For ``R`` tokens and the raw slots :func:`_claim_slots` took for them: ``(entry, smrow)``
    [R, BLOCK_K]: ``el * CAP + slot`` where this k took a slot (else -1), and the slot-map row
    (every local id: its first occurrence's entry; -1 for the others)."""
    offs_k = tl.arange(0, BLOCK_K)
    el, local, first, new = _slot_masks(ids, vt, RANK, L, K, BLOCK_K)
    new = new & (slot < CAP)             # cannot fail (CAP is the worst case); never write OOB
    entry = tl.where(new, el * CAP + slot, -1)
    shared = tl.max(tl.where(offs_k[None, None, :] == first[:, :, None], entry[:, None, :], -1),
                    axis=2)
    return entry, tl.where(local, shared, -1)


@triton.jit
def _claim_round(t64, vt, src_ids, srow, cursor, slot_map, RANK: tl.constexpr, L: tl.constexpr,
                 K: tl.constexpr, E: tl.constexpr, CAP: tl.constexpr, BLOCK_K: tl.constexpr):
    """``CLAIM`` (session 8): the slots of a whole round's tokens (``t64`` [RB], valid ``vt``)
    in one vector atomic, written to their slot-map rows ``slot_map[srow]`` (``srow`` [RB]);
    their ids from ``src_ids`` (``[., K]`` rows ``srow``, for a peer's tokens, or the caller's
    ``topk_ids`` rows ``t64``: pass ``srow`` or ``t64`` accordingly, ``E`` sanitises). The
    round's steps then read their slots back (:func:`_dispatch_two_tokens`), one load beside
    the row load instead of an id load -> atomic -> store chain per token."""
    offs_k = tl.arange(0, BLOCK_K)
    m2 = vt[:, None] & (offs_k < K)[None, :]
    ids = tl.load(src_ids + t64[:, None] * K + offs_k[None, :], mask=m2, other=-1,
                  cache_modifier=".cg").to(tl.int32)
    ids = tl.where(m2 & (ids >= 0) & (ids < E), ids, -1)
    slot = _claim_slots(ids, vt, cursor, RANK, L, K, BLOCK_K)
    entry, smrow = _slot_entries(ids, vt, slot, RANK, L, K, CAP, BLOCK_K)
    tl.store(slot_map + srow[:, None] * K + offs_k[None, :], smrow, mask=m2)


@triton.jit
def _expand_tile(row, ids, vt, s, t64, expert_x, cursor, slot_map, RANK: tl.constexpr,
                 M: tl.constexpr, H: tl.constexpr, K: tl.constexpr, L: tl.constexpr,
                 CAP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """Copy the valid (``vt`` [TB]) rows of ``row`` [TB, BLOCK_H] (tokens ``t64`` of source rank
    ``s``) into fresh slots of their local experts; write ``slot_map[s, t, :]``: one
    :func:`_claim_slots` for the tile, then :func:`_place_rows`."""
    slot = _claim_slots(ids, vt, cursor, RANK, L, K, BLOCK_K)
    _place_rows(row, ids, vt, slot, s * M + t64, expert_x, slot_map, RANK, H, K, L, CAP,
                BLOCK_H, BLOCK_K)


@triton.jit
def _tile(j, jend, pid, G: tl.constexpr, TB: tl.constexpr):
    """Tokens ``pid + (j + b) * G`` for ``b < TB`` (valid where ``j + b < jend``), as int64."""
    jj = j + tl.arange(0, TB)
    vt = jj < jend
    return tl.cast(pid + jj * G, tl.int64), vt


@triton.jit
def _own_tokens(t64, vt, x_ptr, ids_ptr, w_ptr, H: tl.constexpr, K: tl.constexpr,
                L: tl.constexpr, E: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """Own tokens ``t64`` (valid where ``vt``) as both protocols send them: ``(m2, ids, w, row,
    owner)``: the [TB, BLOCK_K] mask, expert ids (out-of-range -> -1), fp32 weights, the
    [TB, BLOCK_H] rows and the rank owning each expert (-1 for none)."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_K)
    m2 = vt[:, None] & (offs_k < K)[None, :]
    ids = tl.load(ids_ptr + t64[:, None] * K + offs_k[None, :], mask=m2, other=-1).to(tl.int32)
    ids = tl.where(m2 & (ids >= 0) & (ids < E), ids, -1)
    w = tl.load(w_ptr + t64[:, None] * K + offs_k[None, :], mask=m2, other=0.0).to(tl.float32)
    row = tl.load(x_ptr + t64[:, None] * H + offs_h[None, :],
                  mask=vt[:, None] & (offs_h < H)[None, :])
    return m2, ids, w, row, tl.where(ids >= 0, ids // L, -1)


@triton.jit
def _send_tile(t64, vt, x_ptr, ids_ptr, w_ptr, recv_x, recv_ids, recv_w, RANK: tl.constexpr,
               W: tl.constexpr, M: tl.constexpr, H: tl.constexpr, K: tl.constexpr,
               L: tl.constexpr, E: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
               CE: tl.constexpr = False):
    """Own tokens ``t64`` [TB]: ids/weights to every peer, each row once to every peer owning
    one of its experts (the local copies come after the round is signalled:
    :func:`_copy_own_tile`, or at once: :func:`_send_expand_tile`). Returns ``(row, ids)``.
    ``CE``: the rows are not stored (the launcher copies them, see ``ep_dispatch_kernel``)."""
    offs_h = tl.arange(0, BLOCK_H)
    mh = offs_h < H
    offs_k = tl.arange(0, BLOCK_K)
    m2, ids, w, row, owner = _own_tokens(t64, vt, x_ptr, ids_ptr, w_ptr, H, K, L, E, BLOCK_H,
                                         BLOCK_K)
    for d in tl.static_range(W):
        if d != RANK:
            mrow = RANK * M + t64
            tl.store(recv_ids[d] + mrow[:, None] * K + offs_k[None, :], ids, mask=m2)
            tl.store(recv_w[d] + mrow[:, None] * K + offs_k[None, :], w, mask=m2)
            if not CE:
                to_d = vt & (tl.sum((owner == d).to(tl.int32), axis=1) > 0)
                tl.store(recv_x[d] + mrow[:, None] * H + offs_h[None, :], row,
                         mask=to_d[:, None] & mh[None, :])
    return row, ids


@triton.jit
def _copy_own_tile(t64, vt, x_ptr, ids_ptr, w_ptr, expert_x, cursor, slot_map,
                   RANK: tl.constexpr, M: tl.constexpr, H: tl.constexpr, K: tl.constexpr,
                   L: tl.constexpr, E: tl.constexpr, CAP: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """Own tokens ``t64`` [TB] into the local experts' slots (loaded again: the rows are in L2
    from the send, and the signal to the peers does not wait for these copies)."""
    m2, ids, w, row, owner = _own_tokens(t64, vt, x_ptr, ids_ptr, w_ptr, H, K, L, E, BLOCK_H,
                                         BLOCK_K)
    _expand_tile(row, ids, vt, RANK, t64, expert_x, cursor, slot_map, RANK, M, H, K, L, CAP,
                 BLOCK_H, BLOCK_K)


@triton.jit
def _send_expand_tile(t64, vt, x_ptr, ids_ptr, w_ptr, recv_x, recv_ids, recv_w, expert_x, cursor,
                      slot_map, RANK: tl.constexpr, W: tl.constexpr, M: tl.constexpr,
                      H: tl.constexpr, K: tl.constexpr, L: tl.constexpr, E: tl.constexpr,
                      CAP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                      CE: tl.constexpr = False):
    """Own tokens ``t64`` [TB]: :func:`_send_tile`, then the same rows (still in registers) into
    the local experts' slots (``INTERLEAVE``: no second load, and the NVLink stores and the
    local HBM stores of one token are in flight together)."""
    row, ids = _send_tile(t64, vt, x_ptr, ids_ptr, w_ptr, recv_x, recv_ids, recv_w, RANK, W, M,
                          H, K, L, E, BLOCK_H, BLOCK_K, CE)
    _expand_tile(row, ids, vt, RANK, t64, expert_x, cursor, slot_map, RANK, M, H, K, L, CAP,
                 BLOCK_H, BLOCK_K)


@triton.jit
def _dispatch_pair_step(t64, vt, tr64, vr, x_ptr, ids_ptr, w_ptr, recv_x, recv_ids, recv_w,
                        expert_x, cursor, slot_map, RANK: tl.constexpr, M: tl.constexpr,
                        H: tl.constexpr, K: tl.constexpr, L: tl.constexpr, E: tl.constexpr,
                        CAP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                        CE: tl.constexpr = False):
    """``FUSE`` (two ranks): own tokens ``t64`` [TB] sent and expanded as in
    :func:`_send_expand_tile`, and the peer's tokens ``tr64`` (already acquired) expanded as in
    :func:`_recv_tile`, in one step: every load of both tiles is issued first, then the sends,
    then both tiles' slot atomics, then the copies -- two dependent round trips per step instead
    of four."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_K)
    s: tl.constexpr = 1 - RANK
    mrow = s * M + tr64
    m2r = vr[:, None] & (offs_k < K)[None, :]
    rids = tl.load(recv_ids[RANK] + mrow[:, None] * K + offs_k[None, :], mask=m2r, other=-1,
                   cache_modifier=".cg")
    rrow = tl.load(recv_x[RANK] + mrow[:, None] * H + offs_h[None, :],
                   mask=vr[:, None] & (offs_h < H)[None, :], cache_modifier=".cg")
    row, ids = _send_tile(t64, vt, x_ptr, ids_ptr, w_ptr, recv_x, recv_ids, recv_w, RANK, 2, M,
                          H, K, L, E, BLOCK_H, BLOCK_K, CE)
    slot = _claim_slots(ids, vt, cursor, RANK, L, K, BLOCK_K)
    rslot = _claim_slots(rids, vr, cursor, RANK, L, K, BLOCK_K)
    _place_rows(row, ids, vt, slot, RANK * M + t64, expert_x, slot_map, RANK, H, K, L, CAP,
                BLOCK_H, BLOCK_K)
    _place_rows(rrow, rids, vr, rslot, mrow, expert_x, slot_map, RANK, H, K, L, CAP, BLOCK_H,
                BLOCK_K)


@triton.jit
def _token_masks(ids, valid, RANK: tl.constexpr, L: tl.constexpr, K: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """:func:`_slot_masks` for one token on 1-D vectors (``ids`` [BLOCK_K], ``valid`` a
    scalar): ``(el, local, first, new)``, each [BLOCK_K]."""
    offs_k = tl.arange(0, BLOCK_K)
    mk = offs_k < K
    el = ids - RANK * L
    local = mk & (ids >= 0) & (el >= 0) & (el < L) & (tl.where(valid, K, 0) > offs_k)
    same = (ids[:, None] == ids[None, :]) & mk[None, :]
    first = tl.min(tl.where(same, offs_k[None, :], BLOCK_K), axis=1)
    return el, local, first, local & (first == offs_k)


@triton.jit
def _token_claim(ids, valid, cursor, RANK: tl.constexpr, L: tl.constexpr, K: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """:func:`_token_masks` + :func:`_claim_slots` for one token on 1-D vectors (``ids``
    [BLOCK_K], ``valid`` a scalar): ``(slot, el, local, first, new)``, each [BLOCK_K]."""
    el, local, first, new = _token_masks(ids, valid, RANK, L, K, BLOCK_K)
    slot = tl.atomic_add(cursor + tl.where(new, el, 0), tl.full([BLOCK_K], 1, tl.int32),
                         mask=new, sem="relaxed", scope="gpu")
    return slot, el, local, first, new


@triton.jit
def _no_claim(BLOCK_K: tl.constexpr):
    """:func:`_token_claim`'s tuple for no token (``GATE``'s other branch): nothing local,
    nothing new, no atomic, no reduction."""
    z = tl.zeros([BLOCK_K], tl.int32)
    f = z != 0
    return z, z - 1, f, z, f


@triton.jit
def _token_place(row, valid, claim, srow, expert_x, slot_map, H: tl.constexpr,
                 K: tl.constexpr, CAP: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """:func:`_place_rows` for one token: ``row`` [BLOCK_H] into the slots of ``claim`` (from
    :func:`_token_claim`), and its slot-map row ``slot_map[srow]``. (Each slot is picked out
    by a reduction over the ``[BLOCK_K]`` vector: warp shuffles, no barrier -- the PTX has
    none; session 26's one ``[BLOCK_K, BLOCK_H]`` store instead added 3 barriers a call site
    for the slots' layout conversion.)"""
    slot, el, local, first, new = claim
    offs_h = tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_K)
    new = new & (slot < CAP)             # cannot fail (CAP is the worst case); never write OOB
    entry = tl.where(new, el * CAP + slot, -1)
    shared = tl.max(tl.where(offs_k[None, :] == first[:, None], entry[None, :], -1), axis=1)
    for k in tl.static_range(K):
        e = tl.max(tl.where(offs_k == k, entry, -1), axis=0)
        tl.store(expert_x + tl.cast(tl.maximum(e, 0), tl.int64) * H + offs_h, row,
                 mask=offs_h < tl.where(e >= 0, H, 0))
    tl.store(slot_map + srow * K + offs_k, tl.where(local, shared, -1),
             mask=tl.where(valid, K, 0) > offs_k)


@triton.jit
def _token_copy(row, valid, srow, expert_x, slot_map, H: tl.constexpr, K: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """``row`` [BLOCK_H] into the slots :func:`_claim_round` wrote to ``slot_map[srow]`` (a
    repeated id copies its row twice into the same slot: the same bytes)."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_K)
    sm = tl.load(slot_map + srow * K + offs_k, mask=tl.where(valid, K, 0) > offs_k, other=-1,
                 cache_modifier=".cg")
    for k in tl.static_range(K):
        e = tl.max(tl.where(offs_k == k, sm, -1), axis=0)
        tl.store(expert_x + tl.cast(tl.maximum(e, 0), tl.int64) * H + offs_h, row,
                 mask=offs_h < tl.where(e >= 0, H, 0))


@triton.jit
def _dtok_load(t, v, KIND: tl.constexpr, x_ptr, ids_ptr, w_ptr, recv_x, recv_ids, recv_w,
               RANK: tl.constexpr, M: tl.constexpr, H: tl.constexpr, K: tl.constexpr,
               L: tl.constexpr, E: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
               CE: tl.constexpr = False):
    """One token of a one-token dispatch step, loaded: ``(row, ids, srow)`` ([BLOCK_H],
    [BLOCK_K] int32, its slot-map row). ``KIND`` 0: the own token ``t``, also sent (ids and
    weights to the peer, the row where one of its experts is the peer's, unless ``CE``: the
    launcher copies the rows); 1: the peer's token ``t`` from the receive buffers (already
    acquired)."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_K)
    s: tl.constexpr = 1 - RANK
    kv = offs_k < tl.where(v, K, 0)
    if KIND == 1:
        srow = tl.where(v, s * M + t, 0)
        ids = tl.load(recv_ids[RANK] + srow * K + offs_k, mask=kv, other=-1,
                      cache_modifier=".cg")
        row = tl.load(recv_x[RANK] + srow * H + offs_h, mask=offs_h < tl.where(v, H, 0),
                      cache_modifier=".cg")
    else:
        ti = tl.where(v, t, 0)
        ids = tl.load(ids_ptr + ti * K + offs_k, mask=kv, other=-1).to(tl.int32)
        ids = tl.where(kv & (ids >= 0) & (ids < E), ids, -1)
        w = tl.load(w_ptr + ti * K + offs_k, mask=kv, other=0.0).to(tl.float32)
        row = tl.load(x_ptr + ti * H + offs_h, mask=offs_h < tl.where(v, H, 0))
        srow = RANK * M + ti
        tl.store(recv_ids[s] + srow * K + offs_k, ids, mask=kv)
        tl.store(recv_w[s] + srow * K + offs_k, w, mask=kv)
        if not CE:
            to_s = tl.sum((tl.where(ids >= 0, ids // L, -1) == s).to(tl.int32), axis=0) > 0
            tl.store(recv_x[s] + srow * H + offs_h, row, mask=offs_h < tl.where(to_s, H, 0))
    return row, ids, srow


@triton.jit
def _dispatch_two_tokens(ta, va, tb, vb, KA: tl.constexpr, KB: tl.constexpr, x_ptr, ids_ptr,
                         w_ptr, recv_x, recv_ids, recv_w, expert_x, cursor, slot_map,
                         RANK: tl.constexpr, M: tl.constexpr, H: tl.constexpr, K: tl.constexpr,
                         L: tl.constexpr, E: tl.constexpr, CAP: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                         CLAIMED: tl.constexpr = False, CE: tl.constexpr = False):
    """:func:`_dispatch_pair_step` for one-token tiles (``TB == 1``): two tokens ``ta``, ``tb``
    (int64 scalars, valid where ``va`` / ``vb``) of kinds ``KA``, ``KB`` (0: own, sent and
    expanded; 1: the peer's, expanded; :func:`_dtok_load`) on 1-D rows and [BLOCK_K] vectors:
    ``tb``'s loads, ``ta``'s loads (and sends), both slot claims, both copies. ``CLAIMED``:
    their slots were taken by :func:`_claim_round`. The usual pair is (own, peer); a round
    with tokens on one side only takes two of them."""
    row_b, ids_b, srow_b = _dtok_load(tb, vb, KB, x_ptr, ids_ptr, w_ptr, recv_x, recv_ids,
                                      recv_w, RANK, M, H, K, L, E, BLOCK_H, BLOCK_K, CE)
    row_a, ids_a, srow_a = _dtok_load(ta, va, KA, x_ptr, ids_ptr, w_ptr, recv_x, recv_ids,
                                      recv_w, RANK, M, H, K, L, E, BLOCK_H, BLOCK_K, CE)
    if CLAIMED:
        _token_copy(row_a, va, srow_a, expert_x, slot_map, H, K, BLOCK_H, BLOCK_K)
        _token_copy(row_b, vb, srow_b, expert_x, slot_map, H, K, BLOCK_H, BLOCK_K)
    else:
        claim_a = _token_claim(ids_a, va, cursor, RANK, L, K, BLOCK_K)
        claim_b = _token_claim(ids_b, vb, cursor, RANK, L, K, BLOCK_K)
        _token_place(row_a, va, claim_a, srow_a, expert_x, slot_map, H, K, CAP, BLOCK_H,
                     BLOCK_K)
        _token_place(row_b, vb, claim_b, srow_b, expert_x, slot_map, H, K, CAP, BLOCK_H,
                     BLOCK_K)


@triton.jit
def _recv_tile(s, t64, vt, recv_x, recv_ids, expert_x, cursor, slot_map, RANK: tl.constexpr,
               M: tl.constexpr, H: tl.constexpr, K: tl.constexpr, L: tl.constexpr,
               CAP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """Tokens ``t64`` of peer ``s`` (already acquired): their rows into local experts' slots.

    The rows are loaded together with the ids, not after them (one round trip, not two): a
    token the peer did not send here (no local expert) reads a stale row, which
    :func:`_expand_tile` never stores (it takes slots for local experts only)."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_K)
    m2 = vt[:, None] & (offs_k < K)[None, :]
    mrow = s * M + t64
    ids = tl.load(recv_ids[RANK] + mrow[:, None] * K + offs_k[None, :], mask=m2, other=-1,
                  cache_modifier=".cg")
    row = tl.load(recv_x[RANK] + mrow[:, None] * H + offs_h[None, :],
                  mask=vt[:, None] & (offs_h < H)[None, :], cache_modifier=".cg")
    _expand_tile(row, ids, vt, s, t64, expert_x, cursor, slot_map, RANK, M, H, K, L, CAP,
                 BLOCK_H, BLOCK_K)


@triton.jit
def _publish_counts(done, cursor, counts, G: tl.constexpr, L: tl.constexpr,
                    BLOCK_L: tl.constexpr, next_ptr=None, next_val=0,
                    NEXT: tl.constexpr = False):
    """End of a dispatch: the last of the ``G`` programs out publishes the per-expert slot
    cursors as ``counts`` and resets them (and ``done``) for the next call (graph-safe).

    Relaxed atomics (acq_rel until session 6, which measured this): a release here would wait for
    every outstanding store of the program -- its expert rows and, above all, its rows and meta
    in flight to the peers over NVLink -- and the count needs none of them. It needs every
    program's cursor increments, and those are complete before the program's ``done``
    increment: each thread has used the value its slot atomic returned (the slot is in the
    address of a later store) before the barrier, so that read-modify-write was performed at the
    L2, where atomics on one address are serialised; the last program's exchange comes after the
    ``done`` increment that made it last. Expert rows and counts are seen by later kernels
    (kernel boundary). ``NEXT``: the last program out also stores ``next_val`` at
    ``next_ptr`` (the flags dispatch's next copied-rows flag value, ``CE_MIN``). Returns
    whether this program was the last out."""
    tl.debug_barrier()
    prev = tl.atomic_add(done, 1, sem="relaxed", scope="gpu")
    last = prev == G - 1
    if last:
        offs_l = tl.arange(0, BLOCK_L)
        ml = offs_l < L
        c = tl.atomic_xchg(cursor + offs_l, tl.zeros([BLOCK_L], tl.int32), mask=ml,
                           sem="relaxed", scope="gpu")
        tl.store(counts + offs_l, c, mask=ml)
        if NEXT:
            tl.store(next_ptr, next_val)
        tl.atomic_xchg(done, 0, sem="relaxed", scope="gpu")
    return last


@triton.jit
def ep_dispatch_kernel(x_ptr, ids_ptr, w_ptr, T,
                       recv_x, recv_ids, recv_w, recv_T, flags, ce_flag, ce_next,
                       expert_x, counts, cursor, done, slot_map, epoch_ptr, err_dev,
                       err_host_addr, timeout_ns,
                       RANK: tl.constexpr, W: tl.constexpr, G: tl.constexpr, M: tl.constexpr,
                       H: tl.constexpr, K: tl.constexpr, L: tl.constexpr, E: tl.constexpr,
                       CAP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_L: tl.constexpr, BLOCK_W: tl.constexpr, CHUNK: tl.constexpr,
                       TB: tl.constexpr, USE_TIMER: tl.constexpr, POSTED: tl.constexpr = False,
                       PDL: tl.constexpr = False, NT: tl.constexpr = 256,
                       INTERLEAVE: tl.constexpr = False, FUSE: tl.constexpr = False,
                       CLAIM_RB: tl.constexpr = 0, RT: tl.constexpr = False,
                       CE: tl.constexpr = False, CE_MIN: tl.constexpr = 0):
    """Flags dispatch; see the module docstring (``INTERLEAVE``: its own section there).
    With ``FUSE``, two ranks and one-token tiles, the fused steps run on 1-D rows
    (:func:`_dispatch_two_tokens`), and a round with tokens on one side only takes two of them
    per step. ``CLAIM_RB`` > 0 (a power of 2 >= every round's tokens): the slots of a round's
    fused steps are taken at the round's start (:func:`_claim_round`).

    ``CE_MIN`` > 0 (``INTERLEAVE``, not ``RT``): a rank with at least ``CE_MIN`` tokens sends
    its rows by ``copy_`` on a side stream, meant for a copy engine (``P2PBackend._ce_send``),
    and ``CE`` says this rank does in this call: its kernel stores no rows to the peers. Round
    ``r`` of every program together is the contiguous tokens ``[r * CHUNK * G, (r + 1) * CHUNK
    * G)``, copied into each peer's ``recv_x`` and then flagged, in that stream's order, by a
    copy of ``ce_next`` (local: the call's epoch, stored there by the previous call's last
    program out) into the peer's ``ce_flag[r * W + RANK]``. Before a program expands round
    ``r`` of a peer whose token count (``recv_T``, read after round 0) is at least ``CE_MIN``
    it waits for
    ``ce_flag[RANK][r * W + s] >= epoch`` too. Monotonic, as the flags: nothing is reset, so a
    peer already one call ahead (back-to-back dispatches, as a dispatch-only benchmark runs
    them) cannot have its flag erased."""
    if PDL:  # nothing is touched before the previous grid finished
        pdl_wait()
        pdl_launch_dependents()
    pid = tl.program_id(0)
    err_host = err_host_addr.to(tl.pointer_type(tl.int32))
    epoch = tl.load(epoch_ptr + pid) + 1
    base = epoch * 65536                      # round r of this call signals base + r + 1
    offs_w = tl.arange(0, BLOCK_W)
    n_own, r_own = _rounds(T, pid, G, CHUNK, RT)
    for d in tl.static_range(W):              # released with round 0
        if d != RANK:
            tl.store(recv_T[d] + RANK, T)
    dead = _dead(err_dev, NT)
    n_in = tl.zeros([BLOCK_W], tl.int32)      # peers' token counts for this program
    r_in = tl.full([BLOCK_W], 1, tl.int32)    # peers' rounds (1 until round 0 told us)
    ce_in = offs_w < 0                        # CE_MIN: which peers copy their rows
    r = 0
    more = True
    if INTERLEAVE:
        while more:
            # wait for every peer's round r - 1, then own round r (send + expand) and the
            # peers' round r - 1 (expand) token by token, then signal own round r
            rr = r - 1
            if rr >= 0:
                need = (offs_w < W) & (offs_w != RANK) & (rr < r_in)
                dead = _wait_peers(flags[RANK] + pid * W, base + rr + 1, need, dead,
                                   err_dev, err_host, timeout_ns, 1, USE_TIMER, POSTED,
                                   BLOCK_W, NT)
                if (dead == 0) & (rr == 0):
                    n_in, r_in = _peer_rounds(recv_T[RANK], pid, RANK, W, G, CHUNK, BLOCK_W,
                                              NT, RT)
                    if CE_MIN > 0:
                        pm = (offs_w < W) & (offs_w != RANK)
                        ce_in = pm & (tl.load(recv_T[RANK] + tl.where(pm, offs_w, 0), mask=pm,
                                              other=0, volatile=True) >= CE_MIN)
            s0, jown = _span(r, n_own, CHUNK, RT)     # own round r: s0 + [0, jown)
            jown = tl.where(r < r_own, jown, 0)
            q0v, jin = _span(rr, n_in, CHUNK, RT)   # the peers' round rr: q0v + [0, jin)
            q0 = _of_peer(q0v, 1 - RANK, BLOCK_W, RT)   # the peer's (W == 2)
            jin = tl.where((rr >= 0) & (rr < r_in) & (dead == 0), jin, 0)
            if CE_MIN > 0:   # the rows of the peers' round rr, copied by their launchers
                if rr >= 0:
                    dead = _wait_peers(ce_flag[RANK] + rr * W, epoch, ce_in & (jin > 0), dead,
                                       err_dev, err_host, timeout_ns, 1, USE_TIMER, POSTED,
                                       BLOCK_W, NT)
                    jin = tl.where(dead == 0, jin, 0)
            # a round of one own tile (small batches): send it, signal, then expand it
            one = (jown >= 1) & (jown <= TB)
            nsteps = tl.maximum(jown, tl.max(jin, axis=0))
            # the fused one-token steps on 1-D rows (rounds of more than one token), an own
            # and a peer's token a step; where one side has more (the first round: own tokens
            # only, the last: the peer's only), the rest of the longer side two tokens a step,
            # the first half of that rest with the second
            TOK: tl.constexpr = FUSE & (W == 2) & (TB == 1)
            tok = (nsteps > 1) & (one == 0)
            jp = tl.sum(tl.where(offs_w == 1 - RANK, jin, 0), axis=0)
            both = tl.minimum(jown, jp)                        # steps with a token of each side
            half = tl.cdiv(tl.maximum(jown, jp) - both, 2)     # steps of the longer side's rest
            CLAIM: tl.constexpr = (CLAIM_RB > 0) & TOK
            if CLAIM:
                if tok:   # the slots of every token of the round's steps, own and the peer's
                    offs_c = tl.arange(0, CLAIM_RB)
                    tc = tl.cast(pid + (s0 + offs_c) * G, tl.int64)
                    _claim_round(tc, offs_c < jown, ids_ptr, RANK * M + tc, cursor, slot_map,
                                 RANK, L, K, E, CAP, BLOCK_K)
                    tc = (1 - RANK) * M + tl.cast(pid + (q0 + offs_c) * G, tl.int64)
                    _claim_round(tc, offs_c < jp, recv_ids[RANK], tc, cursor, slot_map, RANK,
                                 L, K, E, CAP, BLOCK_K)
                    tl.debug_barrier()   # the slot-map rows, written, are read by every thread
            if TOK:
                if tok:
                    nsteps = both + half
            for jj in range(0, nsteps, TB):
                tokstep = jj < 0
                if TOK:
                    tokstep = tok
                if tokstep:
                    if (jj >= both) & (jown > jp):   # two own tokens
                        _dispatch_two_tokens(tl.cast(pid + (s0 + jj) * G, tl.int64), jj < jown,
                                             tl.cast(pid + (s0 + jj + half) * G, tl.int64),
                                             jj + half < jown, 0, 0, x_ptr, ids_ptr, w_ptr,
                                             recv_x, recv_ids, recv_w, expert_x, cursor,
                                             slot_map, RANK, M, H, K, L, E, CAP, BLOCK_H,
                                             BLOCK_K, CLAIM, CE)
                    elif (jj >= both) & (jp > jown):   # two of the peer's tokens
                        _dispatch_two_tokens(tl.cast(pid + (q0 + jj) * G, tl.int64), jj < jp,
                                             tl.cast(pid + (q0 + jj + half) * G, tl.int64),
                                             jj + half < jp, 1, 1, x_ptr, ids_ptr, w_ptr,
                                             recv_x, recv_ids, recv_w, expert_x, cursor,
                                             slot_map, RANK, M, H, K, L, E, CAP, BLOCK_H,
                                             BLOCK_K, CLAIM, CE)
                    else:   # own + the peer's
                        _dispatch_two_tokens(tl.cast(pid + (s0 + jj) * G, tl.int64), jj < jown,
                                             tl.cast(pid + (q0 + jj) * G, tl.int64), jj < jp,
                                             0, 1, x_ptr, ids_ptr, w_ptr, recv_x, recv_ids,
                                             recv_w, expert_x, cursor, slot_map, RANK, M, H, K,
                                             L, E, CAP, BLOCK_H, BLOCK_K, CLAIM, CE)
                else:
                    if jj < jown:
                        t64, vt = _tile(s0 + jj, s0 + jown, pid, G, TB)
                        if one:
                            row, ids = _send_tile(t64, vt, x_ptr, ids_ptr, w_ptr, recv_x, recv_ids,
                                                  recv_w, RANK, W, M, H, K, L, E, BLOCK_H, BLOCK_K,
                                                  CE)
                            _signal_peers(flags, pid, base + r + 1, RANK, W, POSTED, NT)
                            _expand_tile(row, ids, vt, RANK, t64, expert_x, cursor, slot_map, RANK,
                                         M, H, K, L, CAP, BLOCK_H, BLOCK_K)
                        elif FUSE & (W == 2):   # the peer's tile in the same step
                            js = tl.sum(tl.where(offs_w == 1 - RANK, jin, 0), axis=0)
                            tr64, vr = _tile(q0 + jj, q0 + js, pid, G, TB)
                            _dispatch_pair_step(t64, vt, tr64, vr, x_ptr, ids_ptr, w_ptr, recv_x,
                                                recv_ids, recv_w, expert_x, cursor, slot_map, RANK,
                                                M, H, K, L, E, CAP, BLOCK_H, BLOCK_K, CE)
                        else:
                            _send_expand_tile(t64, vt, x_ptr, ids_ptr, w_ptr, recv_x, recv_ids,
                                              recv_w, expert_x, cursor, slot_map, RANK, W, M, H, K,
                                              L, E, CAP, BLOCK_H, BLOCK_K, CE)
                    fused = jj < 0   # whether the step above took the peer's tile too
                    if FUSE & (W == 2):
                        fused = (jj < jown) & (jown > TB)
                    for s in tl.static_range(W):
                        if s != RANK:
                            js = tl.sum(tl.where(offs_w == s, jin, 0), axis=0)
                            if (jj < js) & (fused == 0):
                                qs = _of_peer(q0v, s, BLOCK_W, RT)
                                t64, vt = _tile(qs + jj, qs + js, pid, G, TB)
                                _recv_tile(s, t64, vt, recv_x, recv_ids, expert_x, cursor, slot_map,
                                           RANK, M, H, K, L, CAP, BLOCK_H, BLOCK_K)
            if (r < r_own) & ((jown < 1) | (jown > TB)):   # (a round without tokens too)
                _signal_peers(flags, pid, base + r + 1, RANK, W, POSTED, NT)
            r += 1
            more = (r < r_own) | (r - 1 < tl.max(tl.where(dead == 0, r_in, 0), axis=0))
    else:
        while more:
            # send own round r (tokens pid + j*G, j in [r*CHUNK, r*CHUNK + CHUNK)), then signal it
            if r < r_own:
                jend = tl.minimum(r * CHUNK + CHUNK, n_own)
                for j in range(r * CHUNK, jend, TB):
                    t64, vt = _tile(j, jend, pid, G, TB)
                    _send_tile(t64, vt, x_ptr, ids_ptr, w_ptr, recv_x, recv_ids, recv_w, RANK, W,
                               M, H, K, L, E, BLOCK_H, BLOCK_K)
                _signal_peers(flags, pid, base + r + 1, RANK, W, POSTED, NT)
                for j in range(r * CHUNK, jend, TB):
                    t64, vt = _tile(j, jend, pid, G, TB)
                    _copy_own_tile(t64, vt, x_ptr, ids_ptr, w_ptr, expert_x, cursor, slot_map, RANK,
                                   M, H, K, L, E, CAP, BLOCK_H, BLOCK_K)
            # receive every peer's round r - 1 while our round r is on the wire
            rr = r - 1
            if rr >= 0:
                # every peer with a round rr at once (round 0 also brings its count, hence rounds)
                need = (offs_w < W) & (offs_w != RANK) & (rr < r_in)
                dead = _wait_peers(flags[RANK] + pid * W, base + rr + 1, need, dead, err_dev,
                                   err_host, timeout_ns, 1, USE_TIMER, POSTED, BLOCK_W, NT)
                if dead == 0:
                    if rr == 0:
                        n_in, r_in = _peer_rounds(recv_T[RANK], pid, RANK, W, G, CHUNK,
                                                  BLOCK_W, NT, RT)
                    for s in tl.static_range(W):
                        if s != RANK:
                            rs = tl.sum(tl.where(offs_w == s, r_in, 0), axis=0)
                            if rr < rs:
                                ns = tl.sum(tl.where(offs_w == s, n_in, 0), axis=0)
                                jend = tl.minimum(rr * CHUNK + CHUNK, ns)
                                for j in range(rr * CHUNK, jend, TB):
                                    t64, vt = _tile(j, jend, pid, G, TB)
                                    _recv_tile(s, t64, vt, recv_x, recv_ids, expert_x, cursor,
                                               slot_map, RANK, M, H, K, L, CAP, BLOCK_H, BLOCK_K)
            r += 1
            more = (r < r_own) | (r - 1 < tl.max(tl.where(dead == 0, r_in, 0), axis=0))
    tl.store(epoch_ptr + pid, epoch)
    _publish_counts(done, cursor, counts, G, L, BLOCK_L, ce_next, epoch + 1, CE_MIN > 0)


@triton.jit
def ep_packed_offsets_kernel(ids_ptr, T, hist, hflag, hepoch, hsum, done, cursor, counts,
                             offsets, err_dev, err_host_addr, timeout_ns, RANK: tl.constexpr,
                             W: tl.constexpr, G: tl.constexpr, K: tl.constexpr,
                             L: tl.constexpr, E: tl.constexpr, CAP: tl.constexpr,
                             ALIGN: tl.constexpr, BT: tl.constexpr, BLOCK_K: tl.constexpr,
                             BLOCK_E: tl.constexpr,
                             BLOCK_L: tl.constexpr, BLOCK_W: tl.constexpr,
                             USE_TIMER: tl.constexpr, POSTED: tl.constexpr = False,
                             PDL: tl.constexpr = False, NT: tl.constexpr = 256):
    """The packed layout's offsets (``EPDispatcher(packed=True)``, protocol ``"flags"``),
    launched just before :func:`ep_dispatch_kernel`. In reference code (``hist_s`` the histogram
    of rank ``s``'s ``topk_ids`` over the ``E`` global experts, a repeated id of a token counted
    once; ``el`` a local expert index)::

        counts[el]  = sum(hist_s[RANK * L + el] for s in range(W))
        seg         = [ceil(c / ALIGN) * ALIGN for c in counts]
        offsets     = [0, *cumsum(seg)]             # [L + 1]: expert el's rows of expert_x are
                                                    #   offsets[el] : offsets[el] + counts[el]
        cursor[el]  = offsets[el] - el * CAP        # the flags dispatch claims slot = cursor++

    The dispatch kernel is unchanged: it places a row at ``el * CAP + slot``, which with these
    cursors is ``offsets[el] + i`` for its ``i``-th claim on ``el``, inside the expert's packed
    segment (its ``slot < CAP`` guard holds: ``offsets[el] + i < offsets[el] + counts[el] <=
    (el + 1) * CAP``, with ``CAP = W * M + ALIGN - 1``, ``EPConfig.slot_cap``). Its own
    ``counts`` (the cursors at the end, biased) go to a scratch buffer; these are the call's.
    The cursors must be 0 on entry (the previous dispatch's last program out reset them).

    ``G`` programs: program ``p`` counts tiles ``p, p + G, ...`` of ``BT`` tokens and adds its
    histogram into ``hsum [BLOCK_E]`` (local; one vector of relaxed atomics, its zero bins
    skipped); the last program out (``done``, acq_rel after a barrier: every program's adds are
    ordered before its increment) takes the sum by an atomic exchange that also resets
    ``hsum``, then trades slices with the peers: this rank's slice of rank ``d``'s experts into
    ``hist[d][par, RANK]`` (``[2, W, L]`` int32, ``par`` = the call's parity, so a peer one call
    ahead writes the other copy), released by ``hflag[d][RANK] = epoch`` (``hepoch``: this
    rank's call counter); then every peer's flag acquired, with the deadline (a missing rank is
    named, phase 1 = dispatch), and the outputs above written. (Session 31, loopback at 4096
    tokens: one program counting every tile cost ~137 us a dispatch, a row a program summed by
    the last one 11-13 us, this form 7-10 us.)"""
    if PDL:
        pdl_wait()
        pdl_launch_dependents()
    pid = tl.program_id(0)
    offs_k = tl.arange(0, BLOCK_K)
    offs_e = tl.arange(0, BLOCK_E)
    mk = offs_k < K
    h = tl.zeros([BLOCK_E], tl.int32)
    for t0 in range(pid * BT, T, G * BT):
        tok = t0 + tl.arange(0, BT)
        m2 = (tok < T)[:, None] & mk[None, :]
        ids = tl.load(ids_ptr + tl.cast(tok, tl.int64)[:, None] * K + offs_k[None, :], mask=m2,
                      other=-1).to(tl.int32)
        ids = tl.where(m2 & (ids >= 0) & (ids < E), ids, -1)
        same = (ids[:, :, None] == ids[:, None, :]) & mk[None, None, :]
        first = tl.min(tl.where(same, offs_k[None, None, :], BLOCK_K), axis=2)
        new = (ids >= 0) & (first == offs_k[None, :])
        h += tl.histogram(tl.reshape(tl.where(new, ids, 0), [BT * BLOCK_K]), BLOCK_E,
                          mask=tl.reshape(new, [BT * BLOCK_K]))
    tl.atomic_add(hsum + offs_e, h, mask=h != 0, sem="relaxed", scope="gpu")
    tl.debug_barrier()
    prev = tl.atomic_add(done, 1, sem="acq_rel", scope="gpu")
    if prev == G - 1:   # the last program out: every program's histogram is in hsum
        tl.debug_barrier()
        h = tl.atomic_xchg(hsum + offs_e, tl.zeros([BLOCK_E], tl.int32), sem="relaxed",
                           scope="gpu")
        tl.store(done, 0)
        err_host = err_host_addr.to(tl.pointer_type(tl.int32))
        epoch = tl.load(hepoch) + 1
        par = epoch % 2
        for d in tl.static_range(W):   # rank d's slice, own included (no flag for that one)
            tl.store(hist[d] + (par * W + RANK) * L + (offs_e - d * L), h,
                     mask=(offs_e >= d * L) & (offs_e < d * L + L))
        tl.debug_barrier()
        for d in tl.static_range(W):
            if d != RANK:
                _flag_signal(hflag[d] + RANK, epoch, POSTED, NT)
        offs_w = tl.arange(0, BLOCK_W)
        dead = _wait_peers(hflag[RANK], epoch, (offs_w < W) & (offs_w != RANK),
                           _dead(err_dev, NT), err_dev, err_host, timeout_ns, 1, USE_TIMER,
                           POSTED, BLOCK_W, NT)
        offs_l = tl.arange(0, BLOCK_L)
        ml = offs_l < L
        src = hist[RANK] + (par * W + offs_w[:, None]) * L + offs_l[None, :]
        got = tl.load(src, mask=(offs_w < W)[:, None] & ml[None, :], other=0, volatile=True)
        got = tl.where(dead == 0, got, 0)   # a missing peer: zeros (the error is raised anyway)
        cnt = tl.sum(got, axis=0)
        seg = (cnt + (ALIGN - 1)) // ALIGN * ALIGN
        end = tl.cumsum(seg, axis=0)
        tl.store(counts + offs_l, cnt, mask=ml)
        tl.store(offsets + 1 + offs_l, end, mask=ml)
        tl.store(offsets + offs_l, tl.zeros([BLOCK_L], tl.int32), mask=offs_l == 0)
        tl.store(cursor + offs_l, end - seg - offs_l * CAP, mask=ml)
        tl.store(hepoch, epoch)


@triton.jit
def _partial_tile(expert_out, sm, wv, col0, H: tl.constexpr, K: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """[TB, BLOCK_C] fp32: ``sum_k wv[:, k] * expert_out[sm[:, k], col0:col0 + BLOCK_C]``, k
    ascending, entries with ``sm < 0`` skipped. Masked loads (no branch per k), so the K row
    loads overlap; a skipped entry leaves the sum untouched (bitwise the same as skipping it)."""
    offs_h = col0 + tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([sm.shape[0], BLOCK_C], tl.float32)
    for k in tl.static_range(K):
        e = tl.max(tl.where(offs_k[None, :] == k, sm, -1), axis=1)
        wk = tl.sum(tl.where(offs_k[None, :] == k, wv, 0.0), axis=1)
        ok = e >= 0
        v = tl.load(expert_out + tl.cast(tl.maximum(e, 0), tl.int64)[:, None] * H
                    + offs_h[None, :], mask=ok[:, None] & (offs_h < H)[None, :], other=0.0)
        acc = tl.where(ok[:, None], acc + wk[:, None] * v.to(tl.float32), acc)
    return acc


@triton.jit
def _combine_pair_step(tp64, vp, to64, vo, expert_out, ids_ptr, w_ptr, y_ptr, recv_w, comb,
                       slot_map, RANK: tl.constexpr, M: tl.constexpr, H: tl.constexpr,
                       K: tl.constexpr, L: tl.constexpr, E: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """``FUSE`` (two ranks): the peer's tokens ``tp64`` pushed as in :func:`_push_tile` and own
    tokens ``to64`` (the peer's partials already acquired) finished as in :func:`_own_part` +
    :func:`_finish_tile`, in one step: both tiles' slots and weights, then both tiles' K expert
    rows (and the peer's partial, loaded whatever the token's owners: an unsent row is never
    added) in flight together. The same sums in the same order as the separate functions.
    Two fp32 row accumulators: at hidden 7168 and 16 warps this step lost to the separate
    functions (session 7), in column chunks too (session 8); the 1-D one-token step
    (:func:`_combine_two_tokens`) is what runs there."""
    offs_k = tl.arange(0, BLOCK_K)
    mk = offs_k < K
    s: tl.constexpr = 1 - RANK
    mp = vp[:, None] & mk[None, :]
    mo = vo[:, None] & mk[None, :]
    rp = (s * M + tp64)[:, None] * K + offs_k[None, :]
    smp = tl.load(slot_map + rp, mask=mp, other=-1)
    wvp = tl.load(recv_w[RANK] + rp, mask=mp, other=0.0, cache_modifier=".cg")
    ids = tl.load(ids_ptr + to64[:, None] * K + offs_k[None, :], mask=mo, other=-1).to(tl.int32)
    smo = tl.load(slot_map + (RANK * M + to64)[:, None] * K + offs_k[None, :], mask=mo, other=-1)
    wvo = tl.load(w_ptr + to64[:, None] * K + offs_k[None, :], mask=mo, other=0.0).to(tl.float32)
    has = vp & (tl.max(smp, axis=1) >= 0)
    ids = tl.where(mo & (ids >= 0) & (ids < E), ids, -1)
    from_s = vo & (tl.sum((tl.where(ids >= 0, ids // L, -1) == s).to(tl.int32), axis=1) > 0)
    offs_h = tl.arange(0, BLOCK_H)
    mh = offs_h < H
    cv = tl.load(comb[RANK] + (s * M + to64)[:, None] * H + offs_h[None, :],
                 mask=vo[:, None] & mh[None, :], other=0.0, cache_modifier=".cg")
    accp = tl.zeros([tp64.shape[0], BLOCK_H], tl.float32)
    acco = tl.zeros([to64.shape[0], BLOCK_H], tl.float32)
    for k in tl.static_range(K):
        ep = tl.max(tl.where(offs_k[None, :] == k, smp, -1), axis=1)
        wp = tl.sum(tl.where(offs_k[None, :] == k, wvp, 0.0), axis=1)
        eo = tl.max(tl.where(offs_k[None, :] == k, smo, -1), axis=1)
        wo = tl.sum(tl.where(offs_k[None, :] == k, wvo, 0.0), axis=1)
        xp = tl.load(expert_out + tl.cast(tl.maximum(ep, 0), tl.int64)[:, None] * H
                     + offs_h[None, :], mask=(ep >= 0)[:, None] & mh[None, :], other=0.0)
        xo = tl.load(expert_out + tl.cast(tl.maximum(eo, 0), tl.int64)[:, None] * H
                     + offs_h[None, :], mask=(eo >= 0)[:, None] & mh[None, :], other=0.0)
        accp = tl.where((ep >= 0)[:, None], accp + wp[:, None] * xp.to(tl.float32), accp)
        acco = tl.where((eo >= 0)[:, None], acco + wo[:, None] * xo.to(tl.float32), acco)
    tl.store(comb[s] + (RANK * M + tp64)[:, None] * H + offs_h[None, :],
             accp.to(comb[s].dtype.element_ty), mask=has[:, None] & mh[None, :])
    part_s = tl.where(from_s[:, None], cv.to(tl.float32), 0.0)
    y = tl.zeros([to64.shape[0], BLOCK_H], tl.float32)   # as _finish_tile: ranks in order
    if RANK == 0:
        y = (y + acco) + part_s
    else:
        y = (y + part_s) + acco
    tl.store(y_ptr + to64[:, None] * H + offs_h[None, :], y.to(y_ptr.dtype.element_ty),
             mask=vo[:, None] & mh[None, :])


@triton.jit
def _ctok_partial(t, v, KIND: tl.constexpr, expert_out, ids_ptr, w_ptr, recv_w, slot_map,
                  RANK: tl.constexpr, M: tl.constexpr, H: tl.constexpr, K: tl.constexpr,
                  L: tl.constexpr, E: tl.constexpr, BLOCK_H: tl.constexpr):
    """One token of a one-token combine step: ``(acc, flag)``. ``KIND`` 0 (push): the peer's
    token ``t``, ``acc`` its partial over our experts (weights from ``recv_w``), ``flag``
    whether it has a local expert; 1 (finish): the own token ``t``, ``acc`` its partial over
    our experts, ``flag`` whether one of its experts is the peer's. Scalar slot / weight / id
    loads, K row loads in flight."""
    offs_h = tl.arange(0, BLOCK_H)   # row masks: offs_h < (H if present else 0), one
    # comparison with a scalar (the interpreter rejects a bool vector & a bool scalar)
    s: tl.constexpr = 1 - RANK
    src: tl.constexpr = s if KIND == 0 else RANK
    r = tl.where(v, (src * M + t) * K, 0)   # an absent token reads row 0, then ignores it
    rw = tl.where(v, t * K, 0)
    acc = tl.zeros([BLOCK_H], tl.float32)
    flag = t < -1           # scalar False
    for k in tl.static_range(K):
        e = tl.where(v, tl.load(slot_map + r + k), -1)
        if KIND == 0:
            wk = tl.load(recv_w[RANK] + r + k, cache_modifier=".cg")
        else:
            wk = tl.load(w_ptr + rw + k).to(tl.float32)
            ik = tl.where(v, tl.load(ids_ptr + rw + k), -1)
        x = tl.load(expert_out + tl.cast(tl.maximum(e, 0), tl.int64) * H + offs_h,
                    mask=offs_h < tl.where(e >= 0, H, 0), other=0.0)
        acc += wk * x.to(tl.float32)
        if KIND == 0:
            flag = flag | (e >= 0)
        else:
            flag = flag | ((ik >= 0) & (ik < E) & (ik // L == s))
    return acc, flag


@triton.jit
def _ctok_store(acc, flag, t, v, KIND: tl.constexpr, y_ptr, comb, RANK: tl.constexpr,
                M: tl.constexpr, H: tl.constexpr, BLOCK_H: tl.constexpr):
    """Push (``KIND`` 0: ``acc`` into the peer's ``comb`` row of ``t``, where ``flag``) or
    finish (1: ``y[t] = acc + `` the peer's partial of ``t``, where ``flag``)."""
    offs_h = tl.arange(0, BLOCK_H)
    s: tl.constexpr = 1 - RANK
    if KIND == 0:
        tl.store(comb[s] + (RANK * M + t) * H + offs_h, acc.to(comb[s].dtype.element_ty),
                 mask=offs_h < tl.where(flag, H, 0))
    else:
        cv = tl.load(comb[RANK] + (s * M + t) * H + offs_h, mask=offs_h < tl.where(flag, H, 0),
                     other=0.0, cache_modifier=".cg")
        tl.store(y_ptr + t * H + offs_h, (acc + cv.to(tl.float32)).to(y_ptr.dtype.element_ty),
                 mask=offs_h < tl.where(v, H, 0))


@triton.jit
def _combine_two_tokens(ta, va, tb, vb, KA: tl.constexpr, KB: tl.constexpr, expert_out,
                        ids_ptr, w_ptr, y_ptr, recv_w, comb, slot_map, RANK: tl.constexpr,
                        M: tl.constexpr, H: tl.constexpr, K: tl.constexpr, L: tl.constexpr,
                        E: tl.constexpr, BLOCK_H: tl.constexpr):
    """:func:`_combine_pair_step` for one-token tiles (``TB == 1``): two tokens ``ta``, ``tb``
    (int64 scalars, valid where ``va`` / ``vb``) of kinds ``KA``, ``KB`` (0: a peer's token to
    push, 1: an own token to finish; :func:`_ctok_partial`) on 1-D rows: both partials (2K row
    loads), then both stores. Session 8: the 2-D step of one-token tiles ran the combine at
    260-264 us (4096 tokens, hidden 7168), this one at 233-235; called from the floor
    benchmark's loop it moves the floor's bytes at the floor's speed (178-181 us). A round
    with tokens on one side only (the first pushes, the last finishes) takes two of them per
    step: a step costs about its latency whether it carries one token or two.

    Reference (fp32, k ascending; an entry without a local slot adds ``w * 0``, which leaves
    the sum bitwise unchanged but for the sign of a zero)::

        push   t: comb[1 - RANK][RANK, t] = sum_k recv_w[t, k] * expert_out[slot_map[peer, t, k]]
        finish t: y[t] = sum_k w[t, k] * expert_out[slot_map[RANK, t, k]]
                         + (comb[RANK][peer, t] if a top-k expert of t is the peer's else 0)
    """
    acc_a, f_a = _ctok_partial(ta, va, KA, expert_out, ids_ptr, w_ptr, recv_w, slot_map, RANK,
                               M, H, K, L, E, BLOCK_H)
    acc_b, f_b = _ctok_partial(tb, vb, KB, expert_out, ids_ptr, w_ptr, recv_w, slot_map, RANK,
                               M, H, K, L, E, BLOCK_H)
    _ctok_store(acc_a, f_a, ta, va, KA, y_ptr, comb, RANK, M, H, BLOCK_H)
    _ctok_store(acc_b, f_b, tb, vb, KB, y_ptr, comb, RANK, M, H, BLOCK_H)


@triton.jit
def _combine_pair_token(tp, vp, to, vo, expert_out, ids_ptr, w_ptr, y_ptr, recv_w, comb,
                        slot_map, RANK: tl.constexpr, M: tl.constexpr, H: tl.constexpr,
                        K: tl.constexpr, L: tl.constexpr, E: tl.constexpr,
                        BLOCK_H: tl.constexpr):
    """:func:`_combine_two_tokens` of the peer's token ``tp`` (push) and the own ``to``."""
    _combine_two_tokens(tp, vp, to, vo, 0, 1, expert_out, ids_ptr, w_ptr, y_ptr, recv_w, comb,
                        slot_map, RANK, M, H, K, L, E, BLOCK_H)


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
    acc = _partial_tile(expert_out, sm, wv, 0, H, K, BLOCK_H, BLOCK_K)
    has = vt & (tl.max(sm, axis=1) >= 0)
    dst = comb[s] + (RANK * M + t64)[:, None] * H + offs_h[None, :]
    tl.store(dst, acc.to(comb[s].dtype.element_ty), mask=has[:, None] & (offs_h < H)[None, :])


@triton.jit
def _own_part(t64, vt, expert_out, ids_ptr, w_ptr, slot_map, RANK: tl.constexpr,
              M: tl.constexpr, H: tl.constexpr, K: tl.constexpr, L: tl.constexpr,
              E: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """Own tokens ``t64``: ``(part, owner)``, the partial sum of their rows in our own experts
    (fp32, [TB, BLOCK_H]) and the rank owning each of their top-k experts ([TB, BLOCK_K]).
    Local data only, so it can be computed before the peers' partials arrive."""
    offs_k = tl.arange(0, BLOCK_K)
    m2 = vt[:, None] & (offs_k < K)[None, :]
    ids = tl.load(ids_ptr + t64[:, None] * K + offs_k[None, :], mask=m2, other=-1).to(tl.int32)
    ids = tl.where(m2 & (ids >= 0) & (ids < E), ids, -1)
    sm = tl.load(slot_map + (RANK * M + t64)[:, None] * K + offs_k[None, :], mask=m2, other=-1)
    wv = tl.load(w_ptr + t64[:, None] * K + offs_k[None, :], mask=m2, other=0.0).to(tl.float32)
    return _partial_tile(expert_out, sm, wv, 0, H, K, BLOCK_H, BLOCK_K), \
        tl.where(ids >= 0, ids // L, -1)


@triton.jit
def _finish_tile(part, owner, t64, vt, y_ptr, comb, RANK: tl.constexpr, W: tl.constexpr,
                 M: tl.constexpr, H: tl.constexpr, BLOCK_H: tl.constexpr):
    """Own tokens ``t64``: ``y = sum over ranks d in order`` of the own partial ``part`` or
    ``comb[RANK][d, t]`` (already acquired)."""
    offs_h = tl.arange(0, BLOCK_H)
    mh = (offs_h < H)[None, :]
    acc = tl.zeros([t64.shape[0], BLOCK_H], tl.float32)
    for d in tl.static_range(W):
        if d == RANK:
            acc += part
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
                      NT: tl.constexpr = 256, INTERLEAVE: tl.constexpr = False,
                      FUSE: tl.constexpr = False, RT: tl.constexpr = False):
    """Flags combine; see the module docstring (``INTERLEAVE``: its own section there).
    With ``FUSE``, two ranks and one-token tiles, the fused steps run on 1-D rows
    (:func:`_combine_two_tokens`), and a round with tokens on one side only takes two of them
    per step."""
    if PDL:  # nothing is touched before the previous grid finished
        pdl_wait()
        pdl_launch_dependents()
    pid = tl.program_id(0)
    err_host = err_host_addr.to(tl.pointer_type(tl.int32))
    epoch = tl.load(epoch_ptr + pid) + 1
    base = epoch * 65536
    offs_w = tl.arange(0, BLOCK_W)
    dead = _dead(err_dev, NT)
    n_own, r_own = _rounds(T, pid, G, CHUNK, RT)
    # the peers' token counts (written by the dispatch, so read before any of this call's signals)
    n_in, r_in = _peer_rounds(recv_T[RANK], pid, RANK, W, G, CHUNK, BLOCK_W, NT, RT)
    r = 0
    more = True
    if INTERLEAVE:
        while more:
            # wait for every peer's partials of own round r - 1, then push the peers' round
            # r and finish own round r - 1 token by token, then signal round r to every
            # peer. An own round of one tile (small batches) keeps the order of the other
            # loop: push, signal, then its own partial, the wait and the finish.
            rr = r - 1
            fin = (rr >= 0) & (rr < r_own)
            q0, jown = _span(rr, n_own, CHUNK, RT)   # own round rr: q0 + [0, jown)
            jown = tl.where(fin, jown, 0)
            s0v, jin = _span(r, n_in, CHUNK, RT)    # the peers' round r: s0v + [0, jin)
            s0 = _of_peer(s0v, 1 - RANK, BLOCK_W, RT)   # the peer's (W == 2)
            jin = tl.where((r < r_in) & (dead == 0), jin, 0)
            many = jown > TB
            if fin & many:
                dead = _wait_peers(flags[RANK] + pid * W, base + rr + 1,
                                   (offs_w < W) & (offs_w != RANK), dead, err_dev, err_host,
                                   timeout_ns, 2, USE_TIMER, POSTED, BLOCK_W, NT)
                tl.debug_barrier()
            nsteps = tl.maximum(tl.where(many, jown, 0), tl.max(jin, axis=0))
            TOK: tl.constexpr = FUSE & (W == 2) & (TB == 1)
            # a push and a finish a step; where one side has more (the first round: pushes
            # only, the last: finishes only), the rest of the longer side two tokens a step,
            # the first half of that rest with the second
            np_ = tl.sum(tl.where(offs_w == 1 - RANK, jin, 0), axis=0)
            no_ = tl.where(many, jown, 0)
            both = tl.minimum(np_, no_)                     # steps with a push and a finish
            half = tl.cdiv(tl.maximum(np_, no_) - both, 2)  # steps of the longer side's rest
            big = nsteps > 1   # rounds of several tokens (more than one token per program)
            if TOK:
                if big:
                    nsteps = both + half
            for jj in range(0, nsteps, TB):
                fused = jj < 0   # both tiles in one step (FUSE, two ranks)
                if FUSE & (W == 2):
                    fused = many & (jj < jown)
                    if TOK:
                        # every step of a round of several tokens (a token may be absent); one
                        # token per program (small batches): the separate steps, as before
                        # session 8 (the token step cost 1.5-3 us at 8-128 tokens)
                        fused = big
                if fused:
                    js = tl.sum(tl.where(offs_w == 1 - RANK, jin, 0), axis=0)
                    if TOK:   # 1-D rows (session 8)
                        if (jj >= both) & (np_ > no_):   # two of the peer's tokens
                            _combine_two_tokens(tl.cast(pid + (s0 + jj) * G, tl.int64), jj < np_,
                                                tl.cast(pid + (s0 + jj + half) * G, tl.int64),
                                                jj + half < np_, 0, 0, expert_out, ids_ptr,
                                                w_ptr, y_ptr, recv_w, comb, slot_map, RANK, M,
                                                H, K, L, E, BLOCK_H)
                        elif (jj >= both) & (no_ > np_):   # two own tokens
                            _combine_two_tokens(tl.cast(pid + (q0 + jj) * G, tl.int64), jj < no_,
                                                tl.cast(pid + (q0 + jj + half) * G, tl.int64),
                                                jj + half < no_, 1, 1, expert_out, ids_ptr,
                                                w_ptr, y_ptr, recv_w, comb, slot_map, RANK, M,
                                                H, K, L, E, BLOCK_H)
                        else:
                            _combine_two_tokens(tl.cast(pid + (s0 + jj) * G, tl.int64), jj < js,
                                                tl.cast(pid + (q0 + jj) * G, tl.int64),
                                                many & (jj < jown), 0, 1, expert_out, ids_ptr,
                                                w_ptr, y_ptr, recv_w, comb, slot_map, RANK, M,
                                                H, K, L, E, BLOCK_H)
                    else:
                        tp64, vp = _tile(s0 + jj, s0 + js, pid, G, TB)
                        to64, vo = _tile(q0 + jj, q0 + jown, pid, G, TB)
                        _combine_pair_step(tp64, vp, to64, vo, expert_out, ids_ptr, w_ptr,
                                           y_ptr, recv_w, comb, slot_map, RANK, M, H, K, L, E,
                                           BLOCK_H, BLOCK_K)
                for s in tl.static_range(W):
                    if s != RANK:
                        js = tl.sum(tl.where(offs_w == s, jin, 0), axis=0)
                        if (jj < js) & (fused == 0):
                            ss = _of_peer(s0v, s, BLOCK_W, RT)
                            t64, vt = _tile(ss + jj, ss + js, pid, G, TB)
                            _push_tile(s, t64, vt, expert_out, recv_w, comb, slot_map, RANK,
                                       M, H, K, BLOCK_H, BLOCK_K)
                if many & (jj < jown) & (fused == 0):
                    t64, vt = _tile(q0 + jj, q0 + jown, pid, G, TB)
                    part, owner = _own_part(t64, vt, expert_out, ids_ptr, w_ptr, slot_map,
                                            RANK, M, H, K, L, E, BLOCK_H, BLOCK_K)
                    _finish_tile(part, owner, t64, vt, y_ptr, comb, RANK, W, M, H, BLOCK_H)
            if tl.max(tl.where(r < r_in, 1, 0), axis=0) > 0:
                tl.debug_barrier()
                for s in tl.static_range(W):
                    if s != RANK:
                        if tl.sum(tl.where(offs_w == s, r_in, 0), axis=0) > r:
                            _flag_signal(flags[s] + pid * W + RANK, base + r + 1, POSTED, NT)
            if fin & (jown <= TB):
                t64, vt = _tile(q0, q0 + jown, pid, G, TB)
                part, owner = _own_part(t64, vt, expert_out, ids_ptr, w_ptr, slot_map, RANK, M,
                                        H, K, L, E, BLOCK_H, BLOCK_K)
                dead = _wait_peers(flags[RANK] + pid * W, base + rr + 1,
                                   (offs_w < W) & (offs_w != RANK), dead, err_dev, err_host,
                                   timeout_ns, 2, USE_TIMER, POSTED, BLOCK_W, NT)
                tl.debug_barrier()
                _finish_tile(part, owner, t64, vt, y_ptr, comb, RANK, W, M, H, BLOCK_H)
            r += 1
            more = (r - 1 < r_own) | (r < tl.max(r_in, axis=0))
    else:
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
                j0 = rr * CHUNK
                jend = tl.minimum(j0 + CHUNK, n_own)
                # a round of one tile (every small batch): its own partial overlaps the wait
                t64, vt = _tile(j0, jend, pid, G, TB)
                part, owner = _own_part(t64, vt, expert_out, ids_ptr, w_ptr, slot_map, RANK, M, H,
                                        K, L, E, BLOCK_H, BLOCK_K)
                dead = _wait_peers(flags[RANK] + pid * W, base + rr + 1,
                                   (offs_w < W) & (offs_w != RANK), dead, err_dev, err_host,
                                   timeout_ns, 2, USE_TIMER, POSTED, BLOCK_W, NT)
                tl.debug_barrier()
                _finish_tile(part, owner, t64, vt, y_ptr, comb, RANK, W, M, H, BLOCK_H)
                for j in range(j0 + TB, jend, TB):
                    t64, vt = _tile(j, jend, pid, G, TB)
                    part, owner = _own_part(t64, vt, expert_out, ids_ptr, w_ptr, slot_map, RANK,
                                            M, H, K, L, E, BLOCK_H, BLOCK_K)
                    _finish_tile(part, owner, t64, vt, y_ptr, comb, RANK, W, M, H, BLOCK_H)
            r += 1
            more = (r - 1 < r_own) | (r < tl.max(r_in, axis=0))
    tl.store(epoch_ptr + pid, epoch)


@triton.jit
def _combine_run(q, j0, jend, KIND: tl.constexpr, PAIR: tl.constexpr, G: tl.constexpr,
                 expert_out, ids_ptr, w_ptr, y_ptr, recv_w, comb, slot_map, RANK: tl.constexpr,
                 M: tl.constexpr, H: tl.constexpr, K: tl.constexpr, L: tl.constexpr,
                 E: tl.constexpr, BLOCK_H: tl.constexpr):
    """Tokens ``q + j*G`` for ``j0 <= j < jend``, all of kind ``KIND`` (0: the peer's, pushed;
    1: own, finished), ``PAIR`` (1 or 2) a step, each step a :func:`_combine_two_tokens` (with
    ``PAIR == 1`` its second token is masked off: only its scalar slot / weight loads remain).
    Session 12 (loopback, 4096 tokens, 33 programs a role): 387-388 us in this form under
    the 128-register cap (``P2PBackend._roles_consts``), 389-390 with the one-token halves
    (:func:`_ctok_partial` then :func:`_ctok_store`) under the cap, 469 with this step and no
    cap, 501 with neither: the cap is what matters; this is the form session 11 measured."""
    for j in range(j0, jend, PAIR):
        _combine_two_tokens(tl.cast(q + j * G, tl.int64), j < jend,
                            tl.cast(q + (j + 1) * G, tl.int64), (j + 1 < jend) & (PAIR == 2),
                            KIND, KIND, expert_out, ids_ptr, w_ptr, y_ptr, recv_w, comb,
                            slot_map, RANK, M, H, K, L, E, BLOCK_H)


@triton.jit
def ep_combine_roles_kernel(expert_out, ids_ptr, w_ptr, y_ptr, T,
                            recv_w, recv_T, comb, flags, slot_map, epoch_ptr, err_dev,
                            err_host_addr, timeout_ns,
                            RANK: tl.constexpr, W: tl.constexpr, G: tl.constexpr,
                            M: tl.constexpr, H: tl.constexpr, K: tl.constexpr,
                            L: tl.constexpr, E: tl.constexpr, BLOCK_H: tl.constexpr,
                            BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr, CHUNK: tl.constexpr,
                            USE_TIMER: tl.constexpr, POSTED: tl.constexpr = False,
                            PDL: tl.constexpr = False, NT: tl.constexpr = 256,
                            PAIR: tl.constexpr = 2):
    """Flags combine with the two roles in separate programs (``P2PBackend(_combine_roles=
    True)``, two ranks, an A/B candidate): a grid of ``2 * G``. Program ``q < G`` *pushes*: for
    each round r of the peer's tokens ``q + j*G`` (the peer's count, ``CHUNK`` a round), the
    partial over our experts into the peer's ``comb``, ``PAIR`` (1 or 2) tokens a step, then a
    barrier and the round's release flag. Program ``G + q`` *finishes*: for each own round r,
    waits for the peer's flag of round r, then ``y`` of those tokens, ``PAIR`` a step. Same
    arithmetic as :func:`_combine_two_tokens` (its reference), so the output is bitwise the
    interleaved kernel's.

    Why: in the interleaved kernel one program does both, so every round's release (which
    drains the program's NVLink writes) and wait stall both halves of its work, and its first
    iteration only pushes (NVLink, HBM idle) and its last only finishes. Here a pusher never
    waits and a finisher never releases, and the SMs pushing (NVLink) and those finishing (HBM)
    overlap without a schedule. Session 11 (loopback, one GPU, docs/moe_sessions.md): 16 warps,
    one token a step as fast as the interleaved combine (4096 tokens 387.0 vs 386.6 us); at 8
    warps, two tokens a step and two programs an SM, half as fast (register pressure).
    Pushers never wait, so a finisher spinning on an SM cannot hold up any pusher of its own
    GPU's grid; a peer's pushers are on the peer's GPU (loopback: size the grid so that every
    program is resident). Epochs: ``epoch_ptr`` has ``2 * G`` entries (one per program)."""
    if PDL:  # nothing is touched before the previous grid finished
        pdl_wait()
        pdl_launch_dependents()
    pid = tl.program_id(0)
    q = pid % G
    err_host = err_host_addr.to(tl.pointer_type(tl.int32))
    epoch = tl.load(epoch_ptr + pid) + 1
    base = epoch * 65536
    offs_w = tl.arange(0, BLOCK_W)
    s: tl.constexpr = 1 - RANK
    if pid < G:
        n_in, r_in = _peer_rounds(recv_T[RANK], q, RANK, W, G, CHUNK, BLOCK_W, NT)
        ns = tl.sum(tl.where(offs_w == s, n_in, 0), axis=0)
        rs = tl.sum(tl.where(offs_w == s, r_in, 0), axis=0)
        for r in range(0, rs):
            j0 = r * CHUNK
            jend = tl.minimum(j0 + CHUNK, ns)
            _combine_run(q, j0, jend, 0, PAIR, G, expert_out, ids_ptr, w_ptr, y_ptr, recv_w,
                         comb, slot_map, RANK, M, H, K, L, E, BLOCK_H)
            tl.debug_barrier()
            _flag_signal(flags[s] + q * W + RANK, base + r + 1, POSTED, NT)
    else:
        dead = _dead(err_dev, NT)
        n_own, r_own = _rounds(T, q, G, CHUNK)
        for r in range(0, r_own):
            dead = _wait_peers(flags[RANK] + q * W, base + r + 1,
                               (offs_w < W) & (offs_w != RANK), dead, err_dev, err_host,
                               timeout_ns, 2, USE_TIMER, POSTED, BLOCK_W, NT)
            tl.debug_barrier()
            j0 = r * CHUNK
            jend = tl.minimum(j0 + CHUNK, n_own)
            _combine_run(q, j0, jend, 1, PAIR, G, expert_out, ids_ptr, w_ptr, y_ptr, recv_w,
                         comb, slot_map, RANK, M, H, K, L, E, BLOCK_H)
    tl.store(epoch_ptr + pid, epoch)


# ---------------------------------------------------------------------------------------------
# protocol "lamport": the data carries its own arrival (no flags, no fences, no grid barrier)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _is_sent(v, BITS: tl.constexpr):
    """True where the bit pattern of ``v`` is the sentinel (sign bit only: -0.0 / INT_MIN)."""
    # exact bit-pattern equality (a shift test would depend on integer promotion rules)
    if BITS == 16:
        r = v.to(tl.int16, bitcast=True) == -32768
    elif BITS == 32:
        r = v.to(tl.int32, bitcast=True) == -2147483648
    else:
        r = v.to(tl.int64, bitcast=True) == (tl.full([], 1, tl.int64) << 63)
    return r


@triton.jit
def _sent_like(v, BITS: tl.constexpr):
    """A tensor of ``v``'s shape and dtype filled with the sentinel bit pattern."""
    if BITS == 16:
        s = tl.full(v.shape, -32768, tl.int16)
    elif BITS == 32:
        s = tl.full(v.shape, -2147483648, tl.int32)
    else:
        s = tl.full(v.shape, 1, tl.int64) << 63
    return s.to(v.dtype, bitcast=True)


@triton.jit
def _no_sentinel(v, cols, BITS: tl.constexpr, QW: tl.constexpr = 0):
    """``v`` (elements at row columns ``cols``, broadcast against ``v``) with the sentinel bit
    pattern (:func:`_is_sent`) rewritten, so that a sent value never reads as unwritten:

        QW == 0 (rows of values):   sentinel (-0.0) -> +0 (all bits clear)
        QW > 0 (an fp8 dispatch's wire rows, :mod:`llmcomm.moe.fp8`: columns < QW hold the
                fp8 bytes, the rest the float32 scales):
            column < QW:   sentinel -> +0: a (+0, -0) fp8 byte pair (or 4 bytes) -> all +0
            column >= QW:  sentinel -> sentinel + 1: in a 16-bit view the low half of a
                           positive scale, which becomes one ulp (2**-23 relative) larger
                           (own scales, powers of two, have zero low halves: only a caller's
                           own (q, scale) can meet this; a 32-bit one would be -0.0, no scale)

    Compared as integers, not as floats (session 33; the float compare ``v == 0`` before it
    would flush a denormal to zero where compares flush, and a bf16 "denormal" in a wire row
    is a pair of fp8 values)."""
    z = tl.zeros_like(v)
    if QW > 0:
        if BITS == 16:
            up = tl.full(v.shape, -32767, tl.int16).to(v.dtype, bitcast=True)
        else:
            up = tl.full(v.shape, -2147483647, tl.int32).to(v.dtype, bitcast=True)
        z = tl.where(cols < QW, z, up)
    return tl.where(_is_sent(v, BITS), z, v)


@triton.jit
def _lamport_send_tile(c, x_ptr, ids_ptr, w_ptr, T, buf, lx, lmeta, RANK: tl.constexpr,
                       W: tl.constexpr, M: tl.constexpr, H: tl.constexpr, K: tl.constexpr,
                       L: tl.constexpr, E: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_K: tl.constexpr, TB: tl.constexpr, BITS: tl.constexpr,
                       QW: tl.constexpr):
    """Own tokens ``[c*TB, c*TB+TB)`` (none when ``c*TB >= T``): meta to every peer, the row to
    peers owning one of its experts (``-0.0`` sent as ``+0.0``). Returns ``(row, ids, vt,
    t64)`` for the local copies, which the caller makes later (``QW`` > 0: the rows as sent,
    so that every rank's expert gets a token's wire row alike, :func:`_no_sentinel`)."""
    offs_h = tl.arange(0, BLOCK_H)
    mh = offs_h < H
    offs_k = tl.arange(0, BLOCK_K)
    t = c * TB + tl.arange(0, TB)
    vt = t < T
    t64 = tl.cast(t, tl.int64)
    m2, ids, w, row, owner = _own_tokens(t64, vt, x_ptr, ids_ptr, w_ptr, H, K, L, E, BLOCK_H,
                                         BLOCK_K)
    wbits = tl.where(w == 0, 0.0, w).to(tl.int32, bitcast=True)
    rowc = _no_sentinel(row, offs_h[None, :], BITS, QW)
    base = (buf * W + RANK) * M + t64
    for d in tl.static_range(W):
        if d != RANK:
            mp = lmeta[d] + base[:, None] * (2 * K) + offs_k[None, :]
            tl.store(mp, ids, mask=m2)
            tl.store(mp + K, wbits, mask=m2)
            to_d = vt & (tl.sum((owner == d).to(tl.int32), axis=1) > 0)
            tl.store(lx[d] + base[:, None] * H + offs_h[None, :], rowc,
                     mask=to_d[:, None] & mh[None, :])
    if QW > 0:
        row = rowc
    return row, ids, vt, t64


@triton.jit
def _lamport_poll_meta(cnt_ptr, need, ts_known, bound, mp, t, M: tl.constexpr,
                       K: tl.constexpr, BLOCK_K: tl.constexpr, NT: tl.constexpr):
    """One poll round of a received tile's count (when ``need``) and meta (tokens ``t < bound``).

    Returns (count, next bound, pending), all uniform over the program. Only the *decision* is
    taken from these loads: on a GPU the ``[TB, BLOCK_K]`` meta is replicated over many threads,
    every replica issues its own volatile load (and the compiler may duplicate the load into
    several layouts), so the copies a thread holds may still be the sentinel while the copy that
    was counted has landed. The caller re-reads the meta after a barrier (see
    :func:`_lamport_recv_tile`) and uses only that.
    """
    offs_k = tl.arange(0, BLOCK_K)
    mk = offs_k < K
    c_raw = load_uniform(cnt_ptr, need, 0, NT)  # branched on: must be uniform
    ml = (t < bound)[:, None] & mk[None, :]
    ids = tl.load(mp + offs_k[None, :], mask=ml, other=-1, volatile=True)
    wb = tl.load(mp + K + offs_k[None, :], mask=ml, other=0, volatile=True)
    cnt_pend = need & (c_raw == -2147483648)
    ts = tl.where(need, c_raw, ts_known)
    nbound = tl.where(cnt_pend, M, ts)   # bound >= every later bound
    m2 = (t < nbound)[:, None] & mk[None, :]
    meta_pend = tl.sum(tl.sum((m2 & ((ids == -2147483648) | (wb == -2147483648))).to(tl.int32),
                              axis=1), axis=0)
    pending = uniform(cnt_pend.to(tl.int32) + meta_pend, NT)
    return ts, nbound, pending


@triton.jit
def _lamport_wait_meta(cnt_ptr, need, ts_known, mp, t, s, dead, err_dev, err_host, timeout_ns,
                       M: tl.constexpr, K: tl.constexpr, BLOCK_K: tl.constexpr,
                       USE_TIMER: tl.constexpr, NT: tl.constexpr):
    """Poll (:func:`_lamport_poll_meta`) until the source's count (when ``need``) and the meta
    of tokens ``t`` below it have landed, or the deadline (the error record names source
    ``s``). Returns (count, dead), uniform over the program."""
    bound = tl.where(need, M, ts_known)
    ts, bound, pending = _lamport_poll_meta(cnt_ptr, need, ts_known, bound, mp, t, M, K,
                                            BLOCK_K, NT)
    t0 = tl.full([], 0, tl.int64)   # set at the first check: no clock read unless waiting
    spins = tl.full([], 0, tl.int64)
    while (pending > 0) & (dead == 0):
        ts, bound, pending = _lamport_poll_meta(cnt_ptr, need, ts_known, bound, mp, t, M, K,
                                                BLOCK_K, NT)
        spins += 1
        t0, dead = _spin_deadline(pending, spins, t0, dead, err_dev, err_host, timeout_ns, 1,
                                  s, USE_TIMER, NT)
    return ts, dead


@triton.jit
def _lamport_recv_tile(c, s, ts_known, dead, pid, buf, lx, lmeta, lcnt, expert_x, cursor,
                       slot_map, wloc, err_dev, err_host, timeout_ns, RANK: tl.constexpr,
                       W: tl.constexpr, G: tl.constexpr, M: tl.constexpr, H: tl.constexpr,
                       K: tl.constexpr, L: tl.constexpr, CAP: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, TB: tl.constexpr,
                       BITS: tl.constexpr, USE_TIMER: tl.constexpr, NT: tl.constexpr,
                       TSPIN: tl.constexpr = False):
    """Tokens ``[c*TB, c*TB+TB)`` of source ``s``: wait until they landed (deadline), reset the
    slots to the sentinel, expand into local experts. ``ts_known < 0``: the source's token
    count is not known yet and is polled (and reset) too. Returns (count, dead).

    1. poll count + meta until (uniformly) nothing is the sentinel; 2. barrier, re-read the meta
    (every copy now sees the landed values: a later read after a barrier cannot return an older
    value than one already observed), take ``mine`` from it and poll the rows of those tokens;
    3. barrier (every read done), reset, expand from the re-read values only."""
    offs_h = tl.arange(0, BLOCK_H)
    mh = offs_h < H
    offs_k = tl.arange(0, BLOCK_K)
    mk = offs_k < K
    t = c * TB + tl.arange(0, TB)
    t64 = tl.cast(t, tl.int64)
    need = ts_known < 0
    cnt_ptr = lcnt[RANK] + (buf * W + s) * G + pid
    base = (buf * W + s) * M + t64
    mp = lmeta[RANK] + base[:, None] * (2 * K)
    rp = lx[RANK] + base[:, None] * H
    ts, dead = _lamport_wait_meta(cnt_ptr, need, ts_known, mp, t, s, dead, err_dev, err_host,
                                  timeout_ns, M, K, BLOCK_K, USE_TIMER, NT)
    vt = t < ts
    m2 = vt[:, None] & mk[None, :]
    ids = tl.full([TB, BLOCK_K], -1, tl.int32)
    wb = tl.zeros([TB, BLOCK_K], tl.int32)
    mine = vt & False
    row = tl.zeros([TB, BLOCK_H], lx[RANK].dtype.element_ty)
    if dead == 0:
        tl.debug_barrier()   # every sample the decision came from precedes the re-read
        ids = tl.load(mp + offs_k[None, :], mask=m2, other=-1, volatile=True)
        wb = tl.load(mp + K + offs_k[None, :], mask=m2, other=0, volatile=True)
        owner = tl.where(ids >= 0, ids // L, -1)
        mine = vt & (tl.sum((owner == RANK).to(tl.int32), axis=1) > 0)
        row, dead = _poll_rows(rp + offs_h[None, :], mine[:, None] & mh[None, :], dead, s,
                               err_dev, err_host, timeout_ns, 1, BITS, USE_TIMER, NT, TSPIN)
        # (_poll_rows ends with a barrier: no reset below overtakes any thread's read)
    if dead == 0:
        if need:
            tl.store(cnt_ptr, -2147483648)
        tl.store(mp + offs_k[None, :], tl.full([TB, BLOCK_K], -2147483648, tl.int32), mask=m2)
        tl.store(mp + K + offs_k[None, :], tl.full([TB, BLOCK_K], -2147483648, tl.int32),
                 mask=m2)
        tl.store(rp + offs_h[None, :], _sent_like(row, BITS),
                 mask=mine[:, None] & mh[None, :])
        tl.store(wloc + (s * M + t64)[:, None] * K + offs_k[None, :],
                 wb.to(tl.float32, bitcast=True), mask=m2)
        _expand_tile(row, ids, vt, s, t64, expert_x, cursor, slot_map, RANK, M, H, K, L, CAP,
                     BLOCK_H, BLOCK_K)
    else:
        ts = ts * 0
    return ts, dead


@triton.jit
def _own_token(t, T, x_ptr, ids_ptr, w_ptr, H: tl.constexpr, K: tl.constexpr, E: tl.constexpr,
               BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BITS: tl.constexpr,
               QW: tl.constexpr):
    """Own token ``t`` on 1-D vectors (none when ``t >= T``): ``(row [BLOCK_H], ids [BLOCK_K]
    (-1 beyond ``K`` or out of range), w [BLOCK_K] fp32, valid, t as int64)``; ``QW`` > 0 (an
    fp8 wire row): the row as it is sent (:func:`_no_sentinel`), for the local copies too."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_K)
    valid = t < T
    ti = tl.cast(tl.where(valid, t, 0), tl.int64)
    kv = offs_k < tl.where(valid, K, 0)
    ids = tl.load(ids_ptr + ti * K + offs_k, mask=kv, other=-1).to(tl.int32)
    ids = tl.where(kv & (ids >= 0) & (ids < E), ids, -1)
    w = tl.load(w_ptr + ti * K + offs_k, mask=kv, other=0.0).to(tl.float32)
    row = tl.load(x_ptr + ti * H + offs_h, mask=offs_h < tl.where(valid, H, 0))
    if QW > 0:
        row = _no_sentinel(row, offs_h, BITS, QW)
    return row, ids, w, valid, ti


@triton.jit
def _lamport_send_token(row, ids, w, valid, ti, buf, lx, lmeta, RANK: tl.constexpr,
                        W: tl.constexpr, M: tl.constexpr, H: tl.constexpr, K: tl.constexpr,
                        L: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                        BITS: tl.constexpr, QW: tl.constexpr):
    """:func:`_lamport_send_tile` of a one-token tile on 1-D vectors (session 13): own token
    ``ti`` as :func:`_own_token` loaded it, its meta to every peer and its row to the peers
    owning one of its experts."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_K)
    kv = offs_k < tl.where(valid, K, 0)
    wbits = tl.where(w == 0, 0.0, w).to(tl.int32, bitcast=True)
    rowc = _no_sentinel(row, offs_h, BITS, QW)
    base = (buf * W + RANK) * M + ti
    for d in tl.static_range(W):
        if d != RANK:
            tl.store(lmeta[d] + base * (2 * K) + offs_k, ids, mask=kv)
            tl.store(lmeta[d] + base * (2 * K) + K + offs_k, wbits, mask=kv)
            to_d = tl.sum((tl.where(ids >= 0, ids // L, -1) == d).to(tl.int32), axis=0) > 0
            tl.store(lx[d] + base * H + offs_h, rowc, mask=offs_h < tl.where(to_d, H, 0))


@triton.jit
def _lamport_poll_token(cnt_ptr, need, ts_known, bound, mp1, rp, c, RANK: tl.constexpr,
                        M: tl.constexpr, H: tl.constexpr, K: tl.constexpr, L: tl.constexpr,
                        BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BITS: tl.constexpr,
                        USE_TIMER: tl.constexpr, NT: tl.constexpr, ROW: tl.constexpr = True):
    """One poll round of a one-token receive (token ``c`` of a source, while ``c < bound``):
    the count (when ``need``), the meta and the row loaded together, one round trip. The row
    counts only when the meta names a local expert. Returns (count, next bound, ids, weight
    bits, row, pending).

    ``pending`` is the largest over every thread of what that thread's own copies still miss
    (:func:`.sync.every_thread_max`; the meta is replicated over the threads, each copy its own
    volatile load): at ``pending == 0`` every value any thread holds has landed, so the caller
    uses them as they are -- no barrier and re-read as after :func:`_lamport_poll_meta`.
    ``ROW=False``: the row is loaded but left out of ``pending`` (the caller waits for it per
    thread, :func:`_recv_row_spin`)."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_h = tl.arange(0, BLOCK_H)
    # every thread its own copy of the count (a load_uniform is a reduction across the program
    # on every spin): nothing is decided on it before every thread's copy has landed
    # (pending, below), and then all copies hold the one value written (session 16)
    c_raw = tl.where(need, tl.load(cnt_ptr, volatile=True), 0)
    kv = offs_k < tl.where(c < bound, K, 0)
    ids = tl.load(mp1 + offs_k, mask=kv, other=-1, volatile=True)
    wb = tl.load(mp1 + K + offs_k, mask=kv, other=0, volatile=True)
    row = tl.load(rp + offs_h, mask=offs_h < tl.where(c < bound, H, 0), other=0.0,
                  volatile=True)
    cnt_pend = need & (c_raw == -2147483648)
    ts = tl.where(need, c_raw, ts_known)
    nbound = tl.where(cnt_pend, M, ts)   # bound >= every later bound
    kh = offs_k < tl.where(c < nbound, K, 0)
    meta_pend = tl.sum((kh & ((ids == -2147483648) | (wb == -2147483648))).to(tl.int32),
                       axis=0)
    mine = tl.sum((kh & (tl.where(ids >= 0, ids // L, -1) == RANK)).to(tl.int32), axis=0) > 0
    if ROW:
        row_pend = tl.where(mine, _n_sent(row, offs_h < H, BITS, 1), 0)
    else:
        row_pend = 0
    pending = every_thread_max(cnt_pend.to(tl.int32) + meta_pend + row_pend, NT, USE_TIMER)
    return ts, nbound, ids, wb, row, pending


@triton.jit
def _recv_row_spin(row, ptrs, mask, s, err_dev, err_host, timeout_ns, BITS: tl.constexpr,
                   NT: tl.constexpr):
    """``TSPIN``: a received row (``row``, the poll's last volatile load of ``ptrs``) once each
    thread's own masked elements have landed (:func:`.sync.spin_landed`; a deadline passed
    inside records the dispatch, source ``s``). No barrier: the receive's barrier before its
    resets follows."""
    return spin_landed(row, ptrs, mask, timeout_ns, err_dev, err_host, 65536 + s + 1, BITS, NT)


@triton.jit
def _lamport_counts(ptrs, mask, dead, err_dev, err_host, timeout_ns, USE_TIMER: tl.constexpr,
                    NT: tl.constexpr, BLOCK_W: tl.constexpr):
    """Every peer's count for this program at once (``SPREAD``): the ``[BLOCK_W]`` count slots
    ``ptrs`` (``mask``: the peers) volatile-loaded until none is the sentinel (or the
    deadline, which names the lowest peer still missing), re-read after a barrier (the vector
    is replicated over the threads), then reset. Returns ``(counts, dead)``, 0 off the mask
    (and everywhere once ``dead``)."""
    offs_w = tl.arange(0, BLOCK_W)
    v = tl.load(ptrs, mask=mask, other=0, volatile=True)
    pending = uniform(tl.sum((mask & (v == -2147483648)).to(tl.int32), axis=0), NT)
    t0 = tl.full([], 0, tl.int64)   # set at the first check: no clock read unless waiting
    spins = tl.full([], 0, tl.int64)
    while (pending > 0) & (dead == 0):
        v = tl.load(ptrs, mask=mask, other=0, volatile=True)
        late = mask & (v == -2147483648)
        pending = uniform(tl.sum(late.to(tl.int32), axis=0), NT)
        spins += 1
        peer = uniform(tl.min(tl.where(late, offs_w, BLOCK_W), axis=0), NT)
        t0, dead = _spin_deadline(pending, spins, t0, dead, err_dev, err_host, timeout_ns, 1,
                                  peer, USE_TIMER, NT)
    tl.debug_barrier()
    v = tl.load(ptrs, mask=mask, other=0, volatile=True)
    tl.debug_barrier()   # every copy read: no reset overtakes one
    if dead == 0:
        tl.store(ptrs, tl.full([BLOCK_W], -2147483648, tl.int32), mask=mask)
    return tl.where(mask & (dead == 0), v, 0), dead


@triton.jit
def _lamport_recv_token(c, s, ts_known, dead, pid, buf, lx, lmeta, lcnt, expert_x, cursor,
                        slot_map, wloc, err_dev, err_host, timeout_ns, RANK: tl.constexpr,
                        W: tl.constexpr, G: tl.constexpr, M: tl.constexpr, H: tl.constexpr,
                        K: tl.constexpr, L: tl.constexpr, CAP: tl.constexpr,
                        BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BITS: tl.constexpr,
                        USE_TIMER: tl.constexpr, NT: tl.constexpr, TSPIN: tl.constexpr = False,
                        MSPIN: tl.constexpr = False, CLAIM1: tl.constexpr = False,
                        TRACE: tl.constexpr = False, trace=None, t0_trace=None,
                        GATE: tl.constexpr = False):
    """:func:`_lamport_recv_tile` of a one-token tile (token ``c`` of source ``s``) on 1-D
    vectors (session 13): the count, meta and row polled together until every thread's copies
    have landed (:func:`_lamport_poll_token`, session 14), then expanded from those values
    (:func:`_token_claim`, :func:`_token_place`); barrier; reset. Returns (count, dead).

    ``TSPIN`` (GPU, 16/32-bit rows of at least 2 elements a thread): the poll loop waits for
    the count and meta only, then each thread waits for its own elements of the row
    (:func:`_recv_row_spin`). ``MSPIN`` (with ``TSPIN``; the launcher sets it at <= 8 warps
    a program, ``p2p._at_warps``): the count and meta are per-thread spins too (:func:`.sync.spin_meta`), followed by one reduction that yields the
    count, whether the token has a local expert and whether a deadline passed; the row is
    then loaded and spun on.

    ``CLAIM1`` (session 25, an A/B knob): the received token's slots are claimed once its meta
    has landed, before the wait for its row (with ``TSPIN``), not after it.

    ``TRACE``: stamps "peer meta seen", "peer row seen", "peer slots claimed", "peer rows
    placed", "peer token reset" (:func:`_stamp`; ``t0_trace`` the program's entry clock).

    ``GATE`` (not with ``CLAIM1``): the claim and the placement run under a branch
    on the token being there (``c < ts``), so a program with nothing to receive skips them
    instead of running them masked off (:func:`ep_dispatch_lamport_kernel`)."""
    SPIN: tl.constexpr = TSPIN and USE_TIMER and BITS <= 32 and BLOCK_H * BITS >= NT * 32
    META: tl.constexpr = SPIN and MSPIN
    offs_h = tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_K)
    need = ts_known < 0
    cnt_ptr = lcnt[RANK] + (buf * W + s) * G + pid
    base = (buf * W + s) * M + tl.cast(c, tl.int64)   # masked off wherever c >= M
    mp1 = lmeta[RANK] + base * (2 * K)
    rp = lx[RANK] + base * H
    if META:
        # the spin's outputs feed this one reduction only: a consumer in another layout would
        # make triton rematerialise the asm there (session 20: 26 copies, one after another)
        sid, swb, tsv = spin_meta(mp1 + offs_k, mp1 + K + offs_k, offs_k < K, cnt_ptr, need,
                                  ts_known, c, timeout_ns, err_dev, err_host, 65536 + s + 1)
        late = (tsv == -2147483648) | ((offs_k < K) & (c < tsv) & (
            (sid == -2147483648) | (swb == -2147483648)))
        hit = ((sid >= 0) & (sid // L == RANK)).to(tl.int32)
        r = tl.max(tl.where(late, 1 << 30, tsv * 2 + hit), axis=0)
        dead = tl.where(r >= (1 << 30), 1, dead)
        ts = r >> 1
        mine_m = (r & 1) > 0
        # re-read after that reduction's barrier: every copy of the meta sees what some thread
        # saw land (a later read cannot return an older value), the row where it has landed
        km = offs_k < tl.where((c < ts) & (dead == 0), K, 0)
        ids = tl.load(mp1 + offs_k, mask=km, other=-1, volatile=True)
        wb = tl.load(mp1 + K + offs_k, mask=km, other=0, volatile=True)
        row = tl.load(rp + offs_h, mask=offs_h < tl.where(mine_m & (dead == 0), H, 0),
                      other=0.0, volatile=True)
    else:
        bound = tl.where(need, M, ts_known)
        ts, bound, ids, wb, row, pending = _lamport_poll_token(
            cnt_ptr, need, ts_known, bound, mp1, rp, c, RANK, M, H, K, L, BLOCK_H, BLOCK_K,
            BITS, USE_TIMER, NT, not SPIN)
        t0 = tl.full([], 0, tl.int64)   # set at the first check: no clock read unless waiting
        spins = tl.full([], 0, tl.int64)
        while (pending > 0) & (dead == 0):
            ts, bound, ids, wb, row, pending = _lamport_poll_token(
                cnt_ptr, need, ts_known, bound, mp1, rp, c, RANK, M, H, K, L, BLOCK_H,
                BLOCK_K, BITS, USE_TIMER, NT, not SPIN)
            spins += 1
            t0, dead = _spin_deadline(pending, spins, t0, dead, err_dev, err_host, timeout_ns,
                                      1, s, USE_TIMER, NT)
    _stamp(trace, pid, 3, t0_trace, TRACE, USE_TIMER, NT)
    if dead == 0:
        valid = c < ts
        kv = offs_k < tl.where(valid, K, 0)
        if META:
            mine = valid & mine_m
        else:
            mine = valid & (tl.sum((tl.where(ids >= 0, ids // L, -1) == RANK).to(tl.int32),
                                   axis=0) > 0)
        if CLAIM1:   # the slots' atomic round trip overlaps the wait for the row
            claim = _token_claim(ids, valid, cursor, RANK, L, K, BLOCK_K)
            _stamp(trace, pid, 5, t0_trace, TRACE, USE_TIMER, NT)
        if SPIN:
            row = _recv_row_spin(row, rp + offs_h, offs_h < tl.where(mine, H, 0), s, err_dev,
                                 err_host, timeout_ns, BITS, NT)
        _stamp(trace, pid, 4, t0_trace, TRACE, USE_TIMER, NT)
        srow = s * M + tl.cast(tl.where(valid, c, 0), tl.int64)
        tl.store(wloc + srow * K + offs_k, wb.to(tl.float32, bitcast=True), mask=kv)
        if GATE and (not CLAIM1):   # no token: no claim, no place at all
            if valid:
                claim = _token_claim(ids, valid, cursor, RANK, L, K, BLOCK_K)
                _stamp(trace, pid, 5, t0_trace, TRACE, USE_TIMER, NT)
                _token_place(row, valid, claim, srow, expert_x, slot_map, H, K, CAP, BLOCK_H,
                             BLOCK_K)
        else:
            if not CLAIM1:
                claim = _token_claim(ids, valid, cursor, RANK, L, K, BLOCK_K)
                _stamp(trace, pid, 5, t0_trace, TRACE, USE_TIMER, NT)
            _token_place(row, valid, claim, srow, expert_x, slot_map, H, K, CAP, BLOCK_H,
                         BLOCK_K)
        _stamp(trace, pid, 6, t0_trace, TRACE, USE_TIMER, NT)
        tl.debug_barrier()   # every read of the received values done: no reset overtakes one
        if need:
            tl.store(cnt_ptr, -2147483648)
        tl.store(mp1 + offs_k, tl.full([BLOCK_K], -2147483648, tl.int32), mask=kv)
        tl.store(mp1 + K + offs_k, tl.full([BLOCK_K], -2147483648, tl.int32), mask=kv)
        tl.store(rp + offs_h, _sent_like(row, BITS), mask=offs_h < tl.where(mine, H, 0))
        _stamp(trace, pid, 7, t0_trace, TRACE, USE_TIMER, NT)
    else:
        ts = ts * 0
    return ts, dead


@triton.jit
def _wait_zeroed(zflag, buf, err_dev, err_host, timeout_ns, RANK: tl.constexpr,
                 USE_TIMER: tl.constexpr, NT: tl.constexpr):
    """``DIRECT``: wait until ``*zflag == buf`` (program ``ZP`` zeroed ``counts`` for this
    call), each thread by its own acquire loads (:func:`.sync.spin_equal`); past the deadline
    the record names this rank, which ``p2p._timeout_error`` reads as "the own zeroing program
    did not run", not as a missing peer. In the interpreter (``USE_TIMER`` off) a plain
    volatile poll with no deadline (``ZP`` is 0 there: run first, or concurrently)."""
    if USE_TIMER:
        spin_equal(zflag, buf, timeout_ns, err_dev, err_host, 65536 + RANK + 1, NT)
    else:
        v = tl.load(zflag, volatile=True)
        while v != buf:
            v = tl.load(zflag, volatile=True)


@triton.jit
def ep_dispatch_lamport_kernel(x_ptr, ids_ptr, w_ptr, T, lx, lmeta, lcnt,
                               expert_x, counts, cursor, done, slot_map, wloc, peer_T, buf_ptr,
                               err_dev, err_host_addr, timeout_ns,
                               RANK: tl.constexpr, W: tl.constexpr, G: tl.constexpr,
                               M: tl.constexpr, H: tl.constexpr, K: tl.constexpr,
                               L: tl.constexpr, E: tl.constexpr, CAP: tl.constexpr,
                               BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                               BLOCK_L: tl.constexpr, BLOCK_W: tl.constexpr, TB: tl.constexpr,
                               BITS: tl.constexpr, NBUF: tl.constexpr, SHIFT: tl.constexpr,
                               USE_TIMER: tl.constexpr, PDL: tl.constexpr = False,
                               NT: tl.constexpr = 256,
                               TSPIN: tl.constexpr = False, MSPIN: tl.constexpr = False,
                               SPREAD: tl.constexpr = False, EARLY: tl.constexpr = False,
                               CLAIM1: tl.constexpr = False, GATE: tl.constexpr = False,
                               TRACE: tl.constexpr = False, trace=None,
                               DIRECT: tl.constexpr = False, ZP: tl.constexpr = 0,
                               zflag=None, QW: tl.constexpr = 0):
    """Lamport dispatch; see the module docstring. Tiles of ``TB`` tokens; program ``p`` sends
    own tiles ``p, p+G, ...`` and receives tiles ``q, q+G, ...`` (``q = (p + SHIFT) mod G``)
    of every peer, the own tile's rows copied after each receive (before it with ``EARLY``,
    below).

    ``SPREAD`` (one-token tiles, ``SHIFT`` 0; the launcher's default at EP > 2):
    the peers' tokens are spread over the programs instead, one a program and iteration, so
    a program does not receive from the ``W - 1`` peers one after another. After sending its
    first own token every program polls every peer's count at once
    (:func:`_lamport_counts`); the received tokens are then numbered peer by peer (rank
    order, ``u = sum of the counts of lower ranks + c``) and program ``p`` receives ``u = p,
    p + G, ...``. Every program still reads and resets its own count slot of every peer.

    ``EARLY`` (one-token tiles; session 25): where a program places its own
    token and receives one too (``hp == pid``: more own tokens than half the grid, e.g. 128
    tokens on 128 programs), the own rows go into the local experts right after their slots
    are claimed, before the receive, so their HBM writes overlap the peers' rows in flight
    instead of following their landing. Smaller batches keep the order (own rows placed by
    the other half of the grid after its count poll): placing first there measured 0.2-0.5
    us slower at 1-8 tokens (loopback).

    ``GATE`` (one-token tiles; session 26): a token's slot claim and row
    placement run under a branch on the token being there, own or received, instead of
    masked off. Session 26's stage stamps (``TRACE``, loopback, one token) priced the masked-off
    forms at ~0.3 us (claim) and ~0.45-0.8 us (placement: ``K`` slot reductions and ``K``
    masked row stores): the program receiving token 0 of a small batch ran both for an own token it
    does not have (the other half of the grid places it) after its receive, on the critical
    path.

    ``TRACE`` (a diagnostic, off by default; the knob ``P2PBackend(_trace=True)``): each
    program stamps the stages of :data:`TRACE_STAGES` into ``trace`` (int64 [G, NS, 2]: ns
    since its entry after the PDL wait, summed, and how many times), :func:`_stamp`.

    ``DIRECT`` (session 27, the default; ``P2PBackend(_direct_counts=False)``
    is the A/B): the launcher passes ``counts`` as ``cursor``, so the slot claims count the rows
    themselves and no "last program out" publishes them (:func:`_publish_counts`: a barrier,
    the ``done`` atomic and the cursor exchange on the last program's path, ~0.6 us at one
    token in the stage stamps). ``counts`` must then be zero before the first claim: program
    ``ZP`` zeroes it at entry and release-stores this call's buffer index ``buf`` into
    ``zflag`` (int32 [1], -1 before the first call); every program waits for that value
    (:func:`_wait_zeroed`) after sending its first tile, before its first claim. So ``counts``
    keeps its values until the next dispatch, as with the "last program out". The launcher's
    ``ZP`` at <= 8 warps is ``G // 4``: a program with nothing to send, receive or place while
    both ranks' batches fit a quarter of the grid (program 0, which sends and receives token
    0, had the zeroing on the one-token critical path: its send 0.5 us later), and dispatched
    early, so the programs waiting on it need only the first quarter of the grid resident; at
    16 warps (every program has a token) 0, the first dispatched; in the interpreter, which may
    run the programs in turn, 0. Session 27 also timed zeroing by the
    combine: 0.3 us faster at 1-16 tokens, but ``counts`` read 0 after the combine: not kept.

    ``QW`` (session 33): an fp8 dispatch's wire rows, ``QW`` leading elements of fp8 bytes
    (``hidden_size / esize``), the scales after them; :func:`_no_sentinel` (0: rows of
    values)."""
    tl.static_assert((not SPREAD) or ((TB == 1) and (SHIFT == 0)),
                     "SPREAD needs one-token tiles and SHIFT 0")
    if PDL:  # nothing is touched before the previous grid finished
        pdl_wait()
        pdl_launch_dependents()
    pid = tl.program_id(0)
    t0_trace = _clock(TRACE, USE_TIMER, NT)
    err_host = err_host_addr.to(tl.pointer_type(tl.int32))
    buf = tl.load(buf_ptr + pid)
    if DIRECT:
        if pid == ZP:   # this call's claims count from zero; then the flag, released
            offs_z = tl.arange(0, BLOCK_L)
            tl.store(counts + offs_z, tl.zeros([BLOCK_L], tl.int32), mask=offs_z < L)
            tl.debug_barrier()
            tl.atomic_xchg(zflag, buf, sem="release", scope="gpu")
    # this rank's error flag is not read here but by the poll loops at their first deadline
    # check (SPIN_CHECK spins): a read at entry is a reduction whose barrier holds back
    # everything after it (session 16, calls 8-9)
    dead = tl.full([], 0, tl.int32)
    offs_w = tl.arange(0, BLOCK_W)
    is_peer = (offs_w < W) & (offs_w != RANK)
    for d in tl.static_range(W):
        if d != RANK:
            tl.store(lcnt[d] + (buf * W + RANK) * G + pid, T)
    _stamp(trace, pid, 0, t0_trace, TRACE, USE_TIMER, NT)
    n_own = tl.cdiv(T, TB)
    tsv = tl.full([BLOCK_W], -1, tl.int32)       # peers' token counts, -1 = not known yet
    rbase = (pid + SHIFT) % G                    # received tiles: rbase, rbase + G, ...
    # own tiles placed into local experts: hp, hp + G, ... A batch of one-token tiles that fits
    # half the grid has them placed by the other half (hp half the grid away), so a sender
    # does not also copy its own rows after its receive (session 14)
    hp = pid
    if TB == 1:
        hp = tl.where(n_own <= G // 2, (pid + G // 2) % G, pid)
    EO: tl.constexpr = EARLY and (TB == 1)
    GC: tl.constexpr = GATE and (TB == 1)
    i = tl.full([], 0, tl.int32)
    more = n_own > 0
    more = more | (W > 1)
    cum = tl.zeros([BLOCK_W], tl.int32)        # SPREAD: the counts' running sum, rank order
    units = tl.full([], 0, tl.int32)           # SPREAD: the peers' tokens in all
    while more:
        # send own tile i and claim its slots; nothing waits for the claim until the rows are
        # placed after the receive, so its round trip overlaps the poll instead of preceding it
        # (with EARLY, a program that also receives places its own rows before the receive).
        # The receive is of the peers' tile i (not i - 1): with the decode grid (G >= tiles)
        # a program has one tile, and nothing is carried across iterations (triton 3.6 fails
        # to compile a loop-carried [TB, BLOCK_H] row here: RemoveLayoutConversions)
        if TB == 1:   # 1-D vectors (session 13); own token hp + i*G placed here (session 14)
            row1, ids1, w1, v1, t1 = _own_token(pid + i * G, T, x_ptr, ids_ptr, w_ptr, H, K, E,
                                                BLOCK_H, BLOCK_K, BITS, QW)
            _lamport_send_token(row1, ids1, w1, v1, t1, buf, lx, lmeta, RANK, W, M, H, K, L,
                                BLOCK_H, BLOCK_K, BITS, QW)
            _stamp(trace, pid, 1, t0_trace, TRACE, USE_TIMER, NT)
            if DIRECT:
                if i == 0:   # before this program's first claim
                    _wait_zeroed(zflag, buf, err_dev, err_host, timeout_ns, RANK, USE_TIMER,
                                 NT)
            rowp, idsp, wp, vp, tp = _own_token(hp + i * G, T, x_ptr, ids_ptr, w_ptr, H, K, E,
                                                BLOCK_H, BLOCK_K, BITS, QW)
            if GC:   # an own token to place: claim and (EARLY) place; else neither
                if vp:
                    claim = _token_claim(idsp, vp, cursor, RANK, L, K, BLOCK_K)
                    if EO:
                        if hp == pid:
                            _token_place(rowp, vp, claim, RANK * M + tp, expert_x, slot_map,
                                         H, K, CAP, BLOCK_H, BLOCK_K)
                else:
                    claim = _no_claim(BLOCK_K)
            else:
                claim = _token_claim(idsp, vp, cursor, RANK, L, K, BLOCK_K)
                if EO:   # the own rows now, overlapping the peers' rows in flight
                    if hp == pid:
                        _token_place(rowp, vp, claim, RANK * M + tp, expert_x, slot_map, H, K,
                                     CAP, BLOCK_H, BLOCK_K)
            _stamp(trace, pid, 2, t0_trace, TRACE, USE_TIMER, NT)
        else:
            row, ids, vt, t64 = _lamport_send_tile(pid + i * G, x_ptr, ids_ptr, w_ptr, T, buf,
                                                   lx, lmeta, RANK, W, M, H, K, L, E, BLOCK_H,
                                                   BLOCK_K, TB, BITS, QW)
            if DIRECT:
                if i == 0:
                    _wait_zeroed(zflag, buf, err_dev, err_host, timeout_ns, RANK, USE_TIMER,
                                 NT)
            slot = _claim_slots(ids, vt, cursor, RANK, L, K, BLOCK_K)
        cr = rbase + i * G
        if SPREAD:   # every peer's count at the first iteration, then the unit pid + i * G
            if i == 0:
                tsv, dead = _lamport_counts(lcnt[RANK] + (buf * W + offs_w) * G + pid, is_peer,
                                            dead, err_dev, err_host, timeout_ns, USE_TIMER, NT,
                                            BLOCK_W)
                cum = tl.cumsum(tsv, axis=0)     # inclusive; 0 at this rank
                units = tl.sum(tsv, axis=0)
            if (dead == 0) & (cr < units):
                s = tl.sum((cum <= cr).to(tl.int32), axis=0)   # the peer of unit cr
                ts = tl.sum(tl.where(offs_w == s, tsv, 0), axis=0)
                c = cr - (tl.sum(tl.where(offs_w == s, cum, 0), axis=0) - ts)
                ts, dead = _lamport_recv_token(
                    c, s, ts, dead, pid, buf, lx, lmeta, lcnt, expert_x, cursor, slot_map,
                    wloc, err_dev, err_host, timeout_ns, RANK, W, G, M, H, K, L, CAP, BLOCK_H,
                    BLOCK_K, BITS, USE_TIMER, NT, TSPIN, MSPIN, CLAIM1, TRACE, trace, t0_trace,
                    GATE)
        for s in tl.static_range(W):
            if (s != RANK) & (not SPREAD):
                ts = tl.sum(tl.where(offs_w == s, tsv, 0), axis=0)
                if (dead == 0) & ((ts < 0) | (cr * TB < ts)):
                    if TB == 1:
                        ts, dead = _lamport_recv_token(
                            cr, s, ts, dead, pid, buf, lx, lmeta, lcnt, expert_x, cursor,
                            slot_map, wloc, err_dev, err_host, timeout_ns, RANK, W, G, M, H,
                            K, L, CAP, BLOCK_H, BLOCK_K, BITS, USE_TIMER, NT, TSPIN, MSPIN,
                            CLAIM1, TRACE, trace, t0_trace, GATE)
                    else:
                        ts, dead = _lamport_recv_tile(
                            cr, s, ts, dead, pid, buf, lx, lmeta, lcnt, expert_x, cursor,
                            slot_map, wloc, err_dev, err_host, timeout_ns, RANK, W, G, M, H,
                            K, L, CAP, BLOCK_H, BLOCK_K, TB, BITS, USE_TIMER, NT, TSPIN)
                    tsv = tl.where(offs_w == s, ts, tsv)
        if TB == 1:
            if GC:
                if vp:
                    if EO:
                        if hp != pid:
                            _token_place(rowp, vp, claim, RANK * M + tp, expert_x, slot_map,
                                         H, K, CAP, BLOCK_H, BLOCK_K)
                    else:
                        _token_place(rowp, vp, claim, RANK * M + tp, expert_x, slot_map, H,
                                     K, CAP, BLOCK_H, BLOCK_K)
            elif EO:
                if hp != pid:
                    _token_place(rowp, vp, claim, RANK * M + tp, expert_x, slot_map, H, K,
                                 CAP, BLOCK_H, BLOCK_K)
            else:
                _token_place(rowp, vp, claim, RANK * M + tp, expert_x, slot_map, H, K, CAP,
                             BLOCK_H, BLOCK_K)
            _stamp(trace, pid, 8, t0_trace, TRACE, USE_TIMER, NT)
        else:
            _place_rows(row, ids, vt, slot, RANK * M + t64, expert_x, slot_map, RANK, H, K, L,
                        CAP, BLOCK_H, BLOCK_K)
        i += 1
        big = tl.where(is_peer, tl.where(tsv < 0, 2147483647, tsv), 0)
        want_recv = ((rbase + i * G) * TB < tl.max(big, axis=0)) & (dead == 0)
        if SPREAD:
            want_recv = (rbase + i * G < units) & (dead == 0)
        more = (pid + i * G < n_own) | want_recv   # (hp != pid only with one own tile)
    tl.store(peer_T + offs_w, tl.maximum(tsv, 0), mask=is_peer)
    tl.store(buf_ptr + pid, (buf + 1) % NBUF)
    _stamp(trace, pid, 9, t0_trace, TRACE, USE_TIMER, NT)
    if DIRECT:   # the claims were the counts: nothing to publish, no last program out
        last = pid < 0
    else:
        last = _publish_counts(done, cursor, counts, G, L, BLOCK_L)
    if TRACE:
        if last:
            _stamp(trace, pid, 10, t0_trace, TRACE, USE_TIMER, NT)
    _stamp(trace, pid, 11, t0_trace, TRACE, USE_TIMER, NT)


@triton.jit
def _n_sent(v, mask, BITS: tl.constexpr, ND: tl.constexpr):
    """How many masked elements of ``v`` (``ND`` = 1 or 2 dimensions) are the sentinel."""
    x = (mask & _is_sent(v, BITS)).to(tl.int32)
    if ND == 1:
        n = tl.sum(x, axis=0)
    else:
        n = tl.sum(tl.sum(x, axis=1), axis=0)
    return n


@triton.jit
def _poll_rows(ptrs, mask, dead, peer, err_dev, err_host, timeout_ns, OP: tl.constexpr,
               BITS: tl.constexpr, USE_TIMER: tl.constexpr, NT: tl.constexpr,
               TSPIN: tl.constexpr = False):
    """Volatile-load the ``[TB, BLOCK]`` tile ``ptrs`` until no masked element is the sentinel
    (or the deadline).

    The loop condition is made uniform explicitly (``uniform``). A tile with fewer elements than
    threads is replicated: its copies are loaded independently and the one returned need not be
    the one counted, so it is re-read after a barrier. Ends with a barrier, so a reset store
    issued after it (whatever its layout) never overtakes a read of this poll.

    ``TSPIN`` (GPU, 16/32-bit, at least 2 elements a thread): each thread spins on its own
    elements instead (:func:`.sync.spin_landed`, no reduction in the loop), then the barrier.
    ``dead`` is returned as it came: a deadline passed inside writes the error record, and
    what is still pending comes back as the sentinel, which the caller may reset and sum as if
    it had landed (the launcher raises before anything reads the result)."""
    v = tl.load(ptrs, mask=mask, other=0.0, volatile=True)
    if TSPIN and USE_TIMER and BITS <= 32 and ptrs.numel * BITS >= NT * 32:
        v = spin_landed(v, ptrs, mask, timeout_ns, err_dev, err_host, OP * 65536 + peer + 1,
                        BITS, NT)
    else:
        pending = uniform(_n_sent(v, mask, BITS, 2), NT)
        t0 = tl.full([], 0, tl.int64)   # set at the first check: no clock read unless waiting
        spins = tl.full([], 0, tl.int64)
        while (pending > 0) & (dead == 0):
            v = tl.load(ptrs, mask=mask, other=0.0, volatile=True)
            pending = uniform(_n_sent(v, mask, BITS, 2), NT)
            spins += 1
            t0, dead = _spin_deadline(pending, spins, t0, dead, err_dev, err_host, timeout_ns,
                                      OP, peer, USE_TIMER, NT)
        if ptrs.numel < NT:   # replicated layout: re-read, every copy now sees landed values
            tl.debug_barrier()
            v = tl.load(ptrs, mask=mask, other=0.0, volatile=True)
    tl.debug_barrier()
    return v, dead


@triton.jit
def _push_routing(c, s, slot_map, wloc, M: tl.constexpr, K: tl.constexpr,
                  BLOCK_K: tl.constexpr, TB: tl.constexpr):
    """Source ``s``'s tile ``c`` as the dispatch left it for the combine: ``(slot [TB,
    BLOCK_K] (-1: none), weight [TB, BLOCK_K] fp32)`` of its tokens below ``M`` -- whether they
    exist in this call (``t < peer_T[s]``) is the caller's to apply."""
    offs_k = tl.arange(0, BLOCK_K)
    t64 = tl.cast(c * TB + tl.arange(0, TB), tl.int64)
    m2 = (t64 < M)[:, None] & (offs_k < K)[None, :]
    r = (s * M + t64)[:, None] * K + offs_k[None, :]
    return (tl.load(slot_map + r, mask=m2, other=-1), tl.load(wloc + r, mask=m2, other=0.0))


@triton.jit
def _lamport_push(c, col0, tsv, buf, expert_out, lcomb, slot_map, wloc, pre,
                  RANK: tl.constexpr, W: tl.constexpr, M: tl.constexpr, H: tl.constexpr,
                  K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                  BLOCK_W: tl.constexpr, TB: tl.constexpr, PRE: tl.constexpr,
                  BITS: tl.constexpr):
    """Columns ``[col0, col0 + BLOCK_C)`` of the partial sums of every peer's tile ``c``, pushed
    once per (token, peer) into ``lcomb[s][buf, RANK]`` (tokens with a local expert only;
    ``-0.0`` sent as ``+0.0``). ``PRE`` (one peer): ``pre`` is that peer's
    :func:`_push_routing` of tile ``c``, loaded by the caller before it knew the peer's count."""
    offs_h = col0 + tl.arange(0, BLOCK_C)
    mh = offs_h < H
    offs_k = tl.arange(0, BLOCK_K)
    mk = offs_k < K
    offs_w = tl.arange(0, BLOCK_W)
    t = c * TB + tl.arange(0, TB)
    t64 = tl.cast(t, tl.int64)
    for s in tl.static_range(W):
        if s != RANK:
            ts = tl.sum(tl.where(offs_w == s, tsv, 0), axis=0)
            if c * TB < ts:
                vt = t < ts
                m2 = vt[:, None] & mk[None, :]
                if PRE:
                    sm = tl.where(m2, pre[0], -1)
                    wv = tl.where(m2, pre[1], 0.0)
                else:
                    sm, wv = _push_routing(c, s, slot_map, wloc, M, K, BLOCK_K, TB)
                    sm = tl.where(m2, sm, -1)
                    wv = tl.where(m2, wv, 0.0)
                accp = _partial_tile(expert_out, sm, wv, col0, H, K, BLOCK_C, BLOCK_K)
                has = vt & (tl.max(sm, axis=1) >= 0)
                out = accp.to(lcomb[s].dtype.element_ty)
                out = _no_sentinel(out, offs_h[None, :], BITS)
                dst = lcomb[s] + ((buf * W + RANK) * M + t64)[:, None] * H + offs_h[None, :]
                tl.store(dst, out, mask=has[:, None] & mh[None, :])


@triton.jit
def _lamport_finish(co, col0, T, dead, buf, expert_out, ids_ptr, w_ptr, y_ptr, lcomb, slot_map,
                    err_dev, err_host, timeout_ns, RANK: tl.constexpr, W: tl.constexpr,
                    M: tl.constexpr, H: tl.constexpr, K: tl.constexpr, L: tl.constexpr,
                    E: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                    TB: tl.constexpr, BITS: tl.constexpr, USE_TIMER: tl.constexpr,
                    NT: tl.constexpr, TSPIN: tl.constexpr = False):
    """Columns ``[col0, col0 + BLOCK_C)`` of own tile ``co``: own partial (fp32) and each peer's
    (polled, then reset; ``TSPIN``: :func:`_poll_rows`), summed in fixed rank order into ``y``.
    Returns ``dead``."""
    offs_h = col0 + tl.arange(0, BLOCK_C)
    mh = offs_h < H
    offs_k = tl.arange(0, BLOCK_K)
    mk = offs_k < K
    to = co * TB + tl.arange(0, TB)
    to64 = tl.cast(to, tl.int64)
    vo = to < T
    mo = vo[:, None] & mk[None, :]
    ids = tl.load(ids_ptr + to64[:, None] * K + offs_k[None, :], mask=mo, other=-1).to(tl.int32)
    ids = tl.where(mo & (ids >= 0) & (ids < E), ids, -1)
    owner = tl.where(ids >= 0, ids // L, -1)
    sm = tl.load(slot_map + (RANK * M + to64)[:, None] * K + offs_k[None, :], mask=mo, other=-1)
    wv = tl.load(w_ptr + to64[:, None] * K + offs_k[None, :], mask=mo, other=0.0).to(tl.float32)
    part = _partial_tile(expert_out, sm, wv, col0, H, K, BLOCK_C, BLOCK_K)
    acco = tl.zeros([TB, BLOCK_C], tl.float32)
    for d in tl.static_range(W):
        if d == RANK:
            acco += part
        else:
            from_d = vo & (tl.sum((owner == d).to(tl.int32), axis=1) > 0)
            mrow = from_d[:, None] & mh[None, :]
            src = lcomb[RANK] + ((buf * W + d) * M + to64)[:, None] * H + offs_h[None, :]
            v, dead = _poll_rows(src, mrow, dead, d, err_dev, err_host, timeout_ns, 2, BITS,
                                 USE_TIMER, NT, TSPIN)
            if dead == 0:
                tl.store(src, _sent_like(v, BITS), mask=mrow)
            acco += v.to(tl.float32)
    tl.store(y_ptr + to64[:, None] * H + offs_h[None, :], acco.to(y_ptr.dtype.element_ty),
             mask=vo[:, None] & mh[None, :])
    return dead


@triton.jit
def _lamport_split_combine(pid, obase, n_own, T, dead, tsv, buf, expert_out, ids_ptr, w_ptr,
                           y_ptr, lcomb, slot_map, wloc, err_dev, err_host, timeout_ns,
                           RANK: tl.constexpr, W: tl.constexpr, M: tl.constexpr,
                           H: tl.constexpr, K: tl.constexpr, L: tl.constexpr, E: tl.constexpr,
                           CW: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr,
                           TB: tl.constexpr, BITS: tl.constexpr, USE_TIMER: tl.constexpr,
                           NT: tl.constexpr, S: tl.constexpr, pre, PRE: tl.constexpr,
                           TSPIN: tl.constexpr = False):
    """A small batch's combine, ``S`` column chunks of ``CW`` per tile (every tile's chunks fit
    the grid): program ``pid`` pushes chunk ``pid mod S`` of the peers' tile ``pid // S`` and
    finishes chunk ``obase mod S`` of its own tile ``obase // S``. Returns ``dead``."""
    if dead == 0:
        _lamport_push(pid // S, (pid % S) * CW, tsv, buf, expert_out, lcomb, slot_map, wloc, pre,
                      RANK, W, M, H, K, CW, BLOCK_K, BLOCK_W, TB, PRE, BITS)
    if obase // S < n_own:
        dead = _lamport_finish(obase // S, (obase % S) * CW, T, dead, buf, expert_out, ids_ptr,
                               w_ptr, y_ptr, lcomb, slot_map, err_dev, err_host, timeout_ns,
                               RANK, W, M, H, K, L, E, CW, BLOCK_K, TB, BITS, USE_TIMER, NT,
                               TSPIN)
    return dead


@triton.jit
def ep_combine_lamport_kernel(expert_out, ids_ptr, w_ptr, y_ptr, T, lcomb, slot_map, wloc,
                              peer_T, buf_ptr, err_dev, err_host_addr, timeout_ns,
                              RANK: tl.constexpr, W: tl.constexpr, G: tl.constexpr,
                              M: tl.constexpr, H: tl.constexpr, K: tl.constexpr,
                              L: tl.constexpr, E: tl.constexpr, BLOCK_H: tl.constexpr,
                              BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr, TB: tl.constexpr,
                              BITS: tl.constexpr, NBUF: tl.constexpr, SHIFT: tl.constexpr,
                              SPLIT: tl.constexpr, USE_TIMER: tl.constexpr,
                              PDL: tl.constexpr = False, NT: tl.constexpr = 256,
                              TSPIN: tl.constexpr = False):
    """Lamport combine; see the module docstring. When every rank's tiles times ``SPLIT`` fit
    the grid (a small batch), program ``p`` handles column chunk ``p mod SPLIT`` of tile
    ``p // SPLIT`` (push the peers', finish own tile ``q // SPLIT``, chunk ``q mod SPLIT``, ``q =
    (p + SHIFT) mod G``), so one token's K weighted expert rows are summed on SPLIT SMs instead
    of one. Otherwise program ``p`` pushes the peers' tiles ``p, p+G, ...`` (whole rows) and
    finishes its own tiles one iteration behind."""
    if PDL:  # nothing is touched before the previous grid finished
        pdl_wait()
        pdl_launch_dependents()
    pid = tl.program_id(0)
    err_host = err_host_addr.to(tl.pointer_type(tl.int32))
    offs_w = tl.arange(0, BLOCK_W)
    is_peer = (offs_w < W) & (offs_w != RANK)
    # one peer: the routing of the tile the small-batch path pushes, loaded beside peer_T
    # instead of after it (the push is the peer's critical path; session 14)
    tsv = tl.load(peer_T + offs_w, mask=is_peer, other=0)
    pre = _push_routing(pid // SPLIT, (RANK + 1) % W, slot_map, wloc, M, K, BLOCK_K, TB)
    buf = tl.load(buf_ptr + pid)
    dead = tl.full([], 0, tl.int32)   # the error flag: read by the poll loops (as the dispatch)
    max_ts = tl.max(tsv, axis=0)
    n_own = tl.cdiv(T, TB)
    obase = (pid + SHIFT) % G                    # own tiles / units: obase, obase + G, ...
    # every rank knows every rank's token count here, so all take the same branch: SPLIT
    # chunks per tile when they fit the grid, else half as many (session 6: 2 chunks were
    # 2 us faster than whole rows at 64 tokens, where 4 do not fit 128 programs)
    HALF: tl.constexpr = (SPLIT + 1) // 2
    tiles = tl.cdiv(tl.maximum(max_ts, T), TB)
    if tiles * SPLIT <= G:
        dead = _lamport_split_combine(pid, obase, n_own, T, dead, tsv, buf, expert_out, ids_ptr,
                                      w_ptr, y_ptr, lcomb, slot_map, wloc, err_dev, err_host,
                                      timeout_ns, RANK, W, M, H, K, L, E, BLOCK_H // SPLIT,
                                      BLOCK_K, BLOCK_W, TB, BITS, USE_TIMER, NT, SPLIT, pre,
                                      W == 2, TSPIN)
    elif tiles * HALF <= G:
        dead = _lamport_split_combine(pid, obase, n_own, T, dead, tsv, buf, expert_out, ids_ptr,
                                      w_ptr, y_ptr, lcomb, slot_map, wloc, err_dev, err_host,
                                      timeout_ns, RANK, W, M, H, K, L, E, BLOCK_H // HALF,
                                      BLOCK_K, BLOCK_W, TB, BITS, USE_TIMER, NT, HALF, pre,
                                      False, TSPIN)
    else:
        i = tl.full([], 0, tl.int32)
        more = (pid * TB < max_ts) | (obase < n_own)
        while more:
            if dead == 0:
                _lamport_push(pid + i * G, 0, tsv, buf, expert_out, lcomb, slot_map, wloc, pre,
                              RANK, W, M, H, K, BLOCK_H, BLOCK_K, BLOCK_W, TB, False, BITS)
            co = obase + (i - 1) * G
            if (i > 0) & (co < n_own):
                dead = _lamport_finish(co, 0, T, dead, buf, expert_out, ids_ptr, w_ptr, y_ptr,
                                       lcomb, slot_map, err_dev, err_host, timeout_ns, RANK, W, M,
                                       H, K, L, E, BLOCK_H, BLOCK_K, TB, BITS, USE_TIMER, NT,
                                       TSPIN)
            i += 1
            more = ((pid + i * G) * TB < max_ts) | (obase + (i - 1) * G < n_own)
    tl.store(buf_ptr + pid, (buf + 1) % NBUF)
