"""The p2p MoE kernels with every EP rank on ONE GPU (:mod:`llmcomm.moe.loopback`): a
diagnostic for machines with one GPU, NOT a speed claim.

Each rank's kernels run on their own stream, concurrently; "peer" writes are local stores, on
half the SMs each (``num_programs`` defaults to ``SMs // world``), sharing one GPU's HBM, with a
stream fork and join per call. Not a bound on the 2-GPU figures in either direction (one H200:
21.0 us for the decode pair at one token vs 15.5 on 2 x H200; see :mod:`llmcomm.moe.loopback`):
use it for A/Bs of kernel changes where only one GPU is lent. The 2-GPU figures are
``bench_moe.py``'s. Every figure is a CUDA-graph replay of ``iters`` back-to-back calls of every
rank (fork/join over the rank streams), median of 7 replays; each (config, tokens) is checked
once against the dense float64 reference before it is timed (identity experts: ``y = x * sum_k
w``). Inputs bf16, routing uniform random top-k. ``pair_free_us`` (session 19): the same pairs
with the rank streams forked once before all of them and joined once after
(:func:`_free_pairs`), so each rank's kernels follow each other on its stream as on its own GPU
-- no fork/join between calls, and PDL (``lamport128pdl``) can overlap a kernel's launch with
the previous one's tail.

    python3 benchmarks/bench_moe_loopback.py                       # hidden 7168 / 256 experts
    python3 benchmarks/bench_moe_loopback.py --configs lamport128 --tokens 1,8
    python3 benchmarks/bench_moe_loopback.py --hidden 4096 --experts 128

Configs (``--configs``): ``lamport128`` (the decode dispatcher: M = 128, ``protocol="auto"``
picks lamport at EP=2), ``flags128`` (M = 128, flags), ``flags4096`` (M = 4096, flags; the
default 2-GPU dispatcher, here on half the programs); A/B configs against a knob are listed
with a comment in ``CONFIGS`` (e.g. ``lamport128notspin``: without session 20's per-thread
spins; ``lamport128nopdl``: without PDL, the lamport default since session 24). Results:
``benchmarks/results/moe_loopback_<gpu>_h<hidden>.{csv,json}`` with the GPU, versions, date and
the command.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

#: name -> (max_tokens_per_rank, backend kwargs)
CONFIGS = {
    "lamport128": (128, {}),
    "flags128": (128, {"protocol": "flags"}),
    # lamport forced (protocol="auto" picks it at EP=2 only): for --world 4 / 8 (session 21)
    "lam128": (128, {"protocol": "lamport"}),
    # ... with each program receiving token p of every peer, one peer after another (the EP=2
    # way; at EP > 2 the default spreads the peers' tokens over the programs, session 21)
    "lam128seq": (128, {"protocol": "lamport", "_peer_spread": False}),
    # ... and the spread at EP=2 (where the default receives peer by peer)
    "lam128spread": (128, {"protocol": "lamport", "_peer_spread": True}),
    "flags4096": (4096, {"protocol": "flags"}),
    # the packed expert_x (session 31): the count exchange kernel before the flags dispatch
    "packed4096": (4096, {"protocol": "flags", "packed": True}),
    # ... each expert's segment at a multiple of 128 rows (packed_align)
    "packed4096a128": (4096, {"protocol": "flags", "packed": True, "packed_align": 128}),
    # the fp8 dispatch (session 32, EPDispatcher(fp8=True)): tokens quantised (one triton
    # kernel, timed with the dispatch) and moved as float8_e4m3fn + a scale per 128 channels;
    # the combine in bf16 as before. Padded and packed, against flags4096 / packed4096
    "fp8_4096": (4096, {"protocol": "flags", "fp8": True}),
    "packedfp8_4096": (4096, {"protocol": "flags", "packed": True, "fp8": True}),
    "fp8_128": (128, {"protocol": "flags", "fp8": True}),
    # ... through lamport (session 33; what protocol="auto" picks for an fp8 decode dispatcher
    # at EP=2 now), against lamport128
    "lamfp8_128": (128, {"protocol": "lamport", "fp8": True}),
    # A/B candidate: the combine's push and finish in separate programs (16 warps, one token
    # a step; 2 x SMs // (2 * world) programs a rank, the dispatch keeps its grid), rounds of 8
    "croles4096r8": (4096, {"protocol": "flags", "_combine_roles": True, "round_tokens": 8}),
    "croles4096": (4096, {"protocol": "flags", "_combine_roles": True}),   # default round rule
    # programmatic dependent launch on the decode pair (session 19: in pair_free_us -0.6..-1.0
    # us at one token; nothing in pair_us, whose fork and join sit between a rank's kernels);
    # the lamport default since session 24 (2 x H200), so lamport128pdl is lamport128 now and
    # lamport128nopdl the A/B against it
    "lamport128pdl": (128, {"pdl": True}),
    "lamport128nopdl": (128, {"pdl": False}),
    # without session 20's per-thread spin (P2PBackend._thread_spin, the default on a GPU)
    "lamport128notspin": (128, {"_thread_spin": False}),
    # without the dispatch's per-thread count and meta spin (session 20; the default at <= 8
    # warps a program)
    "lamport128nomspin": (128, {"_meta_spin": False}),
    # program p receives tile p + G/2 (33 of the 66 programs a rank of a 132-SM GPU; session 4 on
    # 2 GPUs: 0.3-1.7 us faster at small batches, needs every program resident)
    "lamport128shift": (128, {"shift": 33}),
    # own rows placed before the receive where a program also receives (session 25; the
    # default since), and the A/B against it
    "lamport128early": (128, {"_early_own": True}),
    "lamport128noearly": (128, {"_early_own": False}),
    # A/B candidate (session 25): a received token's slots claimed before the wait for its row
    "lamport128claim1": (128, {"_claim_first": True}),
    # claims and placements masked off where there is no token, as before session 26's GATE
    "lamport128nogate": (128, {"_gate": False}),
    # counts published by a "last program out", as before session 27's _direct_counts
    "lamport128nodirect": (128, {"_direct_counts": False}),
    # direct counts zeroed by program 0 (on the one-token critical path) instead of G // 4
    "lamport128zp0": (128, {"_zero_program": 0}),
    # A/B candidate (session 17): dispatches of 2048+ tokens send their rows by copy engine
    "ce4096": (4096, {"protocol": "flags", "_ce_tokens": 2048}),
}


def _inputs(world, T, E, K, H, seed):
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    xs = [torch.randn(T, H, device="cuda", generator=g).to(torch.bfloat16) for _ in range(world)]
    ids = [torch.rand(T, E, device="cuda", generator=g).argsort(dim=1)[:, :K] for _ in range(world)]
    ws = [torch.rand(T, K, device="cuda", generator=g) + 0.1 for _ in range(world)]
    return xs, ids, ws


def _expert_outs(lb, outs, eos):
    """Identity experts' ``expert_out`` of every rank: ``expert_x`` itself, or with ``fp8`` its
    valid rows dequantised into ``eos`` (checks only)."""
    from benchmarks._common import dequant_expert_rows
    from llmcomm.moe.fp8 import split_wire

    if not lb.fp8:
        return [o[0] for o in outs]
    for r, (o, eo) in enumerate(zip(outs, eos)):
        be = lb.backends[r]
        dequant_expert_rows(*split_wire(o[0], be.cfg.hidden_size), o[1],
                            be.offsets(o[1]) if lb.packed else None, eo)
    return eos


def _check(lb, xs, ids, ws, eos=None):
    """One call of every rank against the dense reference (identity experts; with ``fp8`` of
    the reference-quantised tokens); max rel. error."""
    import torch

    from llmcomm.moe.reference import (check_combine_output, dequantize_fp8_blocks,
                                       quantize_fp8_blocks, reference_combine)

    outs = lb.dispatch(xs, ids, ws)
    ys = lb.combine(_expert_outs(lb, outs, eos), outs, [x.shape[0] for x in xs])
    lb.check_errors()
    errs = []
    for r, y in enumerate(ys):
        x = xs[r].cpu()
        if lb.fp8:
            x = dequantize_fp8_blocks(*quantize_fp8_blocks(x))
        ref = reference_combine(x, ids[r].cpu(), ws[r].cpu(), expert_fn=lambda e, rows: rows)
        errs.append(check_combine_output(y.cpu(), ref, torch.bfloat16, what="loopback"))
    return max(errs)


def _free_pairs(lb, xs, ids, ws, n, eos=None):
    """``n`` dispatch + combine pairs of every rank on its own stream, forked once before them
    and joined once after (``Loopback`` forks and joins around every call): the rank streams run
    free, as on one GPU per rank, and a rank's kernels follow each other on one stream, so PDL
    can overlap them. Identity experts (``expert_out = expert_x``); with ``fp8`` the tokens
    quantised first as ``Loopback.dispatch`` does and the combine on ``eos`` (bf16 outputs, as
    the timed pair)."""
    import torch

    from llmcomm.moe.fp8 import to_wire

    cur = torch.cuda.current_stream()
    for s in lb.streams:
        s.wait_stream(cur)
    for r, (be, s) in enumerate(zip(lb.backends, lb.streams)):
        with torch.cuda.stream(s):
            for _ in range(n):
                x = to_wire(xs[r], None, be.cfg.dtype) if lb.fp8 else xs[r]
                ex, _, state = be.dispatch(x, ids[r], ws[r])
                be.combine(ex if eos is None else eos[r], state, xs[r].shape[0])
    for s in lb.streams:
        cur.wait_stream(s)


def _free_ok(be, T):
    """Whether :func:`_free_pairs` can run ``T`` tokens a rank with backend ``be``'s settings.
    With PDL only where two programs fit an SM: PDL lets a rank's next kernel take the SMs its
    current one leaves, and in loopback the ranks share one GPU's SMs, so with one program an
    SM that kernel can starve the peer rank's current one, which its own current one waits for.
    Session 19 ran into the deadline so at 64 tokens (16 warps a program) and with the one-token
    path at one token (removed in session 29; its dispatch needed 162 registers a thread at 8
    warps, the default one 128: one program an SM). On one GPU per rank it cannot happen. A grid small enough for two
    kernels of every rank at one program an SM (``--programs`` <= SMs / 4 at EP=2) is safe."""
    import torch

    from llmcomm.moe.p2p import _lamport_warps

    if not be.variants["PDL"]:
        return True
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    if 2 * be.cfg.world_size * be.G <= sms:
        return True
    return all(_lamport_warps(T, tb, be.G, be.combine_split, be.num_warps, be._small_warps) < 16
               for tb in be.tiles)


def run(args) -> list[dict]:
    import torch

    from benchmarks._common import format_trace, time_graph
    from llmcomm.errors import CollectiveTimeoutError
    from llmcomm.moe.loopback import Loopback

    rows = []
    W, E, K, H = args.world, args.experts, args.top_k, args.hidden
    for name in args.configs.split(","):
        M, kw = CONFIGS[name]
        if args.trace:
            kw = {**kw, "_trace": True}
        # the previous config's buffers first (15 GB a rank at M 4096; its last dispatch's
        # outputs hold its expert_x)
        lb = be0 = eos = outs = None
        gc.collect()
        torch.cuda.empty_cache()
        lb = Loopback(W, E, K, H, M, torch.bfloat16, num_programs=args.programs, **kw)
        be0 = lb.backends[0]
        if args.warm_rank is not None:   # compile rank R's kernels into triton's cache only
            n = lb.backends[args.warm_rank].warmup(
                [int(t) for t in args.tokens.split(",") if int(t) <= M], [torch.int64],
                torch.float32)
            print(f"{name:>10} rank {args.warm_rank}: {n} kernels compiled and loaded", flush=True)
            continue
        if args.warm_processes:          # every rank compiled in parallel processes first
            t0 = time.perf_counter()
            n = lb.warmup([int(t) for t in args.tokens.split(",") if int(t) <= M],
                          [torch.int64], torch.float32, processes=args.warm_processes)
            print(f"{name:>10}: {n} kernels compiled ({args.warm_processes} processes) and "
                  f"loaded in {time.perf_counter() - t0:.0f} s", flush=True)
        # fp8: the combine takes bf16 expert outputs (expert_x is fp8 wire rows), one a rank
        # (after the warm-up children, which build their own ranks' buffers)
        eos = [torch.zeros(be.cfg.expert_x_shape, dtype=torch.bfloat16, device="cuda")
               for be in lb.backends] if lb.fp8 else None
        for T in (int(t) for t in args.tokens.split(",")):
            if T > M:
                continue
            xs, ids, ws = _inputs(W, T, E, K, H, seed=T)
            try:
                err = _check(lb, xs, ids, ws, eos)
            except CollectiveTimeoutError as e:   # the workspace is unusable: next config
                print(f"{name:>10} T={T:<5} CHECK TIMED OUT: {e}", flush=True)
                break
            except AssertionError as e:       # wrong output: report it, time nothing
                print(f"{name:>10} T={T:<5} CHECK FAILED: {e}", flush=True)
                rows.append({"config": name, "hidden": H, "tokens": T, "M": M,
                             "protocol": be0.protocol, "programs": be0.G, "pair_us": None,
                             "pair_free_us": None,
                             "dispatch_us": None, "combine_us": None, "rel_err": None})
                continue
            if args.check_only:
                print(f"{name:>10} T={T:<5} G={be0.G:<4} check rel err {err:.2e}", flush=True)
                continue
            iters = 50 if T <= 512 else 20
            Ts = [T] * W

            def pair():
                outs = lb.dispatch(xs, ids, ws)
                lb.combine(eos or [o[0] for o in outs], outs, Ts)

            t_pair = time_graph(pair, iters=iters)
            t_free = None
            if _free_ok(be0, T):
                t_free = time_graph(lambda: _free_pairs(lb, xs, ids, ws, iters, eos),
                                    iters=1) / iters
            if args.trace:   # the stages of the pairs just timed (free-running where it can):
                # zeroed before each replay, so the table is of the last replay's calls only
                # (not of the eager warm-up calls, launched rank after rank)
                def zero():
                    for be in lb.backends:
                        be.trace.zero_()
                if t_free is not None:
                    time_graph(lambda: _free_pairs(lb, xs, ids, ws, iters, eos), iters=1,
                               before_replay=zero)
                else:
                    time_graph(pair, iters=iters, before_replay=zero)
                trace = {r: be.trace_summary() for r, be in enumerate(lb.backends)}
                print(format_trace(trace, f"{name} T={T} dispatch stages "
                                          f"({'free-running' if t_free else 'fork/join'})"),
                      flush=True)
            outs = lb.dispatch(xs, ids, ws)
            t_disp = time_graph(lambda: lb.dispatch(xs, ids, ws), iters=iters)
            outs = lb.dispatch(xs, ids, ws)
            t_comb = time_graph(lambda: lb.combine(eos or [o[0] for o in outs], outs, Ts),
                                iters=iters)
            try:
                lb.check_errors()
            except CollectiveTimeoutError as e:   # the workspace is unusable: next config
                print(f"{name:>10} T={T:<5} TIMED OUT: {e}", flush=True)
                break
            row = {"config": name, "hidden": H, "tokens": T, "M": M,
                   "protocol": be0.protocol, "programs": be0.G, "pair_us": round(t_pair, 2),
                   "pair_free_us": None if t_free is None else round(t_free, 2),
                   "dispatch_us": round(t_disp, 2), "combine_us": round(t_comb, 2),
                   "rel_err": float(f"{err:.3g}")}
            rows.append(row)
            print(f"{name:>10} T={T:<5} G={be0.G:<4} {be0.protocol:>7}  pair {t_pair:8.2f} us  "
                  f"free-running {'-' if t_free is None else f'{t_free:.2f}':>8}  "
                  f"dispatch {t_disp:8.2f}  combine {t_comb:8.2f}  (check rel err {err:.2e})",
                  flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="lamport128,flags128,flags4096")
    ap.add_argument("--tokens", default="1,8,64,128,1024,4096")
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--trace", action="store_true",
                    help="lamport configs: build them with the dispatch's stage stamps "
                    "(P2PBackend(_trace=True); the timings are then of the stamped kernels) and "
                    "print each size's stage table")
    ap.add_argument("--programs", type=int, default=None,
                    help="grid per rank (default min(128, M, SMs // world))")
    ap.add_argument("--check-only", action="store_true",
                    help="check every (config, tokens) once, time nothing, write nothing (also "
                    "compiles every kernel, e.g. in parallel processes before a timed run)")
    ap.add_argument("--warm-rank", type=int, default=None,
                    help="only compile rank R's kernels for the configs and tokens into triton's "
                    "cache, run nothing (one process a rank in parallel before a timed run: "
                    "the kernels are compiled per rank, and at EP=4 each takes ~10 s)")
    ap.add_argument("--warm-processes", type=int, default=0,
                    help="compile every rank's kernels in up to N parallel processes before "
                    "checking, one (rank, token class) pair a process (Loopback.warmup; up to "
                    "ranks x 3 classes are useful, no more than the CPU cores)")
    ap.add_argument("--out", default=None, help="result file stem (default benchmarks/results/"
                    "moe_loopback_<gpu>_h<hidden>)")
    args = ap.parse_args()
    from benchmarks._common import set_safe_env

    set_safe_env()
    # one stream a rank plus the caller's: with more streams than CUDA's hardware queues
    # (CUDA_DEVICE_MAX_CONNECTIONS, 8 by default) two ranks' kernels can share a queue, and
    # one may then wait behind the other, which spins for it (EP=8: 9 streams; suspected in
    # session 21, where it was not the cause of the EP=8 timeouts, but the risk stays)
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")
    import torch

    from benchmarks._common import save_one_gpu_results

    if not torch.cuda.is_available():
        sys.exit("bench_moe_loopback.py needs a CUDA GPU")
    rows = run(args)
    if args.check_only or args.warm_rank is not None:
        return
    save_one_gpu_results(rows, "loopback: every EP rank on one GPU, local stores instead of "
                         "NVLink; not comparable with 2-GPU figures", args.out,
                         "moe_loopback_{gpu}_h%d" % args.hidden)


if __name__ == "__main__":
    main()
