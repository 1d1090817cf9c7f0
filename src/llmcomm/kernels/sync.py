"""Inline-PTX helpers for cross-GPU synchronisation from Triton (stock Triton 3.4+).

Triton's ``tl.load``/``tl.store`` have no system-scope acquire/release and ``tl.atomic_*`` always
returns a value (an NVLink round trip for a remote flag). These helpers emit the exact PTX:

* ``ld_acquire_sys(ptrs, mask) -> int32``: ``ld.acquire.sys.global.b32`` where ``mask``, else 0.
* ``st_release_sys(ptrs, vals, mask)``: ``st.release.sys.global.b32`` where ``mask`` (posted, no
  round trip; it orders every earlier write of the thread -- and, after ``tl.debug_barrier()``,
  of the CTA -- before the flag at system scope).
* ``globaltimer_uniform(NT) -> int64``: ``%globaltimer`` in nanoseconds (spin-wait deadlines),
  the same value in every thread of the program (see below); ``globaltimer_threads(NT)``: each
  thread's own read, int64 [NT] (trace stamps).
* ``load_uniform(ptr, mask, other, NT)``: one volatile scalar load every thread sees alike.
* ``uniform(x, NT)``: thread 0's value of a scalar computed from volatile loads, handed to every
  thread (the MoE ``"lamport"`` polls; see below).
* ``every_thread_max(x, NT, GPU)``: the largest value a scalar has in any thread, handed to
  every thread (a poll that may use what it loaded only once every thread's copy has landed).
* ``wait_flags(...)``: spin until every selected flag reached ``target`` (wrap-safe int32
  comparison) or the deadline passed; on expiry write an error record (see below) and return.
* ``spin_landed(v, ptrs, mask, ...)``: each thread spins on its own elements of a lamport
  buffer until none is the sentinel (no reduction, no barrier inside the loop), with its own
  deadline; see its docstring. ``spin_equal(ptr, target, ...)``: the same per-thread spin (by
  acquire loads) until one local int32 equals ``target``.

Triton treats a scalar as uniform across the threads of a program, but a volatile scalar load
(or a timer read) is executed by every thread, and while a peer's write is landing some threads
can see the old value and others the new one: a loop or branch on it then diverges inside the
program (and its reductions and barriers no longer match). Every value a spin loop branches on
must come from a reduction (``tl.sum``/``tl.max``), which hands every thread the same result;
``load_uniform`` and ``globaltimer_uniform`` do that for one scalar.

Use one element per thread (a tensor of ``32 * num_warps`` elements) so no thread duplicates a
remote store. Error record layout (int32), shared by every kernel of :mod:`.allreduce`::

    rec[0] = 1 once any wait timed out        rec[1] |= bitmask of group ranks that did not arrive
    rec[2] = program id that timed out        rec[3] = phase code (1..9) of that wait
    rec[4] = the call epoch (sequence number) of that call
"""

import triton
import triton.language as tl


def _spin_asm(bits: int, pack: int) -> tuple[str, str]:
    """PTX and constraints of :func:`spin_landed` for ``pack`` elements of ``bits`` (16 or 32)
    a thread: the values already loaded, then for each element its address and mask, the
    timeout, the error flag's address, the host mirror's address and the error code (every
    argument is per element: inline asm takes no scalars; the loop uses element 0's)."""
    regs = pack * bits // 32                 # 16-bit values come packed two to a register
    val = [f"${regs + j}" for j in range(regs)]
    base = 2 * regs
    ptr = [f"${base + i}" for i in range(pack)]
    msk = [f"${base + pack + i}" for i in range(pack)]
    tmo, errd, errh, code = (f"${base + k * pack}" for k in (2, 3, 4, 5))
    t = "b16" if bits == 16 else "b32"
    sent = "0x8000" if bits == 16 else "0x80000000"
    a = ["{", f".reg .pred %m<{pack}>;", ".reg .pred %q, %w;", f".reg .{t} %h<{pack}>;",
         ".reg .u32 %n, %e;", ".reg .u64 %t0, %t1;"]
    if bits == 16:
        a += [f"mov.b32 {{%h{2 * j}, %h{2 * j + 1}}}, {val[j]};" for j in range(regs)]
    else:
        a += [f"mov.b32 %h{j}, {val[j]};" for j in range(regs)]
    a += [f"setp.ne.s32 %m{i}, {msk[i]}, 0;" for i in range(pack)]
    a += ["mov.u32 %n, 0;", "mov.u64 %t0, 0;", "bra.uni CHECK;", "SPIN:"]
    a += [f"@%m{i} ld.volatile.global.{t} %h{i}, [{ptr[i]}];" for i in range(pack)]
    a += ["CHECK:", f"setp.eq.and.{t} %q, %h0, {sent}, %m0;"]
    for i in range(1, pack):
        a += [f"setp.eq.and.{t} %w, %h{i}, {sent}, %m{i};", "or.pred %q, %q, %w;"]
    a += ["@!%q bra DONE;"] + _deadline_asm("SPIN", tmo, errd, errh, code)
    a += ["FAIL:", f"st.volatile.global.b32 [{errd}], {code};",
          f"st.volatile.global.b32 [{errh}], {code};", "DONE:"]
    if bits == 16:
        a += [f"mov.b32 ${j}, {{%h{2 * j}, %h{2 * j + 1}}};" for j in range(regs)]
    else:
        a += [f"mov.b32 ${j}, %h{j};" for j in range(regs)]
    a += ["}"]
    cons = ["=r"] * regs + ["r"] * regs + ["l"] * pack + ["r"] * pack + ["l"] * (3 * pack) + \
        ["r"] * pack
    return "\n".join(a), ",".join(cons)


