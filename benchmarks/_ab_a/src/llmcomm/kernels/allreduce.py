"""Triton allreduce kernels over a symmetric-memory workspace (NVLink peer loads/stores).

No torch.distributed here: :mod:`llmcomm.allreduce.p2p` allocates the workspace and launches.

Semantics (every kernel, every rank; ``x_r`` is rank r's input ``[T, H]``)::

    s = x_0.float() + x_1.float() + ... + x_{W-1}.float()     # fp32, this rank order everywhere
    NORM == False:  out = s.to(dtype)
    NORM == True:   residual_out = (s + residual.float()).to(dtype); r = residual_out.float()
                    n = r * rsqrt(mean(r * r, -1) + eps) * weight.float();  out = n.to(dtype)
                    FP8: q = clamp(n / scale, -448, 448).to(float8_e4m3fn)

Every rank runs the same instructions on the same bits, so outputs are bitwise identical.

Workspace of one rank (all ranks alike; ``peers_ptr`` points at a device int64 table of the W
workspace base addresses)::

    [flag_off  ] int32 flags[MAX_PROGRAMS][W]     flags[p][src] = last barrier value from src
    [stage_off ] dtype stage[2][msg_elems]        one-shot / two-shot, parity = epoch % 2
    [lamp_off  ] dtype lamport[3][W][slot_elems]  Lamport receive slots, buffer = epoch % 3

``state`` (local int32): ``[0]`` call epoch, ``[1]`` programs arrived, ``[ERR_OFF:]`` error
record (see :mod:`.sync`). The epoch advances once per call on the device (the last program to
arrive after its first phase bumps it), so no host counter is frozen into a CUDA graph.
Reuse is safe without an exit barrier: a peer can start call e+2 (and overwrite parity e % 2)
only after it finished call e+1, which needed data this rank sent after finishing call e.

Strategies:

* ``lamport_kernel``: push own chunks into every peer's slot; the slot holds -0.0 ("not yet
  written", inputs' -0.0 is sent as +0.0) until the data lands; poll own slots with volatile
  loads, reduce, then reset the slot to -0.0. No flags, no fences.
* ``lamport_rows_kernel``: the same protocol, software-pipelined per program over its tiles
  (push tile ``i + LAG``, then poll/reduce tile ``i``), so the epilogue overlaps the transfer.
* ``oneshot_kernel``: stage own tiles, per-program flag barrier (release/acquire, system scope),
  pull every peer's tiles, reduce.
* ``twoshot_kernel``: stage, barrier, reduce the tiles this rank owns and publish the result
  (residual_out / sum) in its stage, barrier, pull the others' results (recompute the norm).

With ``PDL`` (sm_90+, launched with ``launch_pdl=True``) a kernel's CTAs may be scheduled while
the previous grid still runs; ``griddepcontrol.wait`` comes before any memory access, so every
argument above about kernel boundaries still holds.

Tiles: NORM -> one row (``BLOCK = next_pow2(H)``); else a flat chunk of ``CHUNK`` elements.
Every spin-wait has a ``%globaltimer`` deadline; on expiry the kernel records which peer did not
arrive and finishes without waiting again (later calls skip their waits too).
"""

import triton
import triton.language as tl

from .sync import (globaltimer_uniform, load_uniform, pdl_launch_dependents, pdl_wait,
                   record_error, st_release_sys, wait_flags)

ERR_OFF = tl.constexpr(8)


@triton.jit
def _prologue(state_ptr, host_err_ptr, peers_ptr, NT: tl.constexpr, PDL: tl.constexpr):
    """Every kernel's start: (PDL wait), then ``(epoch, dead, host_err, tab)``: the call epoch,
    the error flag (uniform over the program: it is branched on, and another program of this
    rank may set it while the threads read it), the host error mirror and the peer table."""
    if PDL:  # programmatic dependent launch: nothing is touched before the previous grid ends
        pdl_wait()
        pdl_launch_dependents()
    epoch = tl.load(state_ptr, volatile=True)  # nobody writes it before every program read it
    dead = load_uniform(state_ptr + ERR_OFF, True, 0, NT)
    host_err = host_err_ptr.to(tl.pointer_type(tl.int32))
    tab = peers_ptr.to(tl.pointer_type(tl.int64))
    return epoch, dead, host_err, tab


