"""Temporary: localise the lamport MoE failure on 2 GPUs (not part of the project).

Five lamport configurations (shift 0 / default G//2, 8 programs, dispatch tiles of 1 (the
default) or 2) at T = 1, 8, 64, 256 tokens per rank, hidden 7168 / 256 experts / top-8, bf16,
eager; per call: counts vs the routing, combine error vs ``x * sum_k w``. The failures seen on
branch s3-lamport were timing-dependent: repeat it a few times.

    PYTHONPATH=src:. python3 benchmarks/_debug_moe.py
"""
import os
import sys
sys.path[:0] = ["src", "."]
os.environ.setdefault("LLMCOMM_TIMEOUT_S", "3")

def worker(rank, world):
    import torch, torch.distributed as dist
    from llmcomm.moe import EPDispatcher
    H, E, K, M = 7168, 256, 8, 256
    L = E // world
    out = []
    for name, kw in [("s0", {"protocol": "lamport", "shift": 0}),
                     ("s0_G8", {"protocol": "lamport", "shift": 0, "num_programs": 8}),
                     ("G8_s4", {"protocol": "lamport", "num_programs": 8, "shift": 4}),
                     ("s0_t2", {"protocol": "lamport", "shift": 0, "tile_tokens": 2}),
                     ("dflt", {"protocol": "lamport"})]:
        ep = EPDispatcher(dist.group.WORLD, E, K, H, M, torch.bfloat16, backend="p2p",
                          _backend_kwargs=kw)
        for T in (1, 8, 64, 256):
            g = torch.Generator(device="cuda").manual_seed(7 + T + 100 * rank)
            x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, generator=g)
            ids = torch.rand(T, E, device="cuda", generator=g).topk(K, dim=1).indices
            w = torch.rand(T, K, device="cuda", generator=g)
            all_ids = [torch.empty_like(ids) for _ in range(world)]
            dist.all_gather(all_ids, ids)
            want = torch.zeros(L, dtype=torch.int64)
            for row in torch.cat(all_ids).tolist():
                for e in set(row):
                    if e // L == rank:
                        want[e - rank * L] += 1
            step = "dispatch"
            try:
                d = ep.dispatch(x, ids, w)
                torch.cuda.synchronize(); ep.check_errors()
                got = d.counts.cpu().long()
                cnt = "counts ok" if torch.equal(got, want) else f"counts BAD sum {int(got.sum())} want {int(want.sum())}"
                step = "combine"
                y = ep.combine(d.expert_x, d)
                torch.cuda.synchronize(); ep.check_errors()
                ref = x.double() * w.double().sum(1, keepdim=True)
                err = ((y.double() - ref).norm() / ref.norm()).item()
                out.append(f"{name} T={T}: {cnt}, err {err:.2e}")
            except Exception as e:
                out.append(f"{name} T={T}: FAIL in {step}: {type(e).__name__} {str(e)[:160]}")
                break
        dist.barrier()
        ep.close()
        del ep
        torch.cuda.synchronize()
    return out

if __name__ == "__main__":
    from llmcomm.launch import run_ranks
    res = run_ranks(worker, 2, backend="nccl", timeout=200)
    for r, lines in enumerate(res):
        for l in lines:
            print(r, l)