def _deadline_asm(again: str, tmo: str, errd: str, errh: str, code: str) -> list[str]:
    """Lines of a spin's check: every 64th spin read the timer (the deadline counts from the
    first read) and this rank's error flag; past the deadline record ``code`` (both copies)
    and leave (``DONE``), with the flag set leave, else branch to ``again``."""
    return ["add.u32 %n, %n, 1;", "and.b32 %e, %n, 63;", "setp.ne.u32 %w, %e, 0;",
            f"@%w bra {again};", "mov.u64 %t1, %globaltimer;", "setp.eq.u64 %w, %t0, 0;",
            "@%w mov.u64 %t0, %t1;", "sub.u64 %t1, %t1, %t0;", f"setp.gt.s64 %w, %t1, {tmo};",
            "@%w bra FAIL;", f"ld.volatile.global.b32 %e, [{errd}];", "setp.ne.s32 %w, %e, 0;",
            "@%w bra DONE;", f"bra {again};"]


def _meta_asm() -> tuple[str, str]:
    """PTX of :func:`spin_meta`, one element a thread: outputs id, weight bits, count;
    inputs id address, weight address, mask, count address, need, known count, token, timeout,
    error flag address, host mirror address, error code."""
    ids, wb, km, cnt, need, known, c, tmo, errd, errh, code = (f"${3 + i}" for i in range(11))
    a = ["{", ".reg .pred %w, %km;", ".reg .b32 %ts, %a, %b, %e;", ".reg .u32 %n;",
         ".reg .u64 %t0, %t1;", "mov.u32 %n, 0;", "mov.u64 %t0, 0;", "mov.b32 %a, -1;",
         "mov.b32 %b, 0;", f"mov.b32 %ts, {known};", f"setp.ne.s32 %w, {need}, 0;",
         "@!%w bra META;", "CNT:", f"ld.volatile.global.b32 %ts, [{cnt}];",
         "setp.ne.b32 %w, %ts, 0x80000000;", "@%w bra META;"]
    a += _deadline_asm("CNT", tmo, errd, errh, code)
    a += ["META:", f"setp.ne.s32 %km, {km}, 0;", f"setp.lt.and.s32 %km, {c}, %ts, %km;",
          "@!%km bra DONE;", "MSPIN:", f"ld.volatile.global.b32 %a, [{ids}];",
          f"ld.volatile.global.b32 %b, [{wb}];", "setp.eq.b32 %w, %a, 0x80000000;",
          "setp.eq.or.b32 %w, %b, 0x80000000, %w;", "@!%w bra DONE;"]
    a += _deadline_asm("MSPIN", tmo, errd, errh, code)
    a += ["FAIL:", f"st.volatile.global.b32 [{errd}], {code};",
          f"st.volatile.global.b32 [{errh}], {code};", "DONE:", "mov.b32 $0, %a;",
          "mov.b32 $1, %b;", "mov.b32 $2, %ts;", "}"]
    return "\n".join(a), "=r,=r,=r,l,l,r,l,r,r,r,l,l,l,r"


