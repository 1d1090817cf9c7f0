"""Stress the p2p MoE dispatch / combine on 2 GPUs with random sequences of calls, to find
intermittent bugs that a fixed test sequence meets only sometimes (session 18: the lamport
one-token path, ``_one_token_slots``, failed session 17's sentinel test once in two runs).

Both ranks draw the same sequence of per-rank token counts (a shared seed) from a set that
crosses the one-token path's boundaries (0, 1, 2, a few, ``M``). After every call (eager,
synchronised, both ranks idle) each rank checks, against the pure-torch reference of
``tests.distributed._moe_cases``: the dispatch (every expert's count and rows), the combine,
that the "last program out" state is back to zero (``done``, ``cursor``: a call in which the
programs disagree on whether to take part leaves ``done`` non-zero and publishes the next
call's counts one program early), and for lamport every receive slot back to the sentinel.
The ranks exchange a verdict after each call (so one rank's failure stops both, no hang) and
the first failure of each variant is reported with the calls before it.

Usage (2 GPUs; prints progressively, one JSON line per variant at the end)::

    python3 benchmarks/stress_moe_p2p.py [--variants one,lam] [--seconds 60] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import set_safe_env  # noqa: E402

#: name -> P2PBackend keyword arguments
VARIANTS = {
    "one": {"protocol": "lamport", "_one_token_slots": True},
    "lam": {"protocol": "lamport"},
    "flags": {"protocol": "flags"},
}
#: (experts, top_k, hidden, max tokens per rank, dtype name): session 17's sentinel test sizes
CONFIGS = ((16, 3, 264, 40, "float32"), (256, 8, 7168, 96, "bfloat16"))


def _state(ep, rank: int, lamport: bool) -> list[str]:
    """What is not back to its idle value after a call on a quiet group."""
    from tests.distributed._moe_cases import lamport_left

    be = ep._backend
    bad = []
    done = int(be.done.item())
    if done:
        bad.append(f"rank {rank} done = {done} (not 0: programs disagreed on the last-out)")
    cur = be.cursor.cpu()
    if cur.any():
        nz = cur.nonzero().flatten()[:6].tolist()
        bad.append(f"rank {rank} cursor not 0 at experts {nz}: {cur[nz].tolist()}")
    if lamport:
        bad += lamport_left(be, rank)
    return bad


def _roundtrip(ep, rank: int, world: int, E: int, inputs, dtype, device) -> str:
    """One dispatch + combine checked against the reference; returns what failed ("" if
    nothing). The combine runs even when the dispatch check failed, so the peer's combine
    does not wait for this rank until its deadline."""
    import torch

    from tests.distributed._moe_cases import check_combine, check_dispatch, run_experts

    x, ids, w = (t.to(device) for t in inputs[rank])
    d = ep.dispatch(x, ids, w)
    msg = ""
    try:
        check_dispatch(rank, world, E, inputs, d.expert_x, d.counts)
    except AssertionError as e:
        msg = f"dispatch: {e}"
    y = ep.combine(run_experts(rank, E, world, d.expert_x, d.counts), d)
    if device != "cpu":
        torch.cuda.synchronize()
    if not msg:
        try:
            check_combine(rank, inputs, y, dtype, what="combine")
        except AssertionError as e:
            msg = f"combine: {e}"
    return msg


def _worker(rank: int, world: int, names: list[str], seconds: float, seed: int,
            sim_dir: str | None):
    import random
    import traceback

    import torch
    import torch.distributed as dist

    from llmcomm.moe import EPDispatcher
    from tests.distributed._moe_cases import make_inputs

    device = "cpu" if sim_dir else "cuda"
    configs = ((16, 3, 40, 13, "float32"),) if sim_dir else CONFIGS
    results = []
    for name in names:
        kw = dict(VARIANTS[name])
        for ci, (E, K, H, M, dt) in enumerate(configs):
            dtype = getattr(torch, dt)
            if sim_dir:
                from llmcomm.moe.p2p import P2PBackend

                d = os.path.join(sim_dir, f"{name}{ci}")
                os.makedirs(d, exist_ok=True)
                ep = EPDispatcher(dist.group.WORLD, E, K, H, M, dtype, _backend_cls=P2PBackend,
                                  _backend_kwargs=dict(simulate_dir=d, num_programs=3, **kw))
            else:
                ep = EPDispatcher(dist.group.WORLD, E, K, H, M, dtype, backend="p2p",
                                  _backend_kwargs=kw)
                ep.warmup(topk_ids_dtype=torch.int64)
            lamport = kw.get("protocol") == "lamport"
            rng = random.Random(seed)          # the same sequence on both ranks
            choices = [0, 1, 1, 1, 2, 3, 8, 17, M]
            hist: list[list[int]] = []
            fail = None
            t0 = time.monotonic()
            n = 0
            while True:
                flag = torch.tensor([time.monotonic() - t0 > seconds], dtype=torch.int32,
                                    device=device)
                dist.all_reduce(flag)          # stop together
                if flag.item():
                    break
                toks = [min(rng.choice(choices), M) for _ in range(world)]
                hist.append(toks)
                routing = rng.choice(["random", "random", "random", "dups", "one_expert"])
                inputs = make_inputs(rng.randrange(1 << 30), world, toks, E, K, H, dtype,
                                     routing)
                try:
                    msg = _roundtrip(ep, rank, world, E, inputs, dtype, device)
                except Exception:          # a deadline (CollectiveTimeoutError) and the like
                    msg = "raised: " + traceback.format_exc(limit=3)
                dist.barrier()
                left = [] if msg.startswith("raised") else _state(ep, rank, lamport)
                bad = torch.tensor([bool(msg or left)], dtype=torch.int32, device=device)
                dist.all_reduce(bad)
                n += 1
                if bad.item():
                    fail = {"call": n - 1, "tokens": toks, "routing": routing,
                            "before": hist[-6:-1], "rank_error": msg[:600],
                            "state": left[:6]}
                    break
                if n % 200 == 0 and rank == 0:
                    print(f"  {name} E={E} H={H}: {n} calls ok ({time.monotonic() - t0:.0f} s)",
                          flush=True)
            res = {"variant": name, "E": E, "K": K, "H": H, "M": M, "calls": n,
                   "seconds": round(time.monotonic() - t0, 1), "first_failure": fail}
            if rank == 0 or fail:
                print(json.dumps({"rank": rank, **res}), flush=True)
            results.append(res)
            dist.barrier()   # after a failure the next config gets a fresh dispatcher
    return results


def main() -> None:
    set_safe_env()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="one,lam", help=f"of {sorted(VARIANTS)}")
    ap.add_argument("--seconds", type=float, default=60.0, help="per variant and config")
    ap.add_argument("--seed", type=int, default=18)
    ap.add_argument("--timeout-s", default="5", help="LLMCOMM_TIMEOUT_S for the ranks")
    ap.add_argument("--out", default=None, help="folder for stress_moe_p2p.json")
    ap.add_argument("--sim", action="store_true",
                    help="CPU: the kernels' simulation on gloo, one small config")
    a = ap.parse_args()
    names = a.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; expected some of {sorted(VARIANTS)}")
    from llmcomm.launch import run_ranks

    budget = len(names) * len(CONFIGS) * (a.seconds + 90) + 60
    env = {"LLMCOMM_TIMEOUT_S": a.timeout_s}
    if a.sim:   # the CPU simulation (TRITON_INTERPRET): a smoke run of this script
        import tempfile

        env["TRITON_INTERPRET"] = "1"
        with tempfile.TemporaryDirectory() as tmp:
            res = run_ranks(_worker, 2, names, a.seconds, a.seed, tmp, backend="gloo",
                            timeout=budget, env=env)
    else:
        res = run_ranks(_worker, 2, names, a.seconds, a.seed, None, backend="nccl",
                        timeout=budget, env=env)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "stress_moe_p2p.json"), "w") as f:
            json.dump({"argv": sys.argv, "results": res}, f, indent=1)
    bad = [r for rr in res for r in rr if r["first_failure"]]
    print(f"stress: {sum(r['calls'] for r in res[0])} calls, "
          f"{len(bad)} failures over ranks", flush=True)


if __name__ == "__main__":
    main()
