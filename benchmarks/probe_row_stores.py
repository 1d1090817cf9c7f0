"""How fast one program writes a token's expert rows (one GPU, no peers; session 26).

The lamport dispatch's stage stamps (``P2PBackend(_trace=True)``) put the placement of a
received token's ~4 expert rows (hidden 7168 bf16: 14 KB each) at 1.2-1.8 us in one program of
8 warps, the largest step of a one-token dispatch. Whether a second program would halve it
depends on where the limit is: per SM (its store path) or global. This probe writes ``N`` rows
of ``H`` bf16 ``R`` times (into distinct rows each time) from ``P`` programs, the ``N`` rows
split evenly over the programs, and reports the bytes a microsecond: per-SM-limited stores
scale with ``P``, globally limited ones do not. Timed as CUDA-graph replays of 20 launches
(median of 7), less the same kernel with no repetition (launch and row load only).

Kinds (``--kinds``, session 29): ``st``, the rows by plain vector stores from registers (as
``_token_place``); ``st_cg`` / ``st_cs`` / ``st_wt`` the same with that cache modifier,
``st_ef`` / ``st_el`` with an ``evict_first`` / ``evict_last`` policy; ``tma``, by a triton tensor descriptor's ``store`` (a TMA bulk copy from
shared memory: triton writes the row into shared memory once and waits for each copy's read of
it before the next); ``tma_gl``, the same in Gluon with the ``ROWS`` copies of a token issued
together and one wait for their reads (the row written into shared memory again every token,
as a receive would). The TMA kinds view the destination as ``[rows, H // 256, 256]`` and store
a ``[1, BLOCK_H // 256, 256]`` box; TMA drops the part outside ``H``.

Usage (one GPU): ``python3 benchmarks/probe_row_stores.py [--hidden 7168] [--reps 64]
[--kinds st,tma,tma_gl]``.
"""

from __future__ import annotations

import argparse

import triton
import triton.language as tl


#: the plain-store kinds: (cache modifier, eviction policy) of the row stores
STORE_HINTS = {"st": ("", ""), "st_cg": (".cg", ""), "st_cs": (".cs", ""), "st_wt": (".wt", ""),
               "st_ef": ("", "evict_first"), "st_el": ("", "evict_last")}