def _equal_asm() -> tuple[str, str]:
    """PTX of :func:`spin_equal`, one element a thread: output the value seen; inputs the
    flag's address, the target, timeout, error flag address, host mirror address, error
    code."""
    ptr, tgt, tmo, errd, errh, code = (f"${1 + i}" for i in range(6))
    a = ["{", ".reg .pred %q, %w;", ".reg .b32 %v, %e;", ".reg .u32 %n;", ".reg .u64 %t0, %t1;",
         "mov.u32 %n, 0;", "mov.u64 %t0, 0;", "SPIN:", f"ld.acquire.gpu.global.b32 %v, [{ptr}];",
         f"setp.eq.s32 %q, %v, {tgt};", "@%q bra DONE;"]
    a += _deadline_asm("SPIN", tmo, errd, errh, code)
    a += ["FAIL:", f"st.volatile.global.b32 [{errd}], {code};",
          f"st.volatile.global.b32 [{errh}], {code};", "DONE:", "mov.b32 $0, %v;", "}"]
    return "\n".join(a), "=r,l,r,l,l,l,r"


_SMETA, _CMETA = (tl.constexpr(x) for x in _meta_asm())
_SEQ, _CEQ = (tl.constexpr(x) for x in _equal_asm())
# module-level constexpr strings: a jit function can pass only those to inline asm
(_S16_2, _C16_2), (_S16_4, _C16_4), (_S16_8, _C16_8) = (
    tuple(map(tl.constexpr, _spin_asm(16, p))) for p in (2, 4, 8))
(_S32_1, _C32_1), (_S32_2, _C32_2), (_S32_4, _C32_4) = (
    tuple(map(tl.constexpr, _spin_asm(32, p))) for p in (1, 2, 4))


@triton.jit
def globaltimer_threads(NT: tl.constexpr):
    """``%globaltimer`` (ns) as each thread reads it: int64 [NT], one element a thread, no
    reduction (so no barrier: a trace stamp that does not hold the program back)."""
    i = tl.arange(0, NT)
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer; // $1", "=l,r", [i],
                                     dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def globaltimer_uniform(NT: tl.constexpr):
    """``%globaltimer`` (ns), the same value in every thread (max over the threads' reads)."""
    return tl.max(globaltimer_threads(NT), axis=0)


@triton.jit
def load_uniform(ptr, mask, other, NT: tl.constexpr):
    """Volatile load of the scalar ``*ptr`` (``other`` where not ``mask``) by one thread, handed
    to every thread of the program through a reduction, so a branch on it is uniform."""
    i = tl.arange(0, NT)
    m = (i == 0) & ((i * 0 + mask) != 0)  # a full vector (the interpreter rejects a 0-d mask)
    v = tl.load(ptr + i * 0, mask=m, other=other, volatile=True)
    return tl.sum(tl.where(i == 0, v, 0), axis=0)


@triton.jit
def uniform(x, NT: tl.constexpr):
    """Thread 0's value of the scalar ``x``, handed to every thread of the program (a reduction
    over an ``NT``-vector, so it goes through shared memory and a barrier).

    A scalar computed from volatile loads is *not* uniform on a GPU even when every step looks
    scalar: a small tensor (e.g. ``[TB, BLOCK_K]``) is replicated over many threads, each replica
    issues its own volatile load (and the compiler may even duplicate the load into several
    layouts), and reductions over replicated dimensions stay per warp. Every value a loop or
    branch depends on must come through here (or ``load_uniform`` / ``globaltimer_uniform``)."""
    i = tl.arange(0, NT)
    return tl.sum(tl.where(i == 0, x, 0), axis=0)


@triton.jit
def every_thread_max(x, NT: tl.constexpr, GPU: tl.constexpr):
    """The largest value the int32 scalar ``x`` has in any thread of the program, handed to
    every thread (a reduction over an ``NT``-vector of the threads' own values).

    Unlike :func:`uniform` (thread 0's value), a zero here says that *every* thread's ``x`` was
    zero: a pending-count computed from each thread's own copies of replicated volatile loads,
    reduced this way, ends a poll only once every copy any thread holds has landed. On the GPU
    the vector goes through an opaque ``mov``, so the compiler cannot treat it as a splat of a
    uniform scalar; ``GPU=False`` (the interpreter, one thread a program) skips it."""
    i = tl.arange(0, NT)
    v = x + i * 0
    if GPU:
        v = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [v], dtype=tl.int32,
                                      is_pure=False, pack=1)
    return tl.max(v, axis=0)


@triton.jit
def ld_acquire_sys(ptrs, mask):
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.s32 p, $2, 0; mov.u32 $0, 0; "
        "@p ld.acquire.sys.global.b32 $0, [$1]; }",
        "=r,l,r", [ptrs, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def st_release_sys(ptrs, vals, mask):
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.s32 p, $3, 0; "
        "@p st.release.sys.global.b32 [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r,r", [ptrs, vals.to(tl.int32), mask.to(tl.int32)], dtype=tl.int32,
        is_pure=False, pack=1)


