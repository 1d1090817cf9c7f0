"""Stress the p2p MoE dispatch / combine on 2 GPUs with random sequences of calls, to find
intermittent bugs that a fixed test sequence meets only sometimes (session 18: the lamport
one-token path, ``_one_token_slots``, failed session 17's sentinel test once in two runs; never
reproduced, the path removed in session 29).

Both ranks draw the same sequence of per-rank token counts (a shared seed) from a set that
crosses the one-token path's boundaries (0, 1, 2, a few, ``M``). After every call (eager,
synchronised, both ranks idle) each rank checks, against the pure-torch reference of
``tests.distributed._moe_cases``: the dispatch (every expert's count and rows), the combine,
that the "last program out" state is back to zero (``done``, ``cursor``: a call in which the
programs disagree on whether to take part leaves ``done`` non-zero and publishes the next
call's counts one program early), and for lamport every receive slot back to the sentinel.
The ranks exchange a verdict after each call (so one rank's failure stops both, no hang) and
the first failure of each variant is reported with the calls before it.

Usage (prints progressively, one JSON line per variant and size)::

    python3 benchmarks/stress_moe_p2p.py [--variants lam,flags] [--seconds 60] [--out DIR]
    python3 benchmarks/stress_moe_p2p.py --loopback ...   # one GPU: both ranks on it
    python3 benchmarks/stress_moe_p2p.py --sim ...        # CPU simulation: a smoke run

Checking costs most of a call's time at the large size (its rows come to the host): on
2 x H200 a second of stress is ~18 calls at H=264 and, before the checks copied only the
counted rows, 0.35 at H=7168 (session 18, call 1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import set_safe_env  # noqa: E402

#: name -> P2PBackend keyword arguments ("packed", "fp8": the dispatcher's,
#: EPDispatcher(packed=True, fp8=True))
VARIANTS = {
    "lam": {"protocol": "lamport"},
    # 32 programs: with --loopback, two grids a rank fit one GPU (2 x 2 x 32 <= 132 SMs), so
    # the loopback keeps the lamport default's PDL on (llmcomm.moe.loopback.loopback_pdl)
    "lam-g32": {"protocol": "lamport", "num_programs": 32},
    "flags": {"protocol": "flags"},
    # 8 programs: several tokens a program, in rounds (the large-batch shape at small sizes)
    "flags-g8": {"protocol": "flags", "num_programs": 8},
    # the packed expert_x (session 31): the count exchange before the flags dispatch
    "flags-packed": {"protocol": "flags", "packed": True},
    # the fp8 dispatch (session 32): wire rows of fp8 bytes + scales; hidden rounded down to
    # a multiple of 128 (264 -> 256 at the small size). Not with --free (its identity experts
    # would combine the wire rows)
    "flags-fp8": {"protocol": "flags", "fp8": True},
    # ... through the lamport dispatch (session 33): the sentinel bit pattern in wire rows
    "lam-fp8": {"protocol": "lamport", "fp8": True},
}
#: size -> (experts, top_k, hidden, max tokens per rank, dtype name): "small" and "large" are
#: session 17's sentinel test sizes; "large64" is the large size at 64 tokens, whose grid (64
#: programs) fits loopback on one GPU (66 programs a rank on 132 SMs) with one peer token a
#: program at T = 64, as "large" has on two GPUs (96 programs)
CONFIGS = {"small": (16, 3, 264, 40, "float32"), "large": (256, 8, 7168, 96, "bfloat16"),
           "large64": (256, 8, 7168, 64, "bfloat16")}
SIM_CONFIGS = ((16, 3, 40, 13, "float32"),)


def _state(be, rank: int, lamport: bool) -> list[str]:
    """What of backend ``be`` (rank ``rank``'s) is not back to its idle value after a call on
    a quiet group."""
    from tests.distributed._moe_cases import lamport_left

    bad = []
    done = int(be.done.item())
    if done:
        bad.append(f"rank {rank} done = {done} (not 0: programs disagreed on the last-out)")
    cur = be.cursor.cpu()
    if cur.any():
        nz = cur.nonzero().flatten()[:6].tolist()
        bad.append(f"rank {rank} cursor not 0 at experts {nz}: {cur[nz].tolist()}")
    if getattr(getattr(be, "cfg", None), "packed", False):   # the count exchange's state
        if be.hsum.any() or int(be.hdone.item()):
            bad.append(f"rank {rank} packed exchange state not reset: hdone "
                       f"{int(be.hdone.item())}, hsum nonzero at "
                       f"{be.hsum.nonzero().flatten()[:6].tolist()}")
    if lamport:
        bad += lamport_left(be, rank)
    return bad


def _hidden(H: int, kw: dict) -> int:
    """A config's hidden size for variant keywords ``kw``: fp8 needs a multiple of 128."""
    return max(128, H // 128 * 128) if kw.get("fp8") else H


def _check_dispatch(rank: int, world: int, E: int, inputs, d) -> str:
    """Rank ``rank``'s dispatch ``d`` (expert_x, counts[, offsets: a packed one's[, scale: an
    fp8 one's]]) against the reference; what failed (every expert whose count is off, not only
    the first), "" if nothing."""
    from llmcomm.moe.reference import reference_dispatch
    from tests.distributed._moe_cases import check_dispatch

    try:
        check_dispatch(rank, world, E, inputs, d[0], d[1], d[2] if len(d) > 2 else None,
                       scale=d[3] if len(d) > 3 else None)
    except AssertionError as e:
        ref = reference_dispatch([i for _, i, _ in inputs], E, rank)
        want = [len(ref[le]) for le in range(len(ref))]
        got = d[1].cpu().tolist()
        off = [(le, got[le], want[le]) for le in range(len(want)) if got[le] != want[le]]
        return f"{e} [(expert, count, expected) off: {off[:8]}]"
    return ""


def _check_combine(rank: int, inputs, dtype, y, fp8: bool = False) -> str:
    """Rank ``rank``'s combine output ``y`` against the reference (``fp8``: of the quantised
    tokens); what failed, "" if nothing."""
    from tests.distributed._moe_cases import check_combine

    try:
        check_combine(rank, inputs, y, dtype, what="combine", fp8=fp8)
    except AssertionError as e:
        return str(e)
    return ""


def _check(rank: int, world: int, E: int, inputs, dtype, d, y) -> str:
    """:func:`_check_dispatch`, then (if it passed) :func:`_check_combine`."""
    return _check_dispatch(rank, world, E, inputs, d) or \
        _check_combine(rank, inputs, dtype, y, fp8=len(d) > 3 and d[3] is not None)


def _stress(name: str, cfg: tuple, seconds: float, seed: int, call, state, agree,
            replay: bool = False) -> dict:
    """Random calls for ``seconds`` (``replay``: the sentinel test's calls, with the
    one-token ones, over and over instead: ``tests.distributed._moe_cases.sentinel_calls``).
    ``call(inputs) -> str`` runs and checks one (what failed, "" if nothing), ``state() ->
    list[str]`` is what is not idle after it, ``agree(flag)`` the flag or-ed over the ranks
    (so they stop together). Returns the summary, with the first failure and
    the five calls before it."""
    import random
    import traceback

    import torch

    from tests.distributed._moe_cases import make_inputs, sentinel_calls

    E, K, H, M, dt = cfg
    dtype = getattr(torch, dt)
    rng = random.Random(seed)          # the same sequence on every rank
    choices = [0, 1, 1, 1, 2, 3, 8, 17, M]
    hist: list[list[int]] = []
    fail = None
    t0 = time.monotonic()
    n = 0
    fixed = sentinel_calls(M)
    while not agree(time.monotonic() - t0 > seconds):
        if replay:
            toks, iseed, routing = fixed[n % len(fixed)], 70 + n % len(fixed), "random"
        else:
            toks = [min(rng.choice(choices), M) for _ in range(2)]
            routing = rng.choice(["random", "random", "random", "dups", "one_expert"])
            iseed = rng.randrange(1 << 30)
        hist.append(toks)
        inputs = make_inputs(iseed, 2, toks, E, K, H, dtype, routing)
        try:
            msg = call(inputs)
        except Exception:          # a deadline (CollectiveTimeoutError) and the like
            msg = "raised: " + traceback.format_exc(limit=3)
        left = [] if msg.startswith("raised") else state()
        n += 1
        if agree(bool(msg or left)):
            fail = {"call": n - 1, "tokens": toks, "routing": routing, "before": hist[-6:-1],
                    "error": msg[:600], "state": left[:6]}
            break
        if n % 500 == 0:
            print(f"  {name} E={E} H={H}: {n} calls ok ({time.monotonic() - t0:.0f} s)",
                  flush=True)
    return {"variant": name, "E": E, "K": K, "H": H, "M": M, "calls": n,
            "seconds": round(time.monotonic() - t0, 1), "first_failure": fail}


def _worker(rank: int, world: int, names: list[str], sizes: list[str], seconds: float,
            seed: int, sim_dir: str | None, replay: bool = False):
    """One rank of a 2-GPU group (NCCL), or of the CPU simulation (gloo, ``sim_dir``)."""
    import traceback

    import torch
    import torch.distributed as dist

    from llmcomm.moe import EPDispatcher
    from tests.distributed._moe_cases import run_experts

    device = "cpu" if sim_dir else "cuda"

    def agree(flag: bool) -> bool:
        t = torch.tensor([flag], dtype=torch.int32, device=device)
        dist.all_reduce(t)
        return bool(t.item())

    results = []
    for name in names:
        kw = dict(VARIANTS[name])
        packed = kw.pop("packed", False)
        fp8 = kw.pop("fp8", False)
        for ci, cfg in enumerate(SIM_CONFIGS if sim_dir else [CONFIGS[z] for z in sizes]):
            E, K, H, M, dt = cfg
            H = _hidden(H, {"fp8": fp8})
            cfg = (E, K, H, M, dt)
            dtype = getattr(torch, dt)
            if sim_dir:
                from llmcomm.moe.p2p import P2PBackend

                d = os.path.join(sim_dir, f"{name}{ci}")
                os.makedirs(d, exist_ok=True)
                ep = EPDispatcher(dist.group.WORLD, E, K, H, M, dtype, _backend_cls=P2PBackend,
                                  _backend_kwargs={"num_programs": 3, **kw, "simulate_dir": d},
                                  packed=packed, fp8=fp8)
            else:
                ep = EPDispatcher(dist.group.WORLD, E, K, H, M, dtype, backend="p2p",
                                  _backend_kwargs=kw, packed=packed, fp8=fp8)
                ep.warmup(topk_ids_dtype=torch.int64)

            def call(inputs):
                try:
                    x, ids, w = (t.to(device) for t in inputs[rank])
                    d = ep.dispatch(x, ids, w)
                    # checked before the combine, as the tests' roundtrip does (its host time
                    # between the two kernels differs per rank); the combine runs whatever
                    # the dispatch gave: the peer's waits for it
                    msg = _check_dispatch(rank, world, E, inputs,
                                          (d.expert_x, d.counts, d.offsets, d.expert_x_scale))
                    y = ep.combine(run_experts(rank, E, world, d.expert_x, d.counts, d.offsets,
                                               d.expert_x_scale, dtype), d)
                    if device != "cpu":
                        torch.cuda.synchronize()
                    msg = msg or _check_combine(rank, inputs, dtype, y, fp8)
                except Exception:   # a deadline and the like: still meet the peer below
                    msg = "raised: " + traceback.format_exc(limit=3)
                dist.barrier()   # both ranks idle before the state is read
                return msg

            res = _stress(name, cfg, seconds, seed, call,
                          lambda: _state(ep._backend, rank, kw.get("protocol") == "lamport"),
                          agree, replay)
            if rank == 0 or res["first_failure"]:
                print(json.dumps({"rank": rank, **res}), flush=True)
            results.append(res)
            dist.barrier()   # after a failure the next config gets a fresh dispatcher
    return results


def _warm_loopbacks(names: list[str], sizes: list[str], what: str):
    """For every variant and size: ``(name, backend kwargs, config, dtype, Loopback)``, both
    ranks on one GPU, every backend warmed up first (compiling a large size's kernels while the
    peers spin would take most of the stress time)."""
    import torch

    from llmcomm.moe.dispatcher import warm_token_counts
    from llmcomm.moe.loopback import Loopback

    for name in names:
        kw = dict(VARIANTS[name])
        for cfg in [CONFIGS[z] for z in sizes]:
            E, K, H, M, dt = cfg
            H = _hidden(H, kw)
            cfg = (E, K, H, M, dt)
            dtype = getattr(torch, dt)
            lb = Loopback(2, E, K, H, M, dtype, **kw)
            t0 = time.monotonic()
            for be in lb.backends:
                be.warmup(warm_token_counts(M), (torch.int32, torch.int64), torch.float32)
            print(f"  {name} E={E} H={H}{what}: warmup {time.monotonic() - t0:.0f} s",
                  flush=True)
            yield name, kw, cfg, dtype, lb


def _loopback(names: list[str], sizes: list[str], seconds: float, seed: int,
              replay: bool = False) -> list[dict]:
    """Both ranks on one GPU (:class:`llmcomm.moe.loopback.Loopback`), every backend warmed
    up first (:func:`_warm_loopbacks`), each call checked as it returns."""
    from llmcomm.moe.fp8 import split_wire
    from tests.distributed._moe_cases import run_experts

    results = []
    for name, kw, cfg, dtype, lb in _warm_loopbacks(names, sizes, ""):
        E, K, H, M, dt = cfg

        def call(inputs):
            xs, ids, ws = ([t.cuda() for t in z] for z in zip(*inputs))
            outs = lb.dispatch(xs, ids, ws)
            ds = []   # (expert_x, counts, offsets, scale): fp8 wire rows split as the
            for r, o in enumerate(outs):   # dispatcher does
                ex, scale = split_wire(o[0], H) if lb.fp8 else (o[0], None)
                ds.append((ex, o[1], lb.backends[r].offsets(o[1]) if lb.packed else None,
                           scale))
            ys = lb.combine([run_experts(r, E, 2, *d, dtype) for r, d in enumerate(ds)],
                            outs, [x.shape[0] for x in xs])
            lb.check_errors()
            return "; ".join(m for r in range(2)
                             if (m := _check(r, 2, E, inputs, dtype, ds[r], ys[r])))

        res = _stress(name, cfg, seconds, seed, call,
                      lambda: [b for r, be in enumerate(lb.backends)
                               for b in _state(be, r, kw.get("protocol") == "lamport")],
                      bool, replay)
        print(json.dumps(res), flush=True)
        results.append(res)
    return results


def _free_loopback(names: list[str], sizes: list[str], seconds: float, seed: int,
                   batch: int = 64) -> list[dict]:
    """Both ranks on one GPU, running free: batches of ``batch`` random calls launched on the
    rank streams with one fork before and one join after each batch (no synchronisation between
    the calls, so the ranks drift against each other as on two GPUs -- :class:`Loopback`'s own
    calls fork and join around every call). Experts are the identity (nothing on the host
    between a dispatch and its combine); each call's ``counts`` and combine output are copied
    aside on the rank's stream and checked after the batch, then the "last program out" state
    and the lamport slots."""
    import random

    import torch

    from llmcomm.errors import CollectiveTimeoutError
    from tests.distributed._moe_cases import check_identity_call, make_inputs

    results = []
    for name, kw, cfg, dtype, lb in _warm_loopbacks(names, sizes, " (free-running)"):
        E, K, H, M, dt = cfg
        rng = random.Random(seed)
        choices = [0, 1, 1, 1, 2, 3, 8, 17, M]
        n, fail, t0 = 0, None, time.monotonic()
        while fail is None and time.monotonic() - t0 < seconds:
            calls = []
            for _ in range(batch):
                toks = [min(rng.choice(choices), M) for _ in range(2)]
                routing = rng.choice(["random", "random", "random", "dups", "one_expert"])
                inputs = make_inputs(rng.randrange(1 << 30), 2, toks, E, K, H, dtype,
                                     routing)
                calls.append((toks, routing, inputs,
                              [[t.cuda() for t in inputs[r]] for r in range(2)]))
            counts = [[None] * batch for _ in range(2)]
            ys = [[None] * batch for _ in range(2)]
            cur = torch.cuda.current_stream()
            for st in lb.streams:
                st.wait_stream(cur)
            order = [(r, i) for r in range(2) for i in range(batch)]   # rank after rank
            if rng.random() < 0.5:                                    # or call after call
                order.sort(key=lambda ri: ri[1])
            for r, i in order:
                be, (x, ids, w) = lb.backends[r], calls[i][3][r]
                with torch.cuda.stream(lb.streams[r]):
                    ex, cnt, state = be.dispatch(x, ids, w)
                    counts[r][i] = cnt.clone()
                    ys[r][i] = be.combine(ex, state, x.shape[0])   # identity experts
            for st in lb.streams:
                cur.wait_stream(st)
            msg = ""
            try:
                lb.check_errors()
            except CollectiveTimeoutError as e:
                msg = f"raised: {e}"
            bad_call = None
            for i in range(batch if not msg else 0):
                msg = "; ".join(m for r in range(2) if (m := check_identity_call(
                    r, E, dtype, calls[i][2], counts[r][i], ys[r][i])))
                if msg:
                    bad_call = i
                    break
            left = [] if msg.startswith("raised") else [
                b for r, be in enumerate(lb.backends)
                for b in _state(be, r, kw.get("protocol") == "lamport")]
            if msg or left:
                i = batch - 1 if bad_call is None else bad_call
                fail = {"call": n + i, "tokens": calls[i][0], "routing": calls[i][1],
                        "before": [c[0] for c in calls[max(0, i - 5):i]],
                        "error": msg[:600], "state": left[:6]}
            n += batch if fail is None else (0 if bad_call is None else bad_call + 1)
            if fail is None and n % (8 * batch) == 0:
                print(f"  {name} E={E} H={H}: {n} calls ok ({time.monotonic() - t0:.0f} s)",
                      flush=True)
        res = {"variant": name, "E": E, "K": K, "H": H, "M": M, "free_running": True,
               "calls": n, "seconds": round(time.monotonic() - t0, 1),
               "first_failure": fail}
        print(json.dumps(res), flush=True)
        results.append(res)
    return results


def main() -> None:
    set_safe_env()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="lam", help=f"of {sorted(VARIANTS)}")
    ap.add_argument("--seconds", type=float, default=60.0, help="per variant and size")
    ap.add_argument("--sizes", default="small,large", help=f"of {sorted(CONFIGS)}")
    ap.add_argument("--seed", type=int, default=18)
    ap.add_argument("--timeout-s", default="5", help="LLMCOMM_TIMEOUT_S for the ranks")
    ap.add_argument("--out", default=None, help="folder for stress_moe_p2p.json")
    ap.add_argument("--sim", action="store_true",
                    help="CPU: the kernels' simulation on gloo, one small config")
    ap.add_argument("--replay", action="store_true",
                    help="the sentinel test's call sequence over and over, not random calls")
    ap.add_argument("--loopback", action="store_true",
                    help="one GPU: both ranks on it (llmcomm.moe.loopback.Loopback)")
    ap.add_argument("--free", action="store_true",
                    help="with --loopback: batches of calls with no synchronisation between "
                         "them (the ranks drift as on two GPUs), checked after each batch")
    a = ap.parse_args()
    names = a.variants.split(",")
    sizes = a.sizes.split(",")
    for what, got, known in (("variants", names, VARIANTS), ("sizes", sizes, CONFIGS)):
        unknown = [n for n in got if n not in known]
        if unknown:
            raise SystemExit(f"unknown {what} {unknown}; expected some of {sorted(known)}")
    from llmcomm.launch import run_ranks

    budget = len(names) * len(sizes) * (a.seconds + 120) + 60
    env = {"LLMCOMM_TIMEOUT_S": a.timeout_s}
    if a.free and not a.loopback:
        raise SystemExit("--free needs --loopback (on 2 GPUs the ranks run free already)")
    if a.free and any(VARIANTS[n].get("fp8") for n in names):
        raise SystemExit("--free combines with identity experts, the dispatched rows as they "
                         "came: not an fp8 variant's wire rows; run it without --free")
    if a.loopback:
        os.environ.setdefault("LLMCOMM_TIMEOUT_S", a.timeout_s)
        res = [_free_loopback(names, sizes, a.seconds, a.seed) if a.free
               else _loopback(names, sizes, a.seconds, a.seed, a.replay)]
    elif a.sim:   # the CPU simulation (TRITON_INTERPRET): a smoke run of this script
        import tempfile

        env["TRITON_INTERPRET"] = "1"
        with tempfile.TemporaryDirectory() as tmp:
            res = run_ranks(_worker, 2, names, sizes, a.seconds, a.seed, tmp, a.replay,
                            backend="gloo", timeout=budget, env=env)
    else:
        res = run_ranks(_worker, 2, names, sizes, a.seconds, a.seed, None, a.replay,
                        backend="nccl", timeout=budget, env=env)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "stress_moe_p2p.json"), "w") as f:
            json.dump({"argv": sys.argv, "results": res}, f, indent=1)
    bad = [r for rr in res for r in rr if r["first_failure"]]
    print(f"stress: {sum(r['calls'] for r in res[0])} calls, "
          f"{len(bad)} failures (counted on every rank that saw one)", flush=True)


if __name__ == "__main__":
    main()