@triton.jit
def _rows_kernel(src, dst, H: tl.constexpr, BLOCK_H: tl.constexpr, ROWS: tl.constexpr,
                 REPS: tl.constexpr, CM: tl.constexpr = "", EVP: tl.constexpr = ""):
    """Program ``p`` loads row ``p`` of ``src`` once and stores it ``ROWS * REPS`` times into
    its own rows of ``dst`` ([P * ROWS * REPS, H]), ``ROWS`` stores an iteration (as a token's
    placement: the same row into ``ROWS`` expert slots), with cache modifier ``CM`` and
    eviction policy ``EVP`` (``""``: the defaults, as ``_token_place``)."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK_H)
    m = offs < H
    row = tl.load(src + pid * H + offs, mask=m)
    base = pid.to(tl.int64) * ROWS * REPS
    for r in range(REPS):
        for k in tl.static_range(ROWS):
            tl.store(dst + (base + r * ROWS + k) * H + offs, row, mask=m, cache_modifier=CM,
                     eviction_policy=EVP)


@triton.jit
def _rows_tma_kernel(src, dst, H: tl.constexpr, BLOCK_H: tl.constexpr, ROWS: tl.constexpr,
                     REPS: tl.constexpr, CW: tl.constexpr):
    """:func:`_rows_kernel` by TMA: ``dst`` a tensor descriptor of ``[rows, H // CW, CW]``
    with the box ``[1, BLOCK_H // CW, CW]``."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK_H)
    row = tl.reshape(tl.load(src + pid * H + offs, mask=offs < H), [1, BLOCK_H // CW, CW])
    base = pid * ROWS * REPS
    for r in range(REPS):
        for k in tl.static_range(ROWS):
            dst.store([base + r * ROWS + k, 0, 0], row)


def _gluon_kernel():
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, tma

    # a CTA barrier: gl.thread_barrier in triton 3.6, gl.barrier from 3.7 on
    thread_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    # a bulk tensor store: tma.async_copy_shared_to_global in 3.6, tma.async_store later
    tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global

    @gluon.jit
    def rows_tma_gluon_kernel(src, dst, H: gl.constexpr, BLOCK_H: gl.constexpr,
                              ROWS: gl.constexpr, REPS: gl.constexpr, CW: gl.constexpr):
        """:func:`_rows_tma_kernel` with a token's ``ROWS`` copies issued together, one wait
        for their reads, the row written into shared memory again each token."""
        NC: gl.constexpr = BLOCK_H // CW
        lay: gl.constexpr = gl.BlockedLayout([1, 1, 8], [1, 1, 32], [1, gl.num_warps(), 1],
                                             [2, 1, 0])
        c = gl.arange(0, NC, layout=gl.SliceLayout(0, gl.SliceLayout(2, lay)))
        w = gl.arange(0, CW, layout=gl.SliceLayout(0, gl.SliceLayout(1, lay)))
        offs = c[None, :, None] * CW + w[None, None, :]
        pid = gl.program_id(0)
        row = gl.load(src + pid * H + offs, mask=offs < H)
        smem = gl.allocate_shared_memory(row.dtype, [1, NC, CW], dst.layout)
        base = pid * ROWS * REPS
        for r in range(REPS):
            smem.store(row)
            fence_async_shared()
            for k in gl.static_range(ROWS):
                tma_store(dst, [base + r * ROWS + k, 0, 0], smem)
            tma.store_wait(0)
            thread_barrier()   # the copies' reads done before the next row is written

    return rows_tma_gluon_kernel


def _launcher(kind, src, dst, H, BLOCK_H, rows, warps):
    """``f(R)``: one launch of ``kind`` storing ``R`` tokens' rows into ``dst`` ([n, H])."""
    if kind in STORE_HINTS:
        cm, evp = STORE_HINTS[kind]
        return lambda R: _rows_kernel[(src.shape[0],)](src, dst, H, BLOCK_H, rows, R, cm, evp,
                                                       num_warps=warps)
    CW = 256
    if H % CW:
        raise SystemExit(f"--hidden {H}: the TMA kinds need a multiple of {CW}")
    shape, strides, box = [dst.shape[0], H // CW, CW], [H, CW, 1], [1, BLOCK_H // CW, CW]
    if kind == "tma":
        from triton.tools.tensor_descriptor import TensorDescriptor
        desc = TensorDescriptor(dst, shape, strides, box)
        kern = _rows_tma_kernel
    else:
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
        desc = TensorDescriptor(dst, shape, strides, box,
                                gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16,
                                                     rank=3))
        kern = _gluon_kernel()
    return lambda R: kern[(src.shape[0],)](src, desc, H, BLOCK_H, rows, R, CW,
                                           num_warps=warps)


def main() -> None:
    import torch

    from benchmarks._common import time_graph

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--reps", type=int, default=64)
    ap.add_argument("--warps", type=int, default=8)
    ap.add_argument("--kinds", default="st",
                    help=f"comma-separated: {', '.join(STORE_HINTS)}, tma, tma_gl")
    args = ap.parse_args()
    H, R = args.hidden, args.reps
    BLOCK_H = triton.next_power_of_2(H)
    print(f"{torch.cuda.get_device_name()}: rows of {H} bf16 ({2 * H} B), {args.warps} warps "
          f"a program, {R} repetitions")
    for kind in args.kinds.split(","):
        for total, programs in ((4, 1), (4, 2), (4, 4), (8, 1), (8, 2), (8, 8), (1, 1)):
            rows = total // programs
            src = torch.randn(programs, H, device="cuda", dtype=torch.bfloat16)
            dst = torch.full((programs * rows * R, H), float("nan"), device="cuda",
                             dtype=torch.bfloat16)
            run = _launcher(kind, src, dst, H, BLOCK_H, rows, args.warps)
            run(R)
            torch.cuda.synchronize()
            ref = src.repeat_interleave(rows * R, dim=0)
            if not torch.equal(dst, ref):
                raise SystemExit(f"{kind}: wrong rows at {total} rows on {programs} programs")
            t_r = time_graph(lambda: run(R), iters=20, reps=7)
            t_0 = time_graph(lambda: run(0), iters=20, reps=7)   # launch and load, no store
            us = t_r - t_0
            nbytes = total * R * 2 * H
            print(f"  {kind:6s} {total} rows a token on {programs} program(s) ({rows} each): "
                  f"{us:8.2f} us for {R} tokens = {us / R:6.3f} us a token, "
                  f"{nbytes / us / 1e3:6.1f} GB/s ({nbytes / programs / us / 1e3:6.1f} GB/s a "
                  "program)", flush=True)

if __name__ == "__main__":
    main()