@triton.jit
def _arrive(state_ptr, epoch):
    """Every program has read ``epoch``; the last one to arrive advances it for the next call.

    Called once per program right after its first phase (so the atomic's latency overlaps the
    data transfer). Plain stores suffice for the bump: the next call is a later kernel.
    """
    tl.debug_barrier()
    arrived = tl.atomic_add(state_ptr + 1, 1, sem="relaxed", scope="gpu")
    if arrived == tl.num_programs(0) - 1:
        tl.store(state_ptr + 1, 0)
        tl.store(state_ptr, epoch + 1)


@triton.jit
def _tile(t, T, H, NORM: tl.constexpr, BLOCK: tl.constexpr):
    k = tl.arange(0, BLOCK)
    if NORM:
        offs = tl.multiple_of(t * H, 8) + k
        m = (k < H) & (k * 0 + t < T)  # (block-shaped: the CPU interpreter needs it)
    else:
        offs = tl.multiple_of(t * BLOCK, BLOCK) + k
        m = offs < T * H
    return offs, m, k


@triton.jit
def _norm_store(r, offs, m, k, w_ptr, out_ptr, q_ptr, scale_ptr, eps, H, FP8: tl.constexpr):
    """``r`` [BLOCK] (dtype, one row, masked by ``m``): write normed (and fp8) for the row."""
    w = tl.load(w_ptr + k, mask=m, other=0.0)
    _norm_w(r, w, offs, m, out_ptr, q_ptr, scale_ptr, eps, H, FP8)


@triton.jit
def _norm_w(r, w, offs, m, out_ptr, q_ptr, scale_ptr, eps, H, FP8: tl.constexpr):
    """The RMSNorm arithmetic (shared by every path so results are bitwise identical)."""
    rf = tl.where(m, r.to(tl.float32), 0.0)
    var = tl.sum(rf * rf, axis=0) / H
    rs = tl.math.rsqrt(var + eps)
    n = rf * rs * w.to(tl.float32)
    tl.store(out_ptr + offs, n.to(out_ptr.dtype.element_ty), mask=m)
    if FP8:
        s = tl.load(scale_ptr)
        q = tl.minimum(tl.maximum(n / s, -448.0), 448.0)
        tl.store(q_ptr + offs, q.to(q_ptr.dtype.element_ty), mask=m)


@triton.jit
def _epilogue(acc, offs, m, k, res_ptr, w_ptr, out_ptr, rout_ptr, q_ptr, scale_ptr, eps, H,
              NORM: tl.constexpr, FP8: tl.constexpr):
    """fp32 sum ``acc`` of one tile -> outputs. Returns what two-shot publishes (dtype)."""
    DT = out_ptr.dtype.element_ty
    if NORM:
        r = (acc + tl.load(res_ptr + offs, mask=m, other=0.0).to(tl.float32)).to(DT)
        tl.store(rout_ptr + offs, r, mask=m)
        _norm_store(r, offs, m, k, w_ptr, out_ptr, q_ptr, scale_ptr, eps, H, FP8)
    else:
        r = acc.to(DT)
        tl.store(out_ptr + offs, r, mask=m)
    return r


@triton.jit
def _region(tab, r, off_bytes, DT: tl.constexpr):
    p = (tl.load(tab + r) + off_bytes).to(tl.pointer_type(DT))
    return tl.multiple_of(p, 16)


@triton.jit
def _barrier(tab, flag_off, pid, val, dead, timeout_ns, state_ptr, host_err, phase, epoch,
             RANK: tl.constexpr, W: tl.constexpr, NT: tl.constexpr):
    """Program ``pid`` of every rank meets here (flag value ``val``, monotonic per slot)."""
    tl.debug_barrier()
    i = tl.arange(0, NT)
    valid = i < W
    is_peer = valid & (i != RANK)
    ii = tl.where(valid, i, 0)
    bases = tl.load(tab + ii, mask=valid, other=0)
    sig = (bases + (flag_off + (pid * W + RANK) * 4)).to(tl.pointer_type(tl.int32))
    st_release_sys(sig, tl.zeros([NT], tl.int32) + val, is_peer)
    mine = tl.load(tab + RANK)
    wp = (mine + flag_off + (pid * W + ii) * 4).to(tl.pointer_type(tl.int32))
    return wait_flags(wp, ii, is_peer, val, dead, timeout_ns, state_ptr, host_err, pid, phase,
                      epoch, ERR_OFF)


