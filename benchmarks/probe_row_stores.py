"""How fast one program writes a token's expert rows (one GPU, no peers; session 26).

The lamport dispatch's stage stamps (``P2PBackend(_trace=True)``) put the placement of a
received token's ~4 expert rows (hidden 7168 bf16: 14 KB each) at 1.2-1.8 us in one program of
8 warps, the largest step of a one-token dispatch. Whether a second program would halve it
depends on where the limit is: per SM (its store path) or global. This probe writes ``N`` rows
of ``H`` bf16 ``R`` times (into distinct rows each time) from ``P`` programs, the ``N`` rows
split evenly over the programs, and reports the bytes a microsecond: per-SM-limited stores
scale with ``P``, globally limited ones do not. Timed as CUDA-graph replays of 20 launches
(median of 7), less the same kernel with no repetition (launch and row load only).

Usage (one GPU): ``python3 benchmarks/probe_row_stores.py [--hidden 7168] [--reps 64]``.
"""

from __future__ import annotations

import argparse

import triton
import triton.language as tl


@triton.jit
def _rows_kernel(src, dst, H: tl.constexpr, BLOCK_H: tl.constexpr, ROWS: tl.constexpr,
                 REPS: tl.constexpr):
    """Program ``p`` loads row ``p`` of ``src`` once and stores it ``ROWS * REPS`` times into
    its own rows of ``dst`` ([P * ROWS * REPS, H]), ``ROWS`` stores an iteration (as a token's
    placement: the same row into ``ROWS`` expert slots)."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK_H)
    m = offs < H
    row = tl.load(src + pid * H + offs, mask=m)
    base = pid.to(tl.int64) * ROWS * REPS
    for r in range(REPS):
        for k in tl.static_range(ROWS):
            tl.store(dst + (base + r * ROWS + k) * H + offs, row, mask=m)


def main() -> None:
    import torch

    from benchmarks._common import time_graph

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--reps", type=int, default=64)
    ap.add_argument("--warps", type=int, default=8)
    args = ap.parse_args()
    H, R = args.hidden, args.reps
    BLOCK_H = triton.next_power_of_2(H)
    print(f"{torch.cuda.get_device_name()}: rows of {H} bf16 ({2 * H} B), {args.warps} warps "
          f"a program, {R} repetitions")
    for total, programs in ((4, 1), (4, 2), (4, 4), (8, 1), (8, 2), (8, 8), (1, 1)):
        rows = total // programs
        src = torch.randn(programs, H, device="cuda", dtype=torch.bfloat16)
        dst = torch.empty(programs * rows * R, H, device="cuda", dtype=torch.bfloat16)
        launch = lambda: _rows_kernel[(programs,)](src, dst, H, BLOCK_H, rows, R,  # noqa: E731
                                                   num_warps=args.warps)
        launch()
        torch.cuda.synchronize()
        ref = src.repeat_interleave(rows * R, dim=0)
        if not torch.equal(dst, ref):
            raise SystemExit(f"wrong rows at {total} rows on {programs} programs")
        t_r = time_graph(launch, iters=20, reps=7)
        base = lambda: _rows_kernel[(programs,)](src, dst, H, BLOCK_H, rows, 0,  # noqa: E731
                                                 num_warps=args.warps)
        t_0 = time_graph(base, iters=20, reps=7)   # launch and load, no store
        us = t_r - t_0
        nbytes = total * R * 2 * H
        print(f"  {total} rows a token on {programs} program(s) ({rows} each): {us:8.2f} us for "
              f"{R} tokens = {us / R:6.3f} us a token, {nbytes / us / 1e3:6.1f} GB/s "
              f"({nbytes / programs / us / 1e3:6.1f} GB/s a program)", flush=True)


if __name__ == "__main__":
    main()
