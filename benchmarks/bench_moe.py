"""MoE EP token exchange on one node: NCCL all_gather/reduce_scatter, NCCL all_to_all, llmcomm p2p.

Every figure: dispatch + combine, a CUDA-graph replay of back-to-back calls, median of 7
replays, max over ranks (``benchmarks/_common.time_graph``). Inputs bf16, routing uniform random
top-k. ``nccl_ag_rs``: all_gather of every token then reduce_scatter (the engines' fallback);
``nccl_a2a``: two all_to_all_single with equal splits of T rows (with top-8 over 2 ranks nearly
every token goes to both ranks); ``p2p``: EPDispatcher(backend="p2p") dispatch + combine
(expert outputs = expert inputs). ``p2p_GBps``: bytes that cross NVLink in one direction
(deduplicated rows to the peer, dispatch + combine) divided by the time; the one-way NVLink
limit measured on this machine is 394 GB/s. ``p2p_dispatch_us`` / ``p2p_combine_us``: each half
alone (graph replays of the backend's dispatch, or of its combine on the last dispatch's state).
``p2p_decode_us`` (tokens <= DECODE_M): the same through a decode dispatcher created with
``max_tokens_per_rank = DECODE_M`` (what an engine builds for its decode batches), whose default
protocol may differ (``llmcomm.policy.ep_p2p_protocol``; ``p2p_decode_protocol``); the ``p2p``
column's dispatcher is sized for the largest token count.

    PYTHONPATH=src:. python3 benchmarks/bench_moe.py [--tokens 1,8,...] [--hidden 7168]
        [--out benchmarks/results]

``--p2p-kwargs '{"num_programs": 64}'``: P2PBackend keyword arguments (JSON) of the timed p2p
backend (``--programs N`` is the same as ``{"num_programs": N}``).

``--sweep``: time the p2p backend for every SWEEP entry (constructor knobs of ``P2PBackend``;
``--sweep-only a,b`` for a subset) at ``--sweep-tokens`` tokens per rank, hidden 7168 / 256
experts / top-8, one dispatcher per entry (``M`` = the largest token count), plus NCCL
all_to_all once per token count for the ratio. Each entry is checked inline first: ``counts``
against the routing and the combine output against the float64 reference
``y = x * sum_k w`` (expert outputs = expert inputs); the worst relative error is printed and
recorded. ``--split`` also times each entry's dispatch and combine alone. Writes ``<out>/moe_sweep_ep<W>.json``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path[:0] = [os.path.join(os.path.dirname(os.path.abspath(__file__)), p)
                for p in ("..", "../src")]

CONFIGS = ((7168, 256, 8), (4096, 128, 8))
TOKENS = (1, 2, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096)
NVLINK_GBPS = 394.0
DECODE_M = 128   # max_tokens_per_rank of the decode dispatcher (p2p_decode_us)
#: issue 4's NCCL baseline: ../shared/reference/measured_anchors.md, "a2a_eq", hidden 7168,
#: 256 experts, top-8, EP=2 on 2 x H200 (us per dispatch + combine pair, by tokens per rank);
#: reported beside the a2a column this script measures (which was ~10 us slower at small sizes)
ANCHOR_A2A_7168 = {1: 24.1, 8: 25.0, 64: 41.1, 128: 46.7, 512: 106.5, 2048: 259.0}
SWEEP_CONFIG = (7168, 256, 8)
SWEEP_TOKENS = (1, 8, 64, 128, 4096)
#: --sweep: name -> (P2PBackend keyword arguments, largest token count timed)
SWEEP = {
    "default": ({}, None),
    "atomic_flags": ({"posted_flags": False}, None),   # session-2 signalling
    "w8": ({"num_warps": 8}, None),
    "t2": ({"tile_tokens": 2}, None),
    "c2": ({"combine_tile_tokens": 2}, None),
    "1round": ({"round_tokens": 4096}, None),          # no pipelining of rounds
    "G64": ({"num_programs": 64}, None),
    "pdl": ({"pdl": True}, None),
    # protocol "lamport" (what protocol="auto" picks for a decode dispatcher at EP=2; "default"
    # here is flags: M = 4096): defaults (1-token tiles, shift 0), 2-token dispatch tiles, and
    # shift G/2 = 64 (needs every program resident, see P2PBackend)
    "lam": ({"protocol": "lamport"}, None),
    "lam_t2": ({"protocol": "lamport", "tile_tokens": 2}, None),
    "lam_half": ({"protocol": "lamport", "shift": 64}, None),
    # flags whatever M (with --sweep-tokens <= 128 "default" is lamport: protocol="auto")
    "flags": ({"protocol": "flags"}, None),
    # lamport combine without / with the column split of small batches (default 4 at H >= 2048)
    "lam_cs1": ({"protocol": "lamport", "combine_split": 1}, None),
    "lam_cs2": ({"protocol": "lamport", "combine_split": 2}, None),
    "lam_cs8": ({"protocol": "lamport", "combine_split": 8}, None),
    # lamport with / without programmatic dependent launch: the next kernel's launch overlaps
    # this one's tail (session 19: an empty kernel costs ~1.1-1.5 us a launch in a graph). On
    # for lamport by default since session 24 (2 x H200: -0.1..-1.4 us a pair at 1-128 tokens)
    "lam_pdl": ({"protocol": "lamport", "pdl": True}, None),
    "lam_nopdl": ({"protocol": "lamport", "pdl": False}, None),
    # lamport without session 20's per-thread spin (the polls reduce over the program every
    # spin, as before; _thread_spin is the default on a GPU)
    "lam_notspin": ({"protocol": "lamport", "_thread_spin": False}, None),
    # lamport with own rows placed after the receive, as before session 25 (the default places
    # them before it where a program also receives: loopback -1.3..-2.0 us at 128 tokens)
    "lam_noearly": ({"protocol": "lamport", "_early_own": False}, None),
    # A/B candidate (session 25): a received token's slots claimed before the wait for its row
    "lam_claim1": ({"protocol": "lamport", "_claim_first": True}, None),
    # claims and placements masked off where there is no token, as before session 26's GATE
    "lam_nogate": ({"protocol": "lamport", "_gate": False}, None),
    # counts published by a "last program out", as before session 27's _direct_counts
    "lam_nodirect": ({"protocol": "lamport", "_direct_counts": False}, None),
    # the default lamport pair with the dispatch's stage stamps (a diagnostic, session 26): its
    # timing is of the stamped kernel, and each size prints the stage table of every rank
    "lam_trace": ({"protocol": "lamport", "_trace": True}, None),
    # flags rounds phased (send the round, signal, copy own, receive), as before session 7,
    # instead of interleaved token by token (the default)
    "phased": ({"protocol": "flags", "interleave": False}, None),
    # other round sizes (default: a quarter of a program's share, at least half of it up to 8
    # tokens; 8 tokens at 4096 per rank). Smaller rounds: with
    # interleaving, the first round's pushes and the last round's finishes run alone
    "r16": ({"protocol": "flags", "round_tokens": 16}, None),
    "r8": ({"protocol": "flags", "round_tokens": 8}, None),
    "r4": ({"protocol": "flags", "round_tokens": 4}, None),
    "r2": ({"protocol": "flags", "round_tokens": 2}, None),
    "r1": ({"protocol": "flags", "round_tokens": 1}, None),
    # the default rule applied per call to the batch's share, in the kernel (RT; session 9's
    # branch, off by default until timed on 2 GPUs)
    "rt": ({"protocol": "flags", "_runtime_rounds": True}, None),
    # the combine's push and finish in separate programs (session 11, ep_combine_roles_kernel)
    # at 16 warps, one token a step (the knobs' defaults; one program an SM: half the SMs push,
    # half finish; min(G, SMs / 2) programs a role, the dispatch keeps its G): in loopback at
    # par with the interleaved combine (4096 tokens 387.0 vs 386.6 us, 1024 110.3 vs 106.7),
    # untimed on 2 GPUs. Rounds by the default rule at the combine's share / of 8
    "croles": ({"protocol": "flags", "_combine_roles": True}, None),
    # the packed expert_x (EPDispatcher(packed=True), session 31; "packed" is the dispatcher's
    # argument, not the backend's): the per-expert count exchange kernel before the flags
    # dispatch, 16x less expert_x memory at 256 experts
    "packed": ({"protocol": "flags", "packed": True}, None),
    # ... each expert's segment at a multiple of 128 rows (packed_align, for block-tiled GEMMs)
    "packed_a128": ({"protocol": "flags", "packed": True, "packed_align": 128}, None),
    # the fp8 dispatch (EPDispatcher(fp8=True), session 32): tokens quantised (one triton
    # kernel, inside the timed pair) and sent as float8_e4m3fn + a float32 scale per 128
    # channels (3696 instead of 7168 bf16 elements a row at hidden 7168); the combine in bf16.
    # Checked against the reference of the quantised tokens; the pair's combine takes a fixed
    # bf16 expert_out (the identity experts' dequantised rows of the checked call)
    "fp8": ({"protocol": "flags", "fp8": True}, None),
    "packed_fp8": ({"protocol": "flags", "packed": True, "fp8": True}, None),
    # ... through the lamport dispatch (session 33; protocol="auto"'s pick for an fp8 decode
    # dispatcher at EP=2)
    "lam_fp8": ({"protocol": "lamport", "fp8": True}, None),
    "croles_r8": ({"protocol": "flags", "_combine_roles": True, "round_tokens": 8}, None),
    # the dispatch's rows by copy engine, a round of every program (8 x 128 = 1024 tokens at
    # 4096 per rank) a copy, for batches of 2048+ tokens (session 17, P2PBackend._ce_tokens,
    # off: slower on 2 x H200, 228.6 vs 217 us for the 4096-token dispatch)
    "ce": ({"protocol": "flags", "_ce_tokens": 2048}, None),
    # ... in rounds of 4 (8 at 4096 tokens, 32 a program): with no NVLink stores in the kernel
    # a round's release drains no NVLink writes, so more, shorter rounds may pay (the copy's
    # first and last rounds run alone); the combine takes the same rounds
    "ce_r4": ({"protocol": "flags", "_ce_tokens": 2048, "round_tokens": 4}, None),
    # ... with 112 programs: should a copy into a peer's buffer run as a kernel (as a local one
    # does, session 17), it gets 20 SMs instead of 4
    "ce_g112": ({"protocol": "flags", "_ce_tokens": 2048, "num_programs": 112}, None),
    # interleaved rounds with the own and the peer's tile in separate steps (the default fuses
    # them into one step at EP=2: FUSE in llmcomm.kernels.moe)
    "nofuse": ({"protocol": "flags", "_fuse": False}, None),
    # the combine unfused (its default since session 8 is fused, on 1-D rows)
    "nocfuse": ({"protocol": "flags", "_combine_fuse": False}, None),
    # large batches: two programs per SM at 16 warps (session 3 timed 256 programs at 8 warps)
    "G256": ({"num_programs": 256}, None),
}


def _worker(rank, world, tokens, p2p_kwargs, configs=CONFIGS):
    import torch
    import torch.distributed as dist

    from benchmarks._common import progress, time_graph
    from llmcomm.moe import EPDispatcher

    rows = []
    dtype = torch.bfloat16
    M = max(tokens)
    for H, E, K in configs:
        ep = EPDispatcher(dist.group.WORLD, E, K, H, M, dtype, backend="p2p",
                          _backend_kwargs=p2p_kwargs or None)
        small = EPDispatcher(dist.group.WORLD, E, K, H, min(M, DECODE_M), dtype, backend="p2p",
                             _backend_kwargs=p2p_kwargs or None)
        g = torch.Generator(device="cuda").manual_seed(1234 + rank)
        for T in progress(tokens, rank == 0, f"moe H={H}"):
            x = torch.randn(T, H, device="cuda", dtype=dtype, generator=g)
            ids = torch.rand(T, E, device="cuda", generator=g).topk(K, dim=1).indices
            w = torch.rand(T, K, device="cuda", generator=g)
            L = E // world
            owner = ids // L
            to_peer = int(sum((owner == d).any(dim=1).sum().item()
                              for d in range(world) if d != rank))
            iters = 50 if T <= 512 else 20

            def p2p(ep=ep):
                d = ep.dispatch(x, ids, w)
                ep.combine(d.expert_x, d)

            gathered = torch.empty(world * T, H, device="cuda", dtype=dtype)
            rs_out = torch.empty(T, H, device="cuda", dtype=dtype)

            def ag_rs():
                dist.all_gather_into_tensor(gathered, x)
                dist.reduce_scatter_tensor(rs_out, gathered)

            send = x.repeat(world, 1)
            recv = torch.empty_like(send)
            back = torch.empty_like(send)

            def a2a():
                dist.all_to_all_single(recv, send)
                dist.all_to_all_single(back, recv)

            t_p2p = time_graph(p2p, iters=iters)
            ep.check_errors(sync=True)
            t_dec = None
            if T <= small.max_tokens_per_rank:
                t_dec = time_graph(lambda small=small: p2p(small), iters=iters)
                small.check_errors(sync=True)
            # each half alone, through the backend (EPDispatcher pairs dispatch with combine)
            be = ep._backend
            ex, _, state = be.dispatch(x, ids, w)
            t_disp = time_graph(lambda be=be: be.dispatch(x, ids, w), iters=iters)
            t_comb = time_graph(lambda be=be, ex=ex, state=state: be.combine(ex, state, T),
                                iters=iters)
            ep.check_errors(sync=True)
            t_ag = time_graph(ag_rs, iters=iters)
            t_a2a = time_graph(a2a, iters=iters)
            peer_rows = torch.tensor([to_peer], device="cuda", dtype=torch.float64)
            dist.all_reduce(peer_rows, op=dist.ReduceOp.MAX)
            nbytes = 2 * peer_rows.item() * H * 2          # dispatch + combine, one direction
            gbps = nbytes / (t_p2p * 1e-6) / 1e9
            anchor = ANCHOR_A2A_7168.get(T) if (H, E, K, world) == (7168, 256, 8, 2) else None
            best = min(t_p2p, t_dec if t_dec is not None else float("inf"))
            rows.append({"hidden": H, "experts": E, "top_k": K, "tokens": T,
                         "anchor_a2a_us": anchor,
                         "best_p2p_over_anchor_a2a": None if anchor is None else round(
                             best / anchor, 3),
                         "nccl_ag_rs_us": round(t_ag, 2), "nccl_a2a_us": round(t_a2a, 2),
                         "p2p_us": round(t_p2p, 2), "p2p_over_a2a": round(t_p2p / t_a2a, 3),
                         "p2p_dispatch_us": round(t_disp, 2), "p2p_combine_us": round(t_comb, 2),
                         "p2p_GBps": round(gbps, 1),
                         "p2p_pct_nvlink": round(100 * gbps / NVLINK_GBPS, 1),
                         "p2p_decode_us": None if t_dec is None else round(t_dec, 2),
                         "p2p_decode_over_a2a": None if t_dec is None else round(t_dec / t_a2a,
                                                                                 3),
                         "p2p_decode_protocol": small._backend.protocol})
            if rank == 0:
                print(rows[-1], flush=True)
        ep.close()
        small.close()
        del ep, small
        torch.cuda.empty_cache()
    return rows


def _sweep_worker(rank, world, tokens, names, split_halves=False):
    """Every SWEEP entry: a dispatcher, an inline check per token count, then graph timing."""
    import time

    import torch
    import torch.distributed as dist

    from benchmarks._common import dequant_expert_rows, format_trace, time_graph
    from llmcomm.moe import EPDispatcher
    from llmcomm.moe.reference import dequantize_fp8_blocks, quantize_fp8_blocks

    H, E, K = SWEEP_CONFIG
    dtype, M, L = torch.bfloat16, max(tokens), E // world
    t_start = time.time()
    inputs = {}
    for T in tokens:
        g = torch.Generator(device="cuda").manual_seed(99 + T + 1000 * rank)
        x = torch.randn(T, H, device="cuda", dtype=dtype, generator=g)
        ids = torch.rand(T, E, device="cuda", generator=g).topk(K, dim=1).indices
        w = torch.rand(T, K, device="cuda", generator=g)
        all_ids = [torch.empty_like(ids) for _ in range(world)]
        dist.all_gather(all_ids, ids)
        owner = torch.cat(all_ids) // L
        # deduplicated (token, local expert) pairs = rows this rank's experts receive
        want = torch.zeros(L, dtype=torch.int64, device="cuda")
        for row in torch.cat(all_ids)[owner.eq(rank).any(dim=1)].tolist():
            for e in set(row):
                if e // L == rank:
                    want[e - rank * L] += 1
        y_ref = x.double() * w.double().sum(dim=1, keepdim=True)
        send = x.repeat(world, 1)
        recv, back = torch.empty_like(send), torch.empty_like(send)

        def a2a(send=send, recv=recv, back=back):
            dist.all_to_all_single(recv, send)
            dist.all_to_all_single(back, recv)
        inputs[T] = (x, ids, w, want, y_ref,
                     time_graph(a2a, iters=50 if T <= 512 else 20, reps=5))
    rows = [{"tokens": T, "nccl_a2a_us": round(inputs[T][5], 2)} for T in tokens]
    errors = {}
    for name in names:
        kw, max_t = SWEEP[name]
        kw = dict(kw)
        packed = kw.pop("packed", False)
        align = kw.pop("packed_align", 1)
        fp8 = kw.pop("fp8", False)
        try:
            ep = EPDispatcher(dist.group.WORLD, E, K, H, M, dtype, backend="p2p",
                              packed=packed, packed_align=align, fp8=fp8, _backend_kwargs=kw)
            # fp8: the identity experts' bf16 outputs (expert_x is float8_e4m3fn)
            eo = torch.zeros(ep.expert_x_shape, dtype=dtype, device="cuda") if fp8 else None
        except Exception as e:  # noqa: BLE001 - identical on every rank (creation is agreed)
            errors[name] = repr(e)[:300]
            continue
        for row in rows:
            T = row["tokens"]
            if max_t is not None and T > max_t:
                continue
            x, ids, w, want, y_ref, _ = inputs[T]

            def p2p(x=x, ids=ids, w=w, ep=ep):
                d = ep.dispatch(x, ids, w)
                return d, ep.combine(d.expert_x if eo is None else eo, d)

            try:  # a device timeout kills this entry (its dispatcher), not the sweep
                if fp8:   # checked call: the dispatched rows dequantised as expert_out
                    d = ep.dispatch(x, ids, w)
                    y = ep.combine(dequant_expert_rows(d.expert_x, d.expert_x_scale, d.counts,
                                                       d.offsets, eo), d)
                    y_ref = dequantize_fp8_blocks(*quantize_fp8_blocks(x)).to(y.device) * \
                        w.double().sum(dim=1, keepdim=True)
                else:
                    d, y = p2p()
                ep.check_errors(sync=True)
                cnt_ok = bool(torch.equal(d.counts.long(), want))
                err = float(((y.double() - y_ref).norm() / y_ref.norm().clamp_min(1e-30))
                            .item())
            except Exception as e:  # noqa: BLE001 - recorded; the ranks agree below
                errors[f"{name}@{T}"] = repr(e)[:300]
                cnt_ok, err = False, float("nan")
            ok_out = cnt_ok and err <= 1e-2
            bad = torch.tensor([0.0 if ok_out else 1.0], device="cuda")
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            row[f"{name}.err"] = err if cnt_ok else float("inf")
            if bad.item() != 0.0:
                break
            try:
                t = time_graph(lambda: p2p(), iters=50 if T <= 512 else 20, reps=5)
                ep.check_errors(sync=True)
            except Exception as e:  # noqa: BLE001
                errors[f"{name}@{T} (timed)"] = repr(e)[:300]
                t = None
            ok = torch.tensor([0.0 if t is None else 1.0], device="cuda")
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            if ok.item() == 0.0:
                break
            row[name] = round(t, 2)
            row[f"{name}/a2a"] = round(t / row["nccl_a2a_us"], 3)
            if ep._backend.trace is not None:   # the stages of a graph of the same pairs,
                # zeroed before each replay: the table is of the last replay's calls only
                time_graph(lambda: p2p(), iters=50 if T <= 512 else 20, reps=3,
                           before_replay=ep._backend.trace.zero_)
                ep.check_errors(sync=True)
                got = [None] * world
                dist.all_gather_object(got, ep._backend.trace_summary())
                row[f"{name}.trace"] = dict(enumerate(got))
                if rank == 0:
                    print(format_trace(row[f"{name}.trace"], f"  {name} T={T} dispatch stages"),
                          flush=True)
            split = ""
            if split_halves and not fp8:   # each half alone, through the backend (as _worker;
                # fp8: the backend's dispatch takes wire rows, not x)
                be = ep._backend
                ex, _, state = be.dispatch(x, ids, w)
                row[f"{name}.dispatch"] = round(time_graph(
                    lambda be=be, x=x, ids=ids, w=w: be.dispatch(x, ids, w),
                    iters=50 if T <= 512 else 20, reps=5), 2)
                row[f"{name}.combine"] = round(time_graph(
                    lambda be=be, ex=ex, state=state, T=T: be.combine(ex, state, T),
                    iters=50 if T <= 512 else 20, reps=5), 2)
                ep.check_errors(sync=True)
                split = f" (dispatch {row[f'{name}.dispatch']}, combine {row[f'{name}.combine']})"
            if rank == 0:  # as we go: a later crash must not lose what was measured
                print(f"  {name} T={T}: {row[name]} us{split}, {row[f'{name}/a2a']} x a2a "
                      f"({row['nccl_a2a_us']} us), err {err:.1e}", flush=True)
        ep.close()
        del ep
        torch.cuda.empty_cache()
        if rank == 0:
            print(f"sweep {name} {kw} done ({time.time() - t_start:.0f} s)", flush=True)
    if rank == 0:
        _print_sweep(rows, H, world, names)
    return rows, errors, round(time.time() - t_start, 1)


def _print_sweep(rows, H, world, names) -> None:
    """us per dispatch+combine of every SWEEP entry, its ratio to NCCL a2a and % of NVLink."""
    print(f"\nsweep: p2p dispatch+combine, H={H}, us (ratio to NCCL a2a; * = fastest)")
    print(f"{'T':>5} {'a2a':>7} " + " ".join(f"{n:>15}" for n in names))
    for r in rows:
        vals = {n: r[n] for n in names if n in r}
        best = min(vals, key=vals.get) if vals else None
        cells = [f"{vals[n]:.1f}({r[n + '/a2a']:.2f}){'*' if n == best else ''}"
                 if n in vals else "-" for n in names]
        print(f"{r['tokens']:5d} {r['nccl_a2a_us']:7.1f} " + " ".join(f"{c:>15}" for c in cells))
    errs = [(r[f"{n}.err"], r["tokens"], n) for r in rows for n in names if f"{n}.err" in r]
    print("sweep check: worst rel err (inf = wrong counts)", max(errs, default=None))
    big = max((r for r in rows), key=lambda r: r["tokens"])
    pct = {n: round(100 * (2 * big["tokens"] * (1 - (1 - 0.5) ** 8) * H * 2)
                    / (big[n] * 1e-6) / 1e9 / NVLINK_GBPS, 1) for n in names if n in big}
    print(f"% of NVLink at T={big['tokens']} (approx. rows to the peer = T*(1-2^-8)):", pct)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--programs", type=int, default=None, help="p2p grid size (default: auto)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--hidden", default=",".join(str(c[0]) for c in CONFIGS),
                    help="which CONFIGS to time, by hidden size (e.g. 7168: half the run)")
    ap.add_argument("--sweep", action="store_true", help="time the SWEEP knob grid instead")
    ap.add_argument("--sweep-tokens", default=",".join(map(str, SWEEP_TOKENS)))
    ap.add_argument("--sweep-only", default="",
                    help=f"comma-separated SWEEP entries (default all: {','.join(SWEEP)})")
    ap.add_argument("--split", action="store_true",
                    help="--sweep: also time each entry's dispatch and combine alone")
    ap.add_argument("--p2p-kwargs", default="",
                    help='P2PBackend keyword arguments as JSON, e.g. \'{"num_programs": 64}\'')
    args = ap.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    names = [n for n in args.sweep_only.split(",") if n] or list(SWEEP)
    unknown = [n for n in names if n not in SWEEP]
    if unknown:
        ap.error(f"--sweep-only: unknown entries {unknown}; known: {list(SWEEP)}")
    import json

    try:
        p2p_kwargs = json.loads(args.p2p_kwargs) if args.p2p_kwargs else {}
    except ValueError as e:
        ap.error(f"--p2p-kwargs must be a JSON object: {e}")
    if not isinstance(p2p_kwargs, dict):
        ap.error("--p2p-kwargs must be a JSON object, e.g. '{\"num_programs\": 64}'")
    if args.programs is not None:
        p2p_kwargs["num_programs"] = args.programs

    from benchmarks._common import environment, write_results
    from tests._dist import run_ranks

    if args.sweep:
        stoks = [int(t) for t in args.sweep_tokens.split(",")]
        rows, errors, secs = run_ranks(_sweep_worker, args.world, stoks, names, args.split,
                                       backend="nccl", timeout=580)[0]
        meta = environment()
        meta.update(world=args.world, config=SWEEP_CONFIG, seconds=secs, errors=errors,
                    sweep={k: list(SWEEP[k]) for k in names})
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"moe_sweep_ep{args.world}.json")
        with open(path, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"wrote {path}; {secs} s; errors: {errors}")
        return

    hidden = {int(h) for h in args.hidden.split(",")}
    configs = tuple(c for c in CONFIGS if c[0] in hidden)
    if not configs:
        ap.error(f"--hidden {args.hidden}: none of the configured sizes "
                 f"{[c[0] for c in CONFIGS]}")
    res = run_ranks(_worker, args.world, tokens, p2p_kwargs, configs, backend="nccl",
                    timeout=560)
    rows = res[0]
    meta = environment()
    meta.update(world=args.world, note=__doc__.split("\n\n")[1].replace("\n", " "),
                p2p_kwargs=p2p_kwargs)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"moe_ep{args.world}")
    csv_path, json_path = write_results(stem, rows, meta)
    print(f"wrote {csv_path} {json_path}")
    print("| hidden/experts | tokens | nccl ag+rs us | nccl a2a us | p2p us | p2p/a2a | p2p GB/s "
          "| % of 394 | dispatch alone | combine alone | decode p2p us (protocol) | decode/a2a "
          "| best / anchor a2a |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        dec = ("-", "-") if r["p2p_decode_us"] is None else (
            f"{r['p2p_decode_us']} ({r['p2p_decode_protocol']})", r["p2p_decode_over_a2a"])
        print(f"| {r['hidden']}/{r['experts']} | {r['tokens']} | {r['nccl_ag_rs_us']} | "
              f"{r['nccl_a2a_us']} | {r['p2p_us']} | {r['p2p_over_a2a']} | {r['p2p_GBps']} | "
              f"{r['p2p_pct_nvlink']} | {r['p2p_dispatch_us']} | {r['p2p_combine_us']} | "
              f"{dec[0]} | {dec[1]} | "
              f"{'-' if r['anchor_a2a_us'] is None else r['best_p2p_over_anchor_a2a']} |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(CONFIGS), figsize=(12, 4.5))
        for ax, (H, E, K) in zip(axes, CONFIGS):
            sub = [r for r in rows if r["hidden"] == H]
            ts = [r["tokens"] for r in sub]
            for key, label in (("nccl_ag_rs_us", "NCCL all_gather+reduce_scatter"),
                               ("nccl_a2a_us", "NCCL all_to_all x2"),
                               ("p2p_us", "llmcomm p2p dispatch+combine")):
                ax.plot(ts, [r[key] for r in sub], marker="o", label=label)
            dec = [r for r in sub if r["p2p_decode_us"] is not None]
            if dec:
                ax.plot([r["tokens"] for r in dec], [r["p2p_decode_us"] for r in dec],
                        marker="x", label=f"llmcomm p2p, decode dispatcher (M={DECODE_M}, "
                                          f"{dec[0]['p2p_decode_protocol']})")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens per rank")
            ax.set_ylabel("us per dispatch+combine")
            ax.set_title(f"EP={args.world}, hidden {H}, {E} experts, top-{K}, bf16")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{meta.get('gpu')} x{args.world}, CUDA-graph replay, {meta['date']}")
        fig.tight_layout()
        fig.savefig(stem + ".png", dpi=120)
        print(f"wrote {stem}.png")
    except Exception as e:  # noqa: BLE001 - the plot is optional
        print(f"no plot: {e}")


if __name__ == "__main__":
    main()
