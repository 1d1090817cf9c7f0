"""What one dependent step of a small-batch kernel costs on this GPU (one GPU, no peers).

The lamport one-token dispatch spends ~5 us above a launch and one NVLink hop (docs/moe.md, "Why
the targets are missed"): a chain of dependent steps, each a few hundred ns. This probe prices
the kinds of step that chain is made of, so that a rewrite (Gluon, warp-specialised) can be
budgeted before it is written. Each kernel runs ``R`` dependent steps of one kind in a loop
(every step needs the last one's result) in ``G`` programs of ``W`` warps; a step costs
``(t(R) - t(0)) / R``. Kinds:

* ``alu``: a scalar multiply-add (the loop's own cost);
* ``sum8``: ``tl.sum`` over an int32 ``[8]`` vector (a token's top-k ids), as the kernels'
  masks and counts do;
* ``pick8``: element ``k`` of an ``[8]`` vector as a scalar (``tl.max(tl.where(offs == k,
  ...))``), as the one-token place step does for each of its K slots;
* ``all_threads``: :func:`llmcomm.kernels.sync.every_thread_max` (a reduction over every
  thread of the program), as the one-token poll does on every spin;
* ``barrier``: ``tl.debug_barrier()``;
* ``load_l1``: a dependent scalar load that hits (``buf[s & 7]``);
* ``load_volatile``: the same load ``volatile`` (goes to L2, as a poll's does);
* ``atomic8``: a relaxed ``[8]`` vector ``atomic_add`` whose results are used (the slot claim),
  on a program's own counters (plus a ``tl.max`` over its ``[8]`` result);
* ``first8``: the first position of each id among the token's ``[8]`` ids (an ``[8, 8]``
  compare and a min over one axis, as ``_token_masks`` finds repeated ids);
* ``row_sum``: a count over a ``[BLOCK_H]`` row (8192 elements), as a poll counts the
  sentinels left in a row;
* ``load_volatile_own``: ``load_volatile`` on an address of the program's own (every program
  above loads the same few), as a poll of a program's own count slot;
* ``poll_row``: one spin of a row poll: the program's own ``[BLOCK_H]`` row loaded
  ``volatile`` (16-byte vectors, as the kernels' row polls compile), its sentinels counted (the
  next address depends on the count).

Does a volatile load wait for an earlier atomic of the same thread (session 28: a received
token's slot claim issued before the wait for its row never overlapped that wait)? Three kinds
with one atomic a thread for the first 8 threads of an ``[NT]`` vector (no replication, so no
broadcast right after the atomic) and a reduction over ``[NT]`` at the step's end:

* ``nt_vload``: a dependent volatile load of the program's own, then the reduction (no atomic);
* ``atomic_nt_vload``: the atomic, then the same load, then the reduction over the atomic's
  results (nothing waits for the atomic before the load is issued);
* ``atomic_nt_then_vload``: the atomic, the reduction over its results, then the load (in
  series by construction).

``atomic_nt_vload`` near ``nt_vload`` says the load overlaps the atomic's round trip; near
``atomic_nt_then_vload`` that the load waits for it.

CUDA-graph replays of ``--iters`` launches, median of ``--reps``. Usage (one GPU):
``python3 benchmarks/probe_chain_cost.py [--warps 8,16] [--steps 64] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks._common import add_step_probe_args, step_cost, write_probe_json  # noqa: E402

KINDS = ("alu", "sum8", "pick8", "all_threads", "barrier", "load_l1", "load_volatile",
         "atomic8", "first8", "row_sum", "load_volatile_own", "poll_row", "nt_vload",
         "atomic_nt_vload", "atomic_nt_then_vload")


def _kernel():
    import triton
    import triton.language as tl

    from llmcomm.kernels.sync import every_thread_max, pdl_launch_dependents, pdl_wait

    @triton.jit
    def chain_kernel(buf, cnt, row_ptr, out, R, KIND: tl.constexpr, BLOCK_K: tl.constexpr,
                     NT: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr = False):
        if PDL:   # as the kernels' PDL variant: nothing is touched before the previous grid ends
            pdl_wait()
            pdl_launch_dependents()
        pid = tl.program_id(0)
        offs = tl.arange(0, BLOCK_K)
        v = tl.load(buf + offs)
        if KIND == 9:
            row = tl.load(row_ptr + tl.arange(0, BLOCK_H))
        s = tl.load(buf + BLOCK_K + pid % BLOCK_K)
        for _ in range(R):
            if KIND == 0:
                s = s * 1664525 + 1013904223
            elif KIND == 1:
                s = tl.sum(v ^ s, axis=0)
            elif KIND == 2:
                s = tl.max(tl.where(offs == (s & (BLOCK_K - 1)), v ^ s, -2147483648), axis=0)
            elif KIND == 3:
                s = every_thread_max(s ^ 5, NT, True)
            elif KIND == 4:
                tl.debug_barrier()
                s = s * 1664525 + 1013904223
            elif KIND == 5:
                s = tl.load(buf + (s & (BLOCK_K - 1)))
            elif KIND == 6:
                s = tl.load(buf + (s & (BLOCK_K - 1)), volatile=True)
            elif KIND == 7:
                slot = tl.atomic_add(cnt + pid * BLOCK_K + offs, (s & 1) + offs * 0,
                                     sem="relaxed", scope="gpu")
                s = tl.max(slot, axis=0) & 7
            elif KIND == 8:
                ids = v ^ (s & 3)
                same = ids[:, None] == ids[None, :]
                first = tl.min(tl.where(same, offs[None, :], BLOCK_K), axis=1)
                s = tl.sum(first ^ s, axis=0)
            elif KIND == 9:
                s = tl.sum(((row ^ s) < 0).to(tl.int32), axis=0)
            elif KIND == 10:
                s = tl.load(row_ptr + pid * 64 + (s & (BLOCK_K - 1)), volatile=True)
            elif KIND >= 12:   # one atomic a thread for the first BLOCK_K threads of [NT]
                i = tl.arange(0, NT)
                own = row_ptr + pid * 64 + (s & (BLOCK_K - 1))
                if KIND == 12:
                    s = tl.load(own, volatile=True)
                    s = s + (tl.max(i * 0 + s, axis=0) & 1)
                else:
                    slot = tl.atomic_add(cnt + pid * BLOCK_K + (i & (BLOCK_K - 1)), i * 0 + 1,
                                         mask=i < BLOCK_K, sem="relaxed", scope="gpu")
                    if KIND == 13:
                        s = tl.load(own, volatile=True)
                        s = s + (tl.max(tl.where(i < BLOCK_K, slot, 0), axis=0) & 1)
                    else:
                        s = s + (tl.max(tl.where(i < BLOCK_K, slot, 0), axis=0) & 1)
                        s = tl.load(row_ptr + pid * 64 + (s & (BLOCK_K - 1)), volatile=True)
            else:
                r = tl.load(row_ptr + pid * BLOCK_H + (s & 1) * 16 + tl.arange(0, BLOCK_H),
                            volatile=True)
                s = tl.sum((r < 0).to(tl.int32), axis=0)
        tl.store(out + pid, s)

    return chain_kernel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--warps", default="8,16")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--pdl", action="store_true",
                    help="launch with programmatic dependent launch (the kernel waits for the "
                         "previous grid first, as the p2p kernels' PDL variant): t(0) is then "
                         "the cost of a launch that overlaps the previous kernel's tail")
    add_step_probe_args(ap)
    args = ap.parse_args()
    unknown = [k for k in args.kinds.split(",") if k not in KINDS]
    if unknown:
        raise SystemExit(f"unknown --kinds {unknown}; expected some of {list(KINDS)}")

    import torch

    kern = _kernel()
    G, K = args.programs, 8
    buf = torch.randint(0, 1 << 20, (2 * K,), dtype=torch.int32, device="cuda")
    buf[K:] = torch.arange(K, dtype=torch.int32, device="cuda")   # starting values, not 0
    cnt = torch.zeros(G * K, dtype=torch.int32, device="cuda")
    row = torch.randint(-(1 << 30), 1 << 30, (G * 8192 + 16,), dtype=torch.int32, device="cuda")
    out = torch.empty(G, dtype=torch.int32, device="cuda")
    rows = []
    for warps in [int(w) for w in args.warps.split(",")]:
        for i, kind in enumerate(KINDS):
            if kind not in args.kinds.split(","):
                continue

            def run(R, i=i, warps=warps):
                kern[(G,)](buf, cnt, row, out, R, KIND=i, BLOCK_K=K, NT=32 * warps,
                           BLOCK_H=8192, PDL=args.pdl, num_warps=warps,
                           **({"launch_pdl": True} if args.pdl else {}))
            res = {"warps": warps, "kind": kind, "pdl": args.pdl,
                   **step_cost(run, args.steps, args.iters, args.reps)}
            rows.append(res)
            print(json.dumps(res), flush=True)
    write_probe_json(args, rows, "probe_chain_cost")


if __name__ == "__main__":
    main()
