"""Allreduce (+ residual + RMSNorm (+FP8)) latency ladder on one node, TP = number of GPUs.

Variants (all CUDA-graph replays of --iters back-to-back calls, median of --reps, max over ranks):
  nccl_ar          NCCL allreduce
  nccl_unfused     NCCL allreduce, residual add, F.rms_norm (three kernels)
  nccl_epilogue    NCCL allreduce + llmcomm's Triton add+RMSNorm epilogue (the torch backend)
  symm1_unfused    torch symm-mem one_shot_all_reduce + add + rms_norm
  symm2_unfused    torch symm-mem two_shot_all_reduce_ + add + rms_norm
  fi_ar, fi_fused  FlashInfer trtllm allreduce / allreduce+residual+RMSNorm (if importable)
  llm_ar, llm_fused, llm_fused_fp8   llmcomm p2p backend (strategy from llmcomm.policy)
  llm_fused[lamport|oneshot|twoshot] llmcomm fused with the strategy forced (--strategies)

--sweep: instead of the ladder, time the fused op (bf16) for each entry of SWEEP (forced
strategy x LaunchTable knobs; --sweep-only a,b for a subset) at --sweep-tokens x --hidden, every configuration checked inline
against the pure-torch reference first (worst relative error printed and recorded). A
configuration that times out (e.g. a Lamport grid that is not fully resident; the sweep sets
LLMCOMM_TIMEOUT_S=5 unless set) is recorded as an error and the backend is recreated.
Writes <out>/allreduce_sweep_<gpu>_<date>.json.

Usage: PYTHONPATH=src:. python3 benchmarks/bench_allreduce.py [--hidden 4096 8192]
       [--tokens 1 4 ... 8192] [--check] [--strategies] [--sweep] [--out benchmarks/results]
Writes <out>/allreduce_<gpu>_<date>.{csv,json,png}; prints a table of microseconds per call.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, progress, time_graph, write_results  # noqa: E402

FI_MAX_TOKENS = 2048
#: --sweep: name -> (forced strategy or None for the policy, LaunchTable keyword overrides)
SWEEP = {
    "auto": (None, {}),
    "chunked": ("lamport", {"lamport_rows_min_tiles": 0}),
    "chunked_c2": ("lamport", {"lamport_rows_min_tiles": 0, "lamport_chunk_vecs": 2}),
    "rows": ("lamport", {"lamport_rows_min_tiles": 1}),
    "rows_lag2": ("lamport", {"lamport_rows_min_tiles": 1, "lamport_lag": 2}),
    "rows_narrow": ("lamport", {"lamport_rows_min_tiles": 1, "lamport_rows_wide_tiles": 0}),
    "rows_p256": ("lamport", {"lamport_rows_min_tiles": 1, "lamport_max_programs": 256}),
    "rows_p256_w8": ("lamport", {"lamport_rows_min_tiles": 1, "lamport_max_programs": 256,
                                 "norm_max_warps": 8}),
    "rows_p256_w4": ("lamport", {"lamport_rows_min_tiles": 1, "lamport_max_programs": 256,
                                 "norm_max_warps": 4}),
    "oneshot": ("oneshot", {}),
    "twoshot": ("twoshot", {}),
}
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1"}


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float(((a - b).norm() / b.norm().clamp_min(1e-30)).item())


def _init_rank(rank, world, port):
    """NCCL process group for this rank (multicast off); returns (device, group of all ranks)."""
    os.environ.update(SAFE_ENV)
    import torch
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=dev)
    return dev, dist.new_group(list(range(world)))


def worker(rank, world, args, port, out_path):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    dev, group = _init_rank(rank, world, port)
    gname = group.group_name
    from llmcomm import reference
    from llmcomm.allreduce.p2p import P2PAllReduceBackend
    from llmcomm.kernels.epilogue import add_rms_norm_epilogue

    dtype = torch.bfloat16
    eps = 1e-6
    rows, errors, checks = [], {}, []
    for H in args.hidden:
        maxT = max(args.tokens)
        be = P2PAllReduceBackend(group, H, dtype, maxT, dev)
        try:
            import torch.distributed._symmetric_memory as symm_mem
            sbuf = symm_mem.empty(maxT * H, dtype=dtype, device=dev)
            symm_mem.rendezvous(sbuf, gname)
        except Exception as e:  # noqa: BLE001
            errors[f"symm_setup_{H}"] = repr(e)
            sbuf = None
        fi = None
        try:
            import flashinfer.comm as fic
            ws = fic.create_allreduce_fusion_workspace(
                backend="trtllm", world_size=world, rank=rank, max_token_num=FI_MAX_TOKENS,
                hidden_dim=H, dtype=dtype)
            fi = (fic, ws)
        except Exception:  # noqa: BLE001
            errors[f"fi_setup_{H}"] = traceback.format_exc()[-600:]
        w = (torch.rand(H, device=dev) + 0.5).to(dtype)
        scale = torch.tensor([0.05], device=dev)
        for T in progress(args.tokens, rank == 0, f"allreduce H={H}"):
            g = torch.Generator(device=dev).manual_seed(1234 + T)
            xs = [(torch.randn(T, H, generator=g, device=dev) * 0.5).to(dtype)
                  for _ in range(world)]
            x0 = xs[rank]
            res = torch.randn(T, H, generator=g, device=dev).to(dtype)
            x = x0.clone()
            y = torch.empty_like(x0)
            normed = torch.empty_like(x0)
            rout = torch.empty_like(x0)
            q = torch.empty(T, H, device=dev, dtype=torch.float8_e4m3fn)
            row = {"hidden": H, "tokens": T}

            def reset():
                x.copy_(x0)

            v = {}
            v["nccl_ar"] = (lambda: dist.all_reduce(x, group=group), reset)

            def nccl_unfused():
                dist.all_reduce(x, group=group)
                return F.rms_norm(x + res, (H,), w, eps)
            v["nccl_unfused"] = (nccl_unfused, reset)

            def nccl_epi():
                dist.all_reduce(x, group=group)
                add_rms_norm_epilogue(x, res, w, eps, normed, rout)
            v["nccl_epilogue"] = (nccl_epi, reset)
            if sbuf is not None:
                sv = sbuf[: T * H].view(T, H)
                sv.copy_(x0)

                def s1():
                    yy = torch.ops.symm_mem.one_shot_all_reduce(sv, "sum", gname)
                    return F.rms_norm(yy + res, (H,), w, eps)

                def s2():
                    torch.ops.symm_mem.two_shot_all_reduce_(sv, "sum", gname)
                    return F.rms_norm(sv + res, (H,), w, eps)
                v["symm1_unfused"] = (s1, None)
                v["symm2_unfused"] = (s2, lambda: sv.copy_(x0))
            if fi is not None and T <= FI_MAX_TOKENS:
                fic, ws = fi

                def fi_fused():
                    fic.allreduce_fusion(
                        input=x0, workspace=ws,
                        pattern=fic.AllReduceFusionPattern.kARResidualRMSNorm,
                        launch_with_pdl=True, residual_out=rout, norm_out=normed,
                        residual_in=res, rms_gamma=w, rms_eps=eps)

                def fi_ar():
                    fic.allreduce_fusion(input=x0, workspace=ws,
                                         pattern=fic.AllReduceFusionPattern.kAllReduce,
                                         launch_with_pdl=True, output=y)
                v["fi_ar"] = (fi_ar, None)
                v["fi_fused"] = (fi_fused, None)

            def llm_ar():
                be.all_reduce(x0, y)

            def llm_fused():
                be.all_reduce_add_rms_norm(x0, res, w, eps, normed, rout)

            def llm_fp8():
                be.all_reduce_add_rms_norm(x0, res, w, eps, normed, rout, quant_scale=scale,
                                           fp8_out=q)
            v["llm_ar"] = (llm_ar, None)
            v["llm_fused"] = (llm_fused, None)
            v["llm_fused_fp8"] = (llm_fp8, None)
            row["llm_strategy"] = be.strategy(T)
            if args.strategies:
                for st in ("lamport", "oneshot", "twoshot"):
                    if st == "lamport" and T * H > be.slot_elems:
                        continue

                    def forced(st=st):
                        be.force_strategy = st
                        be.all_reduce_add_rms_norm(x0, res, w, eps, normed, rout)
                        be.force_strategy = None
                    v[f"llm_fused[{st}]"] = (forced, None)

                def nopdl():
                    be.use_pdl = False
                    be.all_reduce_add_rms_norm(x0, res, w, eps, normed, rout)
                    be.use_pdl = True
                v["llm_fused[nopdl]"] = (nopdl, None)

            if args.check:
                ref_n, ref_r = reference.all_reduce_add_rms_norm(xs, res, w, eps)
                ref_s = reference.all_reduce(xs)
                fi_fn = v.get("fi_fused", (None,))[0]
                for name, fn in (("llm_fused", llm_fused), ("fi_fused", fi_fn)):
                    if fn is None:
                        continue
                    normed.fill_(float("nan"))
                    rout.fill_(float("nan"))
                    fn()
                    torch.cuda.synchronize()
                    checks.append((H, T, name, _rel(normed, ref_n.float()),
                                   _rel(rout, ref_r.float())))
                y.fill_(float("nan"))
                llm_ar()
                torch.cuda.synchronize()
                checks.append((H, T, "llm_ar", _rel(y, ref_s.float()), 0.0))
                q.zero_()
                llm_fp8()
                torch.cuda.synchronize()
                qref = reference.quantize_fp8(
                    reference.rms_norm(ref_r.float(), w.float(), eps), scale)
                checks.append((H, T, "llm_fused_fp8", _rel(q.float(), qref.float()), 0.0))
                be.check_errors()
            for name, (fn, rs) in v.items():
                try:
                    row[name] = round(time_graph(fn, group, args.iters, args.reps,
                                                 before_replay=rs), 2)
                except Exception:  # noqa: BLE001
                    errors[f"{name}_{H}_{T}"] = traceback.format_exc()[-500:]
                    torch.cuda.synchronize()
            be.check_errors()
            rows.append(row)
            if rank == 0:
                print(f"H={H} T={T} " + " ".join(f"{k}={row[k]}" for k in row
                                                   if k not in ("hidden", "tokens")), flush=True)
        be.close()
        del sbuf
    if rank == 0:
        meta = environment()
        meta.update(world_size=world, dtype=str(dtype), iters=args.iters, reps=args.reps,
                    errors=errors, checks=checks)
        csv_p, json_p = write_results(out_path, rows, meta)
        print("wrote", csv_p, json_p)
        try:
            plot(rows, out_path + ".png", world)
            print("wrote", out_path + ".png")
        except Exception:  # noqa: BLE001
            traceback.print_exc()
        print_table(rows)
        if checks:
            worst = max(checks, key=lambda c: c[3])
            print(f"--check: {len(checks)} checks, worst rel err {worst[3]:.2e} ({worst[:3]})")
            bad = [c for c in checks if c[3] > (3e-2 if c[2].endswith("fp8") else 5e-3)
                   or c[4] > 5e-3]
            print("--check FAILED:" if bad else "--check: all within tolerance", bad[:10])
        for k, e in errors.items():
            print("ERR", k, e[-300:])
    dist.barrier()
    dist.destroy_process_group()


def sweep_worker(rank, world, args, port, out_path):
    """--sweep: every SWEEP entry x hidden x tokens, checked then timed (fused, bf16)."""
    os.environ.setdefault("LLMCOMM_TIMEOUT_S", "5")
    import torch
    import torch.distributed as dist

    dev, group = _init_rank(rank, world, port)
    from llmcomm import reference
    from llmcomm.allreduce.p2p import LaunchTable, P2PAllReduceBackend, launch_plan

    dtype, eps = torch.bfloat16, 1e-6
    rows, errors = [], {}
    t_start = time.time()
    for H in args.hidden:
        maxT = max(args.sweep_tokens)
        lam_bytes = args.sweep_lamport_mib << 20
        be = P2PAllReduceBackend(group, H, dtype, maxT, dev, lamport_max_bytes=lam_bytes)
        w = (torch.rand(H, device=dev) + 0.5).to(dtype)
        for T in args.sweep_tokens:
            g = torch.Generator(device=dev).manual_seed(4321 + T)
            xs = [(torch.randn(T, H, generator=g, device=dev) * 0.5).to(dtype)
                  for _ in range(world)]
            x0 = xs[rank]
            res = torch.randn(T, H, generator=g, device=dev).to(dtype)
            normed, rout = torch.empty_like(x0), torch.empty_like(x0)
            ref_n, ref_r = reference.all_reduce_add_rms_norm(xs, res, w, eps)
            row = {"hidden": H, "tokens": T}
            seen = set()
            for name, (strat, knobs) in args.sweep_entries.items():
                if strat == "lamport" and T * H > be.slot_elems:
                    continue
                table = LaunchTable(**knobs)
                same = (strat or be.strategy(T),
                        tuple(launch_plan(strat or be.strategy(T), True, T, H, 2, world,
                                          table).items()))
                if strat is not None and same in seen:
                    continue   # identical launch to an entry already timed in this row
                seen.add(same)

                def call(strat=strat, table=table):
                    be.force_strategy, be.table = strat, table
                    be.all_reduce_add_rms_norm(x0, res, w, eps, normed, rout)

                ok = torch.zeros(1, device=dev)
                try:
                    normed.fill_(float("nan"))
                    rout.fill_(float("nan"))
                    call()
                    be.check_errors()
                    err = max(_rel(normed, ref_n.float()), _rel(rout, ref_r.float()))
                    ok.fill_(1.0 if err <= 5e-3 else 0.0)
                except Exception:  # noqa: BLE001 - recorded; every rank agrees below
                    err = float("nan")
                    errors[f"{name}_{H}_{T}"] = traceback.format_exc()[-400:]
                dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
                plan, kern = be.last_launch or ({}, None)
                regs = getattr(kern, "n_regs", None)
                row[f"{name}.err"] = err
                row[f"{name}.plan"] = f"{plan.get('grid')}x{plan.get('num_warps')}w" \
                                      f"/c{plan.get('chunk')}/rows{plan.get('rows')}/r{regs}"
                if ok.item() == 1.0:
                    row[name] = round(time_graph(call, group, args.iters, args.reps), 2)
                else:   # a timed-out backend is dead on every rank: make a new one
                    row[name] = None
                    torch.cuda.synchronize()
                    be.close()
                    be = P2PAllReduceBackend(group, H, dtype, maxT, dev,
                                             lamport_max_bytes=lam_bytes)
                be.force_strategy, be.table = None, LaunchTable()
            rows.append(row)
            if rank == 0:
                print(f"sweep H={H} T={T} ({time.time() - t_start:.0f} s) " +
                      " ".join(f"{k}={row.get(k)}" for k in args.sweep_entries), flush=True)
        be.close()
    if rank == 0:
        meta = environment()
        meta.update(world_size=world, dtype=str(dtype), iters=args.iters, reps=args.reps,
                    errors=errors, sweep={k: [s, kn] for k, (s, kn) in args.sweep_entries.items()},
                    seconds=round(time.time() - t_start, 1))
        with open(out_path + ".json", "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print("wrote", out_path + ".json")
        print_sweep(rows, list(args.sweep_entries))
        for k, e in errors.items():
            print("ERR", k, e[-300:])
    dist.barrier()
    dist.destroy_process_group()


def print_sweep(rows, names) -> None:
    """us per call of the SWEEP entries ``names`` (best per row marked *), then the worst
    check error."""
    print("\nsweep: fused allreduce+residual+RMSNorm, bf16, us per call (* = fastest; - = "
          "skipped or failed)")
    print(f"{'H':>5} {'T':>5} " + " ".join(f"{n:>16}" for n in names))
    for r in rows:
        vals = {n: r.get(n) for n in names if isinstance(r.get(n), float)}
        best = min(vals, key=vals.get) if vals else None
        cells = [(f"{vals[n]:.1f}" + ("*" if n == best else "")) if n in vals else "-"
                 for n in names]
        print(f"{r['hidden']:5d} {r['tokens']:5d} " + " ".join(f"{c:>16}" for c in cells))
    errs = [(r.get(f"{n}.err"), r["hidden"], r["tokens"], n) for r in rows for n in names
            if isinstance(r.get(f"{n}.err"), float)]
    worst = max(errs, key=lambda e: e[0] if e[0] == e[0] else float("inf"), default=None)
    print("sweep check: worst rel err", worst)
    print("plans (grid x warps / push chunk / regs):")
    for r in rows:
        print(f"{r['hidden']:5d} {r['tokens']:5d} " +
              " ".join(f"{n}={r.get(n + '.plan')}" for n in names if n + ".plan" in r))


def print_table(rows) -> None:
    for H in sorted({r["hidden"] for r in rows}):
        print(f"\nhidden {H}, bf16, us per call | llm fused / fi fused | llm fused / nccl_unfused")
        print(f"{'tokens':>6} {'strategy':>8} {'llm_fused':>9} {'fi_fused':>8} "
              f"{'nccl_unf':>8} {'nccl_epi':>8} {'llm_ar':>7} {'fi_ar':>6} {'nccl_ar':>7} "
              f"{'fp8':>6} {'r_fi':>5} {'r_nccl':>6}")
        for r in (r for r in rows if r["hidden"] == H):
            lf, ff, nu = r.get("llm_fused"), r.get("fi_fused"), r.get("nccl_unfused")
            f = lambda v, w=8: f"{v:{w}.1f}" if isinstance(v, float) else f"{'-':>{w}}"  # noqa
            r_fi = f"{lf / ff:5.2f}" if lf and ff else "    -"
            r_n = f"{lf / nu:6.2f}" if lf and nu else "     -"
            print(f"{r['tokens']:6d} {r.get('llm_strategy', ''):>8} {f(lf, 9)} {f(ff)} {f(nu)} "
                  f"{f(r.get('nccl_epilogue'))} {f(r.get('llm_ar'), 7)} {f(r.get('fi_ar'), 6)} "
                  f"{f(r.get('nccl_ar'), 7)} {f(r.get('llm_fused_fp8'), 6)} {r_fi} {r_n}")


def plot(rows, path, world) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hs = sorted({r["hidden"] for r in rows})
    fig, axes = plt.subplots(2, len(hs), figsize=(6 * len(hs), 8), squeeze=False)
    names = ["nccl_ar", "nccl_unfused", "nccl_epilogue", "symm1_unfused", "symm2_unfused",
             "fi_ar", "fi_fused", "llm_ar", "llm_fused", "llm_fused_fp8"]
    for j, H in enumerate(hs):
        rs = [r for r in rows if r["hidden"] == H]
        ax = axes[0][j]
        for n in names:
            pts = [(r["tokens"], r[n]) for r in rs if isinstance(r.get(n), float)]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=n, lw=2 if n.startswith("llm") else 1)
        ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="us per call",
               title=f"TP={world}, hidden {H}, bf16")
        ax.legend(fontsize=7)
        ax = axes[1][j]
        for n, base in (("llm_fused", "fi_fused"), ("llm_ar", "fi_ar"),
                        ("llm_fused", "nccl_unfused")):
            pts = [(r["tokens"], r[n] / r[base]) for r in rs
                   if isinstance(r.get(n), float) and isinstance(r.get(base), float)]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{n} / {base}")
        ax.axhline(1.0, color="k", lw=0.5)
        ax.axhline(0.8, color="k", lw=0.5, ls="--")
        ax.set(xscale="log", xlabel="tokens", ylabel="ratio (lower is better)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, default=0, help="ranks (default: all visible GPUs)")
    p.add_argument("--hidden", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--tokens", type=int, nargs="+",
                   default=[1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--check", action="store_true", help="verify results inline")
    p.add_argument("--strategies", action="store_true", help="also time each forced strategy")
    p.add_argument("--sweep", action="store_true",
                   help="time the SWEEP launch-knob grid instead of the ladder")
    p.add_argument("--sweep-tokens", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    p.add_argument("--sweep-lamport-mib", type=int, default=32,
                   help="--sweep: Lamport slot size, so forced Lamport runs above the policy's "
                        "threshold (MiB per rank)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results"))
    p.add_argument("--sweep-only", default="",
                   help="comma-separated SWEEP entries to time (default: all)")
    args = p.parse_args()
    names = [n for n in args.sweep_only.split(",") if n] or list(SWEEP)
    unknown = sorted(set(names) - set(SWEEP))
    if unknown:
        p.error(f"--sweep-only: unknown entries {unknown}; known: {list(SWEEP)}")
    args.sweep_entries = {n: SWEEP[n] for n in names}
    os.environ.update(SAFE_ENV)
    import torch
    import torch.multiprocessing as mp

    world = args.world or torch.cuda.device_count()
    if world < 2:
        sys.exit("needs at least 2 GPUs")
    if args.sweep:
        os.makedirs(args.out, exist_ok=True)
        gpu = torch.cuda.get_device_name(0).replace(" ", "_")
        stem = os.path.join(args.out, f"allreduce_sweep_{gpu}_x{world}_"
                            f"{time.strftime('%Y%m%d_%H%M%S')}")
        mp.spawn(sweep_worker, args=(world, args, 29600 + os.getpid() % 300, stem),
                 nprocs=world, join=True)
        return
    try:
        import flashinfer.comm  # noqa: F401  build the JIT comm module once, before the ranks
        from flashinfer.comm.trtllm_ar import get_trtllm_comm_module
        get_trtllm_comm_module()
    except Exception as e:  # noqa: BLE001
        print("FlashInfer not usable:", repr(e)[:200])
    os.makedirs(args.out, exist_ok=True)
    gpu = torch.cuda.get_device_name(0).replace(" ", "_")
    stem = os.path.join(args.out, f"allreduce_{gpu}_x{world}_{time.strftime('%Y%m%d_%H%M%S')}")
    mp.spawn(worker, args=(world, args, 29600 + os.getpid() % 300, stem), nprocs=world,
             join=True)


if __name__ == "__main__":
    main()