@triton.jit
def record_error(state_ptr, host_err_ptr, missing_bits, pid, phase, epoch,
                 ERR_OFF: tl.constexpr):
    """Write the error record into device ``state[ERR_OFF:]`` and the pinned host mirror."""
    tl.atomic_or(state_ptr + ERR_OFF + 1, missing_bits, sem="relaxed", scope="gpu")
    tl.atomic_xchg(state_ptr + ERR_OFF + 2, pid, sem="relaxed", scope="gpu")
    tl.atomic_xchg(state_ptr + ERR_OFF + 3, phase, sem="relaxed", scope="gpu")
    tl.atomic_xchg(state_ptr + ERR_OFF + 4, epoch, sem="relaxed", scope="gpu")
    tl.atomic_xchg(state_ptr + ERR_OFF + 0, 1, sem="release", scope="gpu")
    one = tl.full([1], 1, tl.int32)
    k = tl.arange(0, 1)
    hp = host_err_ptr + k
    st_release_sys(hp + 1, one * missing_bits, one)
    st_release_sys(hp + 2, one * pid, one)
    st_release_sys(hp + 3, one * phase, one)
    st_release_sys(hp + 4, one * epoch, one)
    st_release_sys(hp + 0, one, one)


@triton.jit
def wait_flags(flag_ptrs, peer_idx, mask, target, dead, timeout_ns, state_ptr, host_err_ptr,
               pid, phase, epoch, ERR_OFF: tl.constexpr):
    """Spin until ``flag >= target`` (int32, wrap-safe) for every masked element.

    ``flag_ptrs``, ``peer_idx``, ``mask``: one element per thread of the program (``32 *
    num_warps``), so the deadline timer read over them is uniform too. Returns the new ``dead``
    flag (1 when this or an earlier wait gave up). With ``dead`` already set it returns at once:
    after a timeout nothing waits again, so no call can hang.
    """
    NT: tl.constexpr = peer_idx.shape[0]
    d = ld_acquire_sys(flag_ptrs, mask) - target
    pending = tl.sum((mask & (d < 0)).to(tl.int32), axis=0)
    if dead == 0:
        if pending > 0:
            t0 = globaltimer_uniform(NT)
            while pending > 0:
                d = ld_acquire_sys(flag_ptrs, mask) - target
                pending = tl.sum((mask & (d < 0)).to(tl.int32), axis=0)
                if pending > 0:
                    if globaltimer_uniform(NT) - t0 > timeout_ns:
                        one = tl.full(peer_idx.shape, 1, tl.int32)
                        bits = tl.sum(tl.where(mask & (d < 0), one << peer_idx, 0), axis=0)
                        record_error(state_ptr, host_err_ptr, bits, pid, phase, epoch, ERR_OFF)
                        dead = dead | 1
                        pending = pending * 0
    tl.debug_barrier()
    return dead


@triton.jit
def pdl_wait():
    """``griddepcontrol.wait`` (sm_90+): wait until the previous grid finished and its writes
    are visible. Must precede every global memory access of a kernel launched with PDL."""
    tl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def pdl_launch_dependents():
    """``griddepcontrol.launch_dependents`` (sm_90+): the next PDL grid may start its launch."""
    tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def spin_landed(v, ptrs, mask, timeout_ns, err_dev, err_host, code, BITS: tl.constexpr,
                NT: tl.constexpr):
    """``v`` (a volatile load of ``ptrs`` where ``mask``) once no masked element is the
    lamport sentinel (``BITS`` 16 or 32): each thread re-loads only its own elements, in a
    loop of inline PTX with no reduction and no barrier, until none of its own is the
    sentinel. Reference semantics::

        while any(is_sentinel(v[i]) for i in my_elements if mask[i]):
            v[my_elements] = volatile_load(ptrs[my_elements])

    Against a poll that reduces a pending count over the program every spin (two reductions,
    each a barrier: ~0.27 us a spin at 8 warps, session 19), a spin here is one load. Every
    thread checks exactly the copies it returns, so a replicated layout needs no re-read; but
    the threads leave at different times: the caller puts a barrier before anything that
    another thread's elements depend on (a reset store of another layout).

    Every 64th spin a thread reads ``%globaltimer`` (the deadline counts from the first such
    read, ``timeout_ns`` after it) and this rank's error flag ``*err_dev``: past the deadline
    it stores ``code`` at ``err_dev`` and at the pinned host mirror ``err_host`` and leaves;
    a flag already set (another program gave up) ends it too. Either way the elements still
    pending come back as the sentinel, and the launcher raises at its next check. Elements a thread holds: ``ptrs.numel // NT`` (at most 8 for 16-bit, 4 for 32-bit,
    a power of 2, >= 2 for 16-bit); a larger tile is handled in several groups, one after the
    other. GPU only (inline PTX); ``v``'s layout is the one the load gave ``ptrs``, so the asm
    needs no layout conversion (a conversion would make the compiler duplicate it)."""
    PER: tl.constexpr = ptrs.numel // NT
    z = ptrs.to(tl.int64) * 0
    args = [ptrs.to(tl.int64), mask.to(tl.int32), timeout_ns + z, err_dev.to(tl.int64) + z,
            err_host.to(tl.int64) + z, (code + z).to(tl.int32)]
    # one call per branch: triton turns a constexpr string bound to a local into a tensor
    if BITS == 16:
        vi = v.to(tl.int16, bitcast=True)
        if PER >= 8:
            r = tl.inline_asm_elementwise(_S16_8, _C16_8, [vi] + args, dtype=tl.int16,
                                          is_pure=False, pack=8)
        elif PER == 4:
            r = tl.inline_asm_elementwise(_S16_4, _C16_4, [vi] + args, dtype=tl.int16,
                                          is_pure=False, pack=4)
        else:
            r = tl.inline_asm_elementwise(_S16_2, _C16_2, [vi] + args, dtype=tl.int16,
                                          is_pure=False, pack=2)
    else:
        vi = v.to(tl.int32, bitcast=True)
        if PER >= 4:
            r = tl.inline_asm_elementwise(_S32_4, _C32_4, [vi] + args, dtype=tl.int32,
                                          is_pure=False, pack=4)
        elif PER == 2:
            r = tl.inline_asm_elementwise(_S32_2, _C32_2, [vi] + args, dtype=tl.int32,
                                          is_pure=False, pack=2)
        else:
            r = tl.inline_asm_elementwise(_S32_1, _C32_1, [vi] + args, dtype=tl.int32,
                                          is_pure=False, pack=1)
    return r.to(v.dtype, bitcast=True)


