"""How long the p2p EP kernels take to compile and load, ahead (``EPDispatcher.warmup``) or at a
first call: the window in which a rank that meets a new token-count class keeps its peers
spinning on its data (their deadline is ``LLMCOMM_TIMEOUT_S``, 30 s by default).

Every figure comes from a fresh process (one GPU: rank 0 of a :mod:`llmcomm.moe.loopback`
group, whose kernels are the 2-GPU kernels of rank 0), wall-clock seconds:

* ``first-call``: a fresh triton cache, the compile and load one dispatch + combine at a new
  token count (5, int64 ids) does before it launches -- what a rank without ``warmup`` spends
  at each new class while its peers spin (``dispatch_s`` before its dispatch launches,
  ``combine_s`` before its combine);
* ``warmup-cold``: a fresh triton cache, ``warmup`` over the default token counts and both ids
  dtypes (what a first start-up pays once);
* ``warmup-disk``: the same in a new process over the cache the cold run left (every later
  start-up).

    python3 benchmarks/bench_warmup.py                    # lamport128 and flags4096, h7168
    python3 benchmarks/bench_warmup.py --configs lamport128 --hidden 4096 --experts 128

Configs are :mod:`bench_moe_loopback`'s. Results: ``benchmarks/results/
moe_warmup_<gpu>_h<hidden>.{csv,json}`` with the GPU, versions, date and command.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

MODES = ("first-call", "warmup-cold", "warmup-disk")


def child(args) -> dict:
    """One measurement in this (fresh) process; returns its row."""
    import torch

    from benchmarks.bench_moe_loopback import CONFIGS
    from llmcomm.moe.dispatcher import warm_token_counts
    from llmcomm.moe.loopback import Loopback

    M, kw = CONFIGS[args.configs]
    lb = Loopback(args.world, args.experts, args.top_k, args.hidden, M, torch.bfloat16, **kw)
    be = lb.backends[0]
    row = {"config": args.configs, "protocol": be.protocol, "hidden": args.hidden,
           "max_tokens_per_rank": M, "mode": args.mode}
    t0 = time.perf_counter()
    if args.mode == "first-call":
        T, K, H = 5, args.top_k, args.hidden
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        ids = torch.randint(0, args.experts, (T, K), device="cuda")
        w = torch.rand(T, K, device="cuda")
        be._compile_only = True        # what a first eager call compiles and loads, no launch
        _, _, state = be.dispatch(x, ids, w)
        t1 = time.perf_counter()
        be.combine(be.expert_x, state, T)
        be._compile_only = False
        row.update(dispatch_s=round(t1 - t0, 2), combine_s=round(time.perf_counter() - t1, 2))
    else:
        row["variants"] = be.warmup(warm_token_counts(M), (torch.int32, torch.int64),
                                    torch.float32)
    return {**row, "seconds": round(time.perf_counter() - t0, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="lamport128,flags4096")
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)   # child processes
    ap.add_argument("--out", default=None, help="result file stem (default benchmarks/results/"
                    "moe_warmup_<gpu>_h<hidden>)")
    args = ap.parse_args()
    from benchmarks._common import set_safe_env

    set_safe_env()
    if args.mode:
        print(json.dumps(child(args)), flush=True)
        return
    import torch

    from benchmarks._common import save_one_gpu_results

    if not torch.cuda.is_available():
        sys.exit("bench_warmup.py needs a CUDA GPU")
    rows = []
    base = [sys.executable, os.path.abspath(__file__), "--hidden", str(args.hidden),
            "--experts", str(args.experts), "--top-k", str(args.top_k), "--world",
            str(args.world)]
    for cfg in args.configs.split(","):
        caches = {m: tempfile.mkdtemp(prefix=f"triton-{cfg}-") for m in MODES[:2]}
        caches["warmup-disk"] = caches["warmup-cold"]
        for mode in MODES:
            env = dict(os.environ, TRITON_CACHE_DIR=caches[mode])
            out = subprocess.run(base + ["--configs", cfg, "--mode", mode], env=env,
                                 check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    save_one_gpu_results(rows, "wall-clock compile + module load of rank 0's kernels (loopback "
                         "group), fresh process per row", args.out,
                         "moe_warmup_{gpu}_h%d" % args.hidden)


if __name__ == "__main__":
    main()
