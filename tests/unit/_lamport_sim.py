"""Run the Lamport allreduce kernels of one rank under TRITON_INTERPRET=1 on the CPU.

The peers are simulated: their pushes are written into this rank's receive slots beforehand
(as their kernels would), and this rank's pushes land in CPU tensors standing for the peers'
slots. Prints one JSON line per case. Used by ``test_lamport_sim.py`` in a subprocess (the
interpreter must be chosen before triton is imported).
"""

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from llmcomm.allreduce.p2p import LaunchTable, launch_plan  # noqa: E402
from llmcomm.kernels import allreduce as K  # noqa: E402


def case(T, H, norm, rows, lag, W, rank, grid_cap, epoch):
    g = torch.Generator().manual_seed(T * 7919 + H * 31 + W)
    slot = -(-T * H // 256) * 256
    sentinel = -(2 ** 31)
    lamp = [torch.full((3 * W * slot,), sentinel, dtype=torch.int32) for _ in range(W)]
    bases = torch.tensor([s.data_ptr() for s in lamp], dtype=torch.int64)
    xs = [torch.randn(T, H, generator=g) for _ in range(W)]
    xs[(rank + 1) % W][0, :3] = -0.0          # -0.0 must travel as +0.0
    res, w = torch.randn(T, H, generator=g), torch.rand(H, generator=g) + 0.5
    buf = epoch % 3
    for r in range(W):   # the peers' pushes into my slots [buf][r]
        if r != rank:
            v = xs[r].clone()
            v[v == 0] = 0.0
            lamp[rank].view(torch.float32)[(buf * W + r) * slot:][:T * H] = v.flatten()
    out = torch.full((T, H), float("nan"))
    rout = torch.full((T, H), float("nan"))
    state = torch.zeros(16, dtype=torch.int32)
    state[0] = epoch
    host_err = torch.zeros(8, dtype=torch.int32)
    table = LaunchTable(lamport_rows_min_tiles=1 if rows else 0, lamport_lag=lag,
                        flat_block=256)
    plan = launch_plan("lamport", norm, T, H, 4, W, table)
    common = (xs[rank], res, w, out, rout, torch.empty(1), torch.ones(1), 1e-6, T, H,
              bases.data_ptr())
    meta = dict(RANK=rank, W=W, NORM=norm, FP8=False, BLOCK=plan["block"], PDL=False,
                NT=32 * plan["num_warps"])
    grid = (min(plan["grid"], grid_cap),)
    if rows:
        K.lamport_rows_kernel[grid](*common, 0, slot, state, host_err.data_ptr(), 10 ** 9,
                                    LAG=lag, ELEM_BITS=32, **meta)
    else:
        K.lamport_kernel[grid](*common, 0, slot, state, host_err.data_ptr(), 10 ** 9,
                               CHUNK=plan["chunk"], ELEM_BITS=32, **meta)
    s = xs[0].double()
    for r in range(1, W):
        s = s + xs[r].double()
    if norm:
        r_ = s + res.double()
        n = r_ * torch.rsqrt(r_.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
        err = max(((rout.double() - r_).norm() / r_.norm()).item(),
                  ((out.double() - n).norm() / n.norm()).item())
    else:
        err = ((out.double() - s).norm() / s.norm()).item()
    mine = xs[rank].clone()
    mine[mine == 0] = 0.0
    pushed = all(torch.equal(lamp[d].view(torch.float32)[(buf * W + rank) * slot:][:T * H]
                             .view(T, H), mine) for d in range(W) if d != rank)
    reset = all(bool((lamp[rank][(buf * W + r) * slot:][:T * H] == sentinel).all())
                for r in range(W) if r != rank)
    return {"case": [T, H, norm, rows, lag, W, rank, grid[0], epoch], "err": err,
            "pushed": pushed, "reset": reset, "epoch_after": int(state[0]),
            "error_record": int(host_err[0])}


if __name__ == "__main__":
    for spec in json.loads(sys.argv[1]):
        print(json.dumps(case(*spec)), flush=True)