@triton.jit
def spin_equal(ptr, target, timeout_ns, err_dev, err_host, code, NT: tl.constexpr):
    """Each thread spins, on its own, until the int32 at ``ptr`` (this GPU's memory) equals
    ``target``, by ``ld.acquire.gpu`` loads (inline PTX, no reduction, no barrier): every
    thread's later memory operations are ordered after the write it saw (the writer releases
    it after its own writes). Reference semantics, per thread::

        while acquire_load(ptr) != target: pass

    Deadline and error flag as :func:`spin_landed` (``code`` recorded past it; the thread
    then goes on and the launcher raises at its next check). Returns the values seen, int32
    [NT]; GPU only."""
    i = tl.arange(0, NT)
    z = i.to(tl.int64) * 0
    return tl.inline_asm_elementwise(
        _SEQ, _CEQ, [(ptr + i * 0).to(tl.int64), (target + i * 0).to(tl.int32),
                     timeout_ns + z, err_dev.to(tl.int64) + z, err_host.to(tl.int64) + z,
                     (code + i * 0).to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def spin_meta(ids_ptrs, wb_ptrs, mask, cnt_ptr, need, ts_known, c, timeout_ns, err_dev,
              err_host, code):
    """A lamport receive's count and meta, each thread spinning on its own copies (inline PTX,
    no reduction in the loop; the per-thread counterpart of a program-wide count + meta poll).
    Reference semantics, per thread, for its elements ``k`` of ``ids_ptrs`` / ``wb_ptrs``
    ([BLOCK_K] int32, replicated over the threads)::

        ts = spin_until_landed(cnt_ptr) if need else ts_known
        if c < ts and mask[k]:
            ids[k], wb[k] = spin_until_landed(ids_ptrs[k], wb_ptrs[k])
        else:
            ids[k], wb[k] = -1, 0
        return ids, wb, ts (per element)

    Every thread holds only values it saw land, so any reduction over the results is uniform.
    The deadline and error flag as :func:`spin_landed`; what timed out comes back as the
    sentinel (``ts`` and the meta), for the caller's one reduction to see."""
    z = ids_ptrs.to(tl.int64) * 0
    i32 = tl.zeros(ids_ptrs.shape, tl.int32)
    return tl.inline_asm_elementwise(
        _SMETA, _CMETA,
        [ids_ptrs.to(tl.int64), wb_ptrs.to(tl.int64), mask.to(tl.int32),
         cnt_ptr.to(tl.int64) + z, need.to(tl.int32) + i32, ts_known + i32, c + i32,
         timeout_ns + z, err_dev.to(tl.int64) + z, err_host.to(tl.int64) + z, code + i32],
        dtype=(tl.int32, tl.int32, tl.int32), is_pure=False, pack=1)