@triton.jit(do_not_specialize=["T"])
def oneshot_kernel(x_ptr, res_ptr, w_ptr, out_ptr, rout_ptr, q_ptr, scale_ptr, eps, T, H,
                   peers_ptr, flag_off, stage_off, msg_elems, state_ptr, host_err_ptr, timeout_ns,
                   RANK: tl.constexpr, W: tl.constexpr, NORM: tl.constexpr, FP8: tl.constexpr,
                   BLOCK: tl.constexpr, NT: tl.constexpr, PDL: tl.constexpr):
    epoch, dead, host_err, tab = _prologue(state_ptr, host_err_ptr, peers_ptr, NT, PDL)
    pid = tl.program_id(0)
    NP = tl.num_programs(0)
    DT: tl.constexpr = x_ptr.dtype.element_ty
    par_off = stage_off + (epoch % 2).to(tl.int64) * msg_elems * (DT.primitive_bitwidth // 8)
    if NORM:
        n_tiles = T
    else:
        n_tiles = tl.cdiv(T * H, BLOCK)
    mine = _region(tab, RANK, par_off, DT)
    for t in range(pid, n_tiles, NP):
        offs, m, k = _tile(t, T, H, NORM, BLOCK)
        tl.store(mine + offs, tl.load(x_ptr + offs, mask=m), mask=m)
    _arrive(state_ptr, epoch)
    dead = _barrier(tab, flag_off, pid, epoch * 4 + 1, dead, timeout_ns, state_ptr, host_err, 1,
                    epoch, RANK, W, NT)
    for t in range(pid, n_tiles, NP):
        offs, m, k = _tile(t, T, H, NORM, BLOCK)
        acc = tl.zeros([BLOCK], tl.float32)
        for r in tl.static_range(W):
            if r == RANK:
                v = tl.load(x_ptr + offs, mask=m, other=0.0)
            else:
                v = tl.load(_region(tab, r, par_off, DT) + offs, mask=m, other=0.0)
            acc += v.to(tl.float32)
        _epilogue(acc, offs, m, k, res_ptr, w_ptr, out_ptr, rout_ptr, q_ptr, scale_ptr, eps, H,
                  NORM, FP8)


@triton.jit(do_not_specialize=["T"])
def twoshot_kernel(x_ptr, res_ptr, w_ptr, out_ptr, rout_ptr, q_ptr, scale_ptr, eps, T, H,
                   peers_ptr, flag_off, stage_off, msg_elems, state_ptr, host_err_ptr, timeout_ns,
                   RANK: tl.constexpr, W: tl.constexpr, NORM: tl.constexpr, FP8: tl.constexpr,
                   BLOCK: tl.constexpr, NT: tl.constexpr, PDL: tl.constexpr):
    epoch, dead, host_err, tab = _prologue(state_ptr, host_err_ptr, peers_ptr, NT, PDL)
    pid = tl.program_id(0)
    NP = tl.num_programs(0)
    DT: tl.constexpr = x_ptr.dtype.element_ty
    par_off = stage_off + (epoch % 2).to(tl.int64) * msg_elems * (DT.primitive_bitwidth // 8)
    if NORM:
        n_tiles = T
    else:
        n_tiles = tl.cdiv(T * H, BLOCK)
    per = tl.cdiv(n_tiles, W)  # rank q owns tiles [q * per, (q + 1) * per)
    mine = _region(tab, RANK, par_off, DT)
    # 1) stage the tiles the peers own
    for i in range(pid, per, NP):
        for q in tl.static_range(W):
            if q != RANK:
                t = q * per + i
                offs, m, k = _tile(t, T, H, NORM, BLOCK)
                m = m & (t < n_tiles)
                tl.store(mine + offs, tl.load(x_ptr + offs, mask=m), mask=m)
    _arrive(state_ptr, epoch)
    dead = _barrier(tab, flag_off, pid, epoch * 4 + 1, dead, timeout_ns, state_ptr, host_err, 2,
                    epoch, RANK, W, NT)
    # 2) reduce my tiles, write my outputs, publish the rounded result in my stage
    for i in range(pid, per, NP):
        t = RANK * per + i
        offs, m, k = _tile(t, T, H, NORM, BLOCK)
        m = m & (t < n_tiles)
        acc = tl.zeros([BLOCK], tl.float32)
        for r in tl.static_range(W):
            if r == RANK:
                v = tl.load(x_ptr + offs, mask=m, other=0.0)
            else:
                v = tl.load(_region(tab, r, par_off, DT) + offs, mask=m, other=0.0)
            acc += v.to(tl.float32)
        pub = _epilogue(acc, offs, m, k, res_ptr, w_ptr, out_ptr, rout_ptr, q_ptr, scale_ptr,
                        eps, H, NORM, FP8)
        tl.store(mine + offs, pub, mask=m)
    dead = _barrier(tab, flag_off, pid, epoch * 4 + 2, dead, timeout_ns, state_ptr, host_err, 3,
                    epoch, RANK, W, NT)
    # 3) pull the peers' results
    for i in range(pid, per, NP):
        for q in tl.static_range(W):
            if q != RANK:
                t = q * per + i
                offs, m, k = _tile(t, T, H, NORM, BLOCK)
                m = m & (t < n_tiles)
                v = tl.load(_region(tab, q, par_off, DT) + offs, mask=m, other=0.0)
                if NORM:
                    tl.store(rout_ptr + offs, v, mask=m)
                    _norm_store(v, offs, m, k, w_ptr, out_ptr, q_ptr, scale_ptr, eps, H, FP8)
                else:
                    tl.store(out_ptr + offs, v, mask=m)


@triton.jit
def _is_sentinel(v, ELEM_BITS: tl.constexpr):
    if ELEM_BITS == 16:
        s = v.to(tl.int16, bitcast=True) == -32768
    else:
        s = v.to(tl.int32, bitcast=True) == -2147483648
    return s


@triton.jit
def _sentinel(BLOCK: tl.constexpr, DT: tl.constexpr, ELEM_BITS: tl.constexpr):
    if ELEM_BITS == 16:
        s = tl.full([BLOCK], -32768, tl.int16).to(DT, bitcast=True)
    else:
        s = tl.full([BLOCK], -2147483648, tl.int32).to(DT, bitcast=True)
    return s


@triton.jit
def _lamport_push(x_ptr, tab, lamp_off, buf, slot_elems, offs, m, RANK: tl.constexpr,
                  W: tl.constexpr, DT: tl.constexpr):
    """Store ``x[offs]`` into slot ``[buf][RANK]`` of every peer (-0.0 sent as +0.0)."""
    v = tl.load(x_ptr + offs, mask=m, other=0.0)
    v = tl.where(v == 0, tl.zeros_like(v), v)  # -0.0 is the sentinel: send +0.0
    for r in tl.static_range(W):
        if r != RANK:
            dst = _region(tab, r, lamp_off, DT) + (buf * W + RANK) * slot_elems
            tl.store(dst + offs, v, mask=m)


@triton.jit
def _lamport_get(own, mybase, buf, slot_elems, offs, m, r: tl.constexpr, RANK: tl.constexpr,
                 W: tl.constexpr):
    """Rank ``r``'s contribution to a tile: ``own`` (-0.0 as +0.0) for ``r == RANK``, a volatile
    read of my slot ``[buf][r]`` for a peer, zeros for ``r >= W`` (a padded group member)."""
    if r == RANK:
        v = tl.where(own == 0, tl.zeros_like(own), own)
    elif r < W:
        v = tl.load(mybase + (buf * W + r) * slot_elems + offs, mask=m, other=0.0, volatile=True)
    else:
        v = tl.zeros_like(own)
    return v


@triton.jit
def _lamport_late(v, m, r: tl.constexpr, RANK: tl.constexpr, W: tl.constexpr,
                  ELEM_BITS: tl.constexpr):
    """Bit ``1 << r`` if peer ``r`` still has a sentinel in the tile (a CTA-uniform value)."""
    if r != RANK and r < W:
        n = tl.sum((m & _is_sentinel(v, ELEM_BITS)).to(tl.int32), axis=0)
        late = (n > 0).to(tl.int32) << r
    else:
        late = 0
    return late


@triton.jit
def _lamport_read4(own, mybase, buf, slot_elems, offs, m, g: tl.constexpr, RANK: tl.constexpr,
                   W: tl.constexpr, ELEM_BITS: tl.constexpr):
    """Ranks ``g .. g + 3``: their contributions (reads issued together) and the bitmask of the
    peers among them whose slot still holds a sentinel."""
    v0 = _lamport_get(own, mybase, buf, slot_elems, offs, m, g, RANK, W)
    v1 = _lamport_get(own, mybase, buf, slot_elems, offs, m, g + 1, RANK, W)
    v2 = _lamport_get(own, mybase, buf, slot_elems, offs, m, g + 2, RANK, W)
    v3 = _lamport_get(own, mybase, buf, slot_elems, offs, m, g + 3, RANK, W)
    late = (_lamport_late(v0, m, g, RANK, W, ELEM_BITS)
            | _lamport_late(v1, m, g + 1, RANK, W, ELEM_BITS)
            | _lamport_late(v2, m, g + 2, RANK, W, ELEM_BITS)
            | _lamport_late(v3, m, g + 3, RANK, W, ELEM_BITS))
    return v0, v1, v2, v3, late


@triton.jit
def _lamport_reset(mybase, buf, slot_elems, offs, m, r: tl.constexpr, RANK: tl.constexpr,
                   W: tl.constexpr, BLOCK: tl.constexpr, DT: tl.constexpr,
                   ELEM_BITS: tl.constexpr):
    if r != RANK and r < W:
        tl.store(mybase + (buf * W + r) * slot_elems + offs, _sentinel(BLOCK, DT, ELEM_BITS),
                 mask=m)


@triton.jit
def _lamport_reduce(t, T, H, x_ptr, res_ptr, w_ptr, out_ptr, rout_ptr, q_ptr, scale_ptr, eps,
                    mybase, buf, slot_elems, dead, timeout_ns, state_ptr, host_err, pid, epoch,
                    RANK: tl.constexpr, W: tl.constexpr, NORM: tl.constexpr, FP8: tl.constexpr,
                    BLOCK: tl.constexpr, ELEM_BITS: tl.constexpr, NT: tl.constexpr):
    """Tile ``t``: poll my slots until no sentinel is left, reduce in rank order (fp32), reset
    the slots to the sentinel, write the outputs. Returns the new ``dead`` flag.

    Ranks are taken in groups of four: the four slot reads of a group are issued together and
    polled together, so a group costs one local round trip per poll (W <= 4: one group),
    where one rank at a time cost W - 1 of them."""
    DT: tl.constexpr = x_ptr.dtype.element_ty
    offs, m, k = _tile(t, T, H, NORM, BLOCK)
    # issue the local loads before polling so their latency overlaps the wait
    own = tl.load(x_ptr + offs, mask=m, other=0.0)
    if NORM:
        res_v = tl.load(res_ptr + offs, mask=m, other=0.0)
        w_v = tl.load(w_ptr + k, mask=m, other=0.0)
    acc = tl.zeros([BLOCK], tl.float32)
    for g in tl.static_range(0, W, 4):
        v0, v1, v2, v3, late = _lamport_read4(own, mybase, buf, slot_elems, offs, m, g, RANK,
                                              W, ELEM_BITS)
        if dead == 0:
            if late != 0:
                t0 = globaltimer_uniform(NT)
                while late != 0:
                    v0, v1, v2, v3, late = _lamport_read4(own, mybase, buf, slot_elems, offs, m,
                                                          g, RANK, W, ELEM_BITS)
                    if late != 0:
                        if globaltimer_uniform(NT) - t0 > timeout_ns:
                            record_error(state_ptr, host_err, late, pid, 4 + NORM, epoch,
                                         ERR_OFF)
                            dead = dead | 1
                            late = late * 0
        _lamport_reset(mybase, buf, slot_elems, offs, m, g, RANK, W, BLOCK, DT, ELEM_BITS)
        _lamport_reset(mybase, buf, slot_elems, offs, m, g + 1, RANK, W, BLOCK, DT, ELEM_BITS)
        _lamport_reset(mybase, buf, slot_elems, offs, m, g + 2, RANK, W, BLOCK, DT, ELEM_BITS)
        _lamport_reset(mybase, buf, slot_elems, offs, m, g + 3, RANK, W, BLOCK, DT, ELEM_BITS)
        acc += v0.to(tl.float32)   # rank order; padded members (r >= W) add exact zeros
        if g + 1 < W:
            acc += v1.to(tl.float32)
        if g + 2 < W:
            acc += v2.to(tl.float32)
        if g + 3 < W:
            acc += v3.to(tl.float32)
    if NORM:
        r_v = (acc + res_v.to(tl.float32)).to(DT)
        tl.store(rout_ptr + offs, r_v, mask=m)
        _norm_w(r_v, w_v, offs, m, out_ptr, q_ptr, scale_ptr, eps, H, FP8)
    else:
        tl.store(out_ptr + offs, acc.to(DT), mask=m)
    return dead


@triton.jit(do_not_specialize=["T"])
def lamport_kernel(x_ptr, res_ptr, w_ptr, out_ptr, rout_ptr, q_ptr, scale_ptr, eps, T, H,
                   peers_ptr, lamp_off, slot_elems, state_ptr, host_err_ptr, timeout_ns,
                   RANK: tl.constexpr, W: tl.constexpr, NORM: tl.constexpr, FP8: tl.constexpr,
                   BLOCK: tl.constexpr, CHUNK: tl.constexpr, ELEM_BITS: tl.constexpr,
                   NT: tl.constexpr, PDL: tl.constexpr):
    """Small messages: all pushes first (flat ``CHUNK``s spread over every program, so one
    long row still uses the whole grid), then every tile of this program is polled/reduced."""
    epoch, dead, host_err, tab = _prologue(state_ptr, host_err_ptr, peers_ptr, NT, PDL)
    pid = tl.program_id(0)
    NP = tl.num_programs(0)
    DT: tl.constexpr = x_ptr.dtype.element_ty
    N = T * H
    buf = (epoch % 3).to(tl.int64)
    # 1) push my chunks into every peer's slot [buf][RANK]
    kc = tl.arange(0, CHUNK)
    for c in range(pid, tl.cdiv(N, CHUNK), NP):
        offs = tl.multiple_of(c * CHUNK, CHUNK) + kc
        _lamport_push(x_ptr, tab, lamp_off, buf, slot_elems, offs, offs < N, RANK, W, DT)
    _arrive(state_ptr, epoch)
    # 2) poll my slots, reduce in rank order, reset the slots to the sentinel
    if NORM:
        n_tiles = T
    else:
        n_tiles = tl.cdiv(N, BLOCK)
    mybase = _region(tab, RANK, lamp_off, DT)
    for t in range(pid, n_tiles, NP):
        dead = _lamport_reduce(t, T, H, x_ptr, res_ptr, w_ptr, out_ptr, rout_ptr, q_ptr,
                               scale_ptr, eps, mybase, buf, slot_elems, dead, timeout_ns,
                               state_ptr, host_err, pid, epoch, RANK, W, NORM, FP8, BLOCK,
                               ELEM_BITS, NT)


@triton.jit(do_not_specialize=["T"])
def lamport_rows_kernel(x_ptr, res_ptr, w_ptr, out_ptr, rout_ptr, q_ptr, scale_ptr, eps, T, H,
                        peers_ptr, lamp_off, slot_elems, state_ptr, host_err_ptr, timeout_ns,
                        RANK: tl.constexpr, W: tl.constexpr, NORM: tl.constexpr,
                        FP8: tl.constexpr, BLOCK: tl.constexpr, LAG: tl.constexpr,
                        ELEM_BITS: tl.constexpr, NT: tl.constexpr, PDL: tl.constexpr):
    """Larger messages: software-pipelined Lamport. Program ``p`` owns tiles ``p, p + G, ...``
    on every rank, pushes its tile ``i + LAG`` and then reduces its tile ``i``: the peer's copy
    of tile ``i`` was pushed by the peer's program ``p`` about ``LAG`` iterations earlier, so the
    epilogue of one tile overlaps the NVLink transfer of the next ones."""
    epoch, dead, host_err, tab = _prologue(state_ptr, host_err_ptr, peers_ptr, NT, PDL)
    pid = tl.program_id(0)
    NP = tl.num_programs(0)
    DT: tl.constexpr = x_ptr.dtype.element_ty
    buf = (epoch % 3).to(tl.int64)
    if NORM:
        n_tiles = T
    else:
        n_tiles = tl.cdiv(T * H, BLOCK)
    n_mine = tl.cdiv(n_tiles - pid, NP)  # >= 1: the grid never exceeds the tile count
    for i in tl.static_range(LAG):  # _tile masks tiles past the end
        offs, m, k = _tile(pid + i * NP, T, H, NORM, BLOCK)
        _lamport_push(x_ptr, tab, lamp_off, buf, slot_elems, offs, m, RANK, W, DT)
    mybase = _region(tab, RANK, lamp_off, DT)
    for i in range(0, n_mine):
        offs, m, k = _tile(pid + (i + LAG) * NP, T, H, NORM, BLOCK)
        _lamport_push(x_ptr, tab, lamp_off, buf, slot_elems, offs, m, RANK, W, DT)
        if i == n_mine - 1:
            # the arrive atomic stalls the program for a round trip: take it while the last
            # tile is still in flight anyway, not in front of the pushes
            _arrive(state_ptr, epoch)
        dead = _lamport_reduce(pid + i * NP, T, H, x_ptr, res_ptr, w_ptr, out_ptr, rout_ptr,
                               q_ptr, scale_ptr, eps, mybase, buf, slot_elems, dead, timeout_ns,
                               state_ptr, host_err, pid, epoch, RANK, W, NORM, FP8, BLOCK,
                               ELEM_BITS, NT)
