"""Can a slot claim overlap a row's wait if another warp does it (one GPU, session 28)?

Session 28 measured (``probe_chain_cost.py``, kinds ``atomic_nt_*``) that a thread's volatile
load waits for its own earlier atomic, so in a triton kernel, where every warp holds part of a
received row, the claim and the row's wait stay in series. This probe times one step of a
small-batch receive both ways in Gluon (triton 3.6's ``triton.experimental.gluon``), ``R``
dependent steps in a loop, one program per SM on its own data, ``(t(R) - t(0)) / R``:

* ``row`` / ``claim``: each part alone (a 16 KB row loaded ``volatile`` by the program's 4
  warps and its sign bits counted; 8 slots claimed by relaxed atomics, results used);
* ``serial``: the claim, then the row (its address independent of the claim), the next step's
  addresses depending on both, as a received token's claim and row wait in the dispatch;
* ``split``: a 1-warp worker partition claims the slots and hands them over in shared memory
  (an mbarrier), while the 4-warp default partition loads and counts the row, then waits for the
  slots; the worker's next claim waits for the default partition's step (a second mbarrier).

``split`` near the slower of the two parts says the claim's round trip can be hidden behind the
row's wait by warp specialisation; near their sum that it cannot.

Usage (one GPU): ``python3 benchmarks/probe_ws_claim.py [--steps 64] [--programs 128]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks._common import add_step_probe_args, step_cost, write_probe_json  # noqa: E402


def _kernels():
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier

    @gluon.jit
    def _claim(cnt, pid, s):
        lay: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
        lane = gl.arange(0, 32, layout=lay)
        slot = gl.atomic_add(cnt + pid * 8 + (lane & 7) + (s & 1) * 8, lane * 0 + 1,
                             mask=lane < 8, sem="relaxed", scope="gpu")
        return gl.max(gl.where(lane < 8, slot, 0), axis=0)

    @gluon.jit
    def _row(row_ptr, pid, s, BLOCK: gl.constexpr):
        lay: gl.constexpr = gl.BlockedLayout([8], [32], [gl.num_warps()], [0])
        offs = gl.arange(0, BLOCK, layout=lay)
        r = gl.load(row_ptr + pid * (2 * BLOCK) + (s & 1) * 8 + offs, volatile=True)
        return gl.sum((r < 0).to(gl.int32), axis=0)

    @gluon.jit
    def serial_kernel(cnt, row_ptr, out, R, BLOCK: gl.constexpr):
        pid = gl.program_id(0)
        s = pid * 0
        for i in range(R):
            c = _claim(cnt, pid, i)                        # the claim first, as the dispatch
            n = _row(row_ptr, pid, s, BLOCK)               # the row: independent of the claim
            s = s + (n & 1) + (c & 1)
        gl.store(out + pid, s)

    @gluon.jit
    def row_kernel(cnt, row_ptr, out, R, BLOCK: gl.constexpr):
        pid = gl.program_id(0)
        s = pid * 0
        for _ in range(R):
            s = s + (_row(row_ptr, pid, s, BLOCK) & 1) + 1
        gl.store(out + pid, s)

    @gluon.jit
    def claim_kernel(cnt, row_ptr, out, R, BLOCK: gl.constexpr):
        pid = gl.program_id(0)
        s = pid * 0
        for i in range(R):
            s = s + (_claim(cnt, pid, i + s) & 1)
        gl.store(out + pid, s)

    @gluon.jit
    def _default(row_ptr, out, R, slot_smem, bars, BLOCK: gl.constexpr):
        bar_slot, bar_go = bars
        pid = gl.program_id(0)
        s = pid * 0
        one: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
        for i in range(R):
            n = _row(row_ptr, pid, s, BLOCK)               # overlaps the worker's claim
            mbarrier.wait(bar_slot, i & 1)
            c = gl.max(slot_smem.load(one), axis=0)
            mbarrier.arrive(bar_go, count=1)
            s = s + (n & 1) + (c & 1)
        gl.store(out + pid, s)

    @gluon.jit
    def _worker(cnt, R, slot_smem, bars):
        bar_slot, bar_go = bars
        pid = gl.program_id(0)
        one: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
        for i in range(R):
            mbarrier.wait(bar_go, (i & 1) ^ 1)             # the previous step consumed its slots
            c = _claim(cnt, pid, i)
            slot_smem.store(gl.full([32], 0, gl.int32, layout=one) + c)
            mbarrier.arrive(bar_slot, count=1)

    @gluon.jit
    def split_kernel(cnt, row_ptr, out, R, BLOCK: gl.constexpr):
        slot_smem = gl.allocate_shared_memory(gl.int32, [32], gl.SwizzledSharedLayout(1, 1, 1,
                                                                                      [0]))
        bar_slot = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        bar_go = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(bar_slot, count=1)
        mbarrier.init(bar_go, count=1)
        bars = (bar_slot, bar_go)
        gl.warp_specialize([(_default, (row_ptr, out, R, slot_smem, bars, BLOCK)),
                            (_worker, (cnt, R, slot_smem, bars))], [1], [48])

    return {"row": row_kernel, "claim": claim_kernel, "serial": serial_kernel,
            "split": split_kernel}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_probe_args(ap)
    args = ap.parse_args()

    import torch

    kernels = _kernels()
    G, BLOCK = args.programs, 8192
    cnt = torch.zeros(G * 16, dtype=torch.int32, device="cuda")
    row = torch.randn(G * 2 * BLOCK + 64, device="cuda").to(torch.bfloat16)
    out = torch.empty(G, dtype=torch.int32, device="cuda")
    rows = []
    for name in ("row", "claim", "serial", "split", "serial", "split"):
        kern = kernels[name]
        def run(R, kern=kern):
            kern[(G,)](cnt, row, out, R, BLOCK=BLOCK, num_warps=4)
        res = {"kind": name, **step_cost(run, args.steps, args.iters, args.reps)}
        rows.append(res)
        print(json.dumps(res), flush=True)
    write_probe_json(args, rows, "probe_ws_claim")


if __name__ == "__main__":
    main()
