"""MoE EP token exchange on one node: NCCL all_gather/reduce_scatter, NCCL all_to_all, llmcomm p2p.

Every figure: dispatch + combine, a CUDA-graph replay of back-to-back calls, median of 7
replays, max over ranks (``benchmarks/_common.time_graph``). Inputs bf16, routing uniform random
top-k. ``nccl_ag_rs``: all_gather of every token then reduce_scatter (the engines' fallback);
``nccl_a2a``: two all_to_all_single with equal splits of T rows (with top-8 over 2 ranks nearly
every token goes to both ranks); ``p2p``: EPDispatcher(backend="p2p") dispatch + combine
(expert outputs = expert inputs). ``p2p_GBps``: bytes that cross NVLink in one direction
(deduplicated rows to the peer, dispatch + combine) divided by the time; the one-way NVLink
limit measured on this machine is 394 GB/s.

    PYTHONPATH=src:. python3 benchmarks/bench_moe.py [--tokens 1,8,...] [--out benchmarks/results]
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


def _worker(rank, world, tokens, programs):
    import torch
    import torch.distributed as dist

    from benchmarks._common import time_graph
    from llmcomm.moe import EPDispatcher

    rows = []
    dtype = torch.bfloat16
    M = max(tokens)
    for H, E, K in CONFIGS:
        kw = {} if programs is None else {"_backend_kwargs": {"num_programs": programs}}
        ep = EPDispatcher(dist.group.WORLD, E, K, H, M, dtype, backend="p2p", **kw)
        g = torch.Generator(device="cuda").manual_seed(1234 + rank)
        for T in tokens:
            x = torch.randn(T, H, device="cuda", dtype=dtype, generator=g)
            ids = torch.rand(T, E, device="cuda", generator=g).topk(K, dim=1).indices
            w = torch.rand(T, K, device="cuda", generator=g)
            L = E // world
            owner = ids // L
            to_peer = int(sum((owner == d).any(dim=1).sum().item()
                              for d in range(world) if d != rank))
            iters = 50 if T <= 512 else 20

            def p2p():
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
            t_ag = time_graph(ag_rs, iters=iters)
            t_a2a = time_graph(a2a, iters=iters)
            peer_rows = torch.tensor([to_peer], device="cuda", dtype=torch.float64)
            dist.all_reduce(peer_rows, op=dist.ReduceOp.MAX)
            nbytes = 2 * peer_rows.item() * H * 2          # dispatch + combine, one direction
            gbps = nbytes / (t_p2p * 1e-6) / 1e9
            rows.append({"hidden": H, "experts": E, "top_k": K, "tokens": T,
                         "nccl_ag_rs_us": round(t_ag, 2), "nccl_a2a_us": round(t_a2a, 2),
                         "p2p_us": round(t_p2p, 2), "p2p_over_a2a": round(t_p2p / t_a2a, 3),
                         "p2p_GBps": round(gbps, 1),
                         "p2p_pct_nvlink": round(100 * gbps / NVLINK_GBPS, 1)})
            if rank == 0:
                print(rows[-1], flush=True)
        ep.close()
        del ep
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--programs", type=int, default=None, help="p2p grid size (default: auto)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--world", type=int, default=2)
    args = ap.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]

    from benchmarks._common import environment, write_results
    from tests._dist import run_ranks

    res = run_ranks(_worker, args.world, tokens, args.programs, backend="nccl", timeout=560)
    rows = res[0]
    meta = environment()
    meta.update(world=args.world, note=__doc__.split("\n\n")[1].replace("\n", " "))
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"moe_ep{args.world}")
    csv_path, json_path = write_results(stem, rows, meta)
    print(f"wrote {csv_path} {json_path}")
    print("| hidden/experts | tokens | nccl ag+rs us | nccl a2a us | p2p us | p2p/a2a | p2p GB/s "
          "| % of 394 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['hidden']}/{r['experts']} | {r['tokens']} | {r['nccl_ag_rs_us']} | "
              f"{r['nccl_a2a_us']} | {r['p2p_us']} | {r['p2p_over_a2a']} | {r['p2p_GBps']} | "
              f"{r['p2p_pct_nvlink']} |")
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
