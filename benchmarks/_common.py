"""Timing and reporting helpers shared by the benchmarks.

``time_graph(fn)``: run ``fn`` eagerly (warm-up, compiles), capture ``iters`` back-to-back calls
in one CUDA graph, replay it ``reps`` times and return the median microseconds per call, the
maximum over the ranks of ``group`` (every rank must call it the same number of times; without
an initialised process group, this process's median).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys

#: NVLink multicast stays off in every benchmark process (and the ranks it spawns)
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1"}


def set_safe_env() -> None:
    """Set :data:`SAFE_ENV` where the caller has not (before torch or NCCL read it)."""
    for k, v in SAFE_ENV.items():
        os.environ.setdefault(k, v)


def time_graph(fn, group=None, iters: int = 50, reps: int = 7, warmup: int = 3,
               before_replay=None) -> float:
    import torch
    import torch.distributed as dist

    multi = dist.is_available() and dist.is_initialized()

    def barrier():
        if multi:
            dist.barrier(group)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    barrier()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(iters):
            fn()
    torch.cuda.synchronize()
    barrier()
    ts = []
    for _ in range(reps):
        if before_replay is not None:
            before_replay()
        torch.cuda.synchronize()
        barrier()
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1000.0 / iters)
    med = sorted(ts)[len(ts) // 2]
    del g
    if not multi:
        return med
    t = torch.tensor([med], device="cuda", dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def environment() -> dict:
    """GPU name, library versions, date and command line (for result files)."""
    import torch

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([sys.executable] + sys.argv), "python": platform.python_version(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    try:
        info["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
    except Exception:  # noqa: BLE001
        info["nccl"] = None
    for mod in ("triton", "flashinfer"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            info[mod] = None
    return info


def write_results(path_stem: str, rows: list[dict], meta: dict) -> tuple[str, str]:
    """``rows`` (dicts with identical keys) -> ``<stem>.csv`` and ``<stem>.json``."""
    import csv

    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "hidden", k != "tokens", k))
    with open(path_stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    with open(path_stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return path_stem + ".csv", path_stem + ".json"


def save_one_gpu_results(rows: list[dict], note: str, out: str | None, name: str) -> None:
    """``rows`` and :func:`environment` (plus ``note``) to ``<out>.{csv,json}``, or by default
    to ``benchmarks/results/<name>`` with ``{gpu}`` in ``name`` replaced by the GPU's name;
    prints the paths. For the one-GPU benchmarks (loopback, warm-up)."""
    import os

    meta = environment()
    meta["note"] = note
    gpu = (meta.get("gpu") or "gpu").replace(" ", "_")
    stem = out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                               name.format(gpu=gpu))
    print("wrote", *write_results(stem, rows, meta))


def add_step_probe_args(ap) -> None:
    """The options of the dependent-step probes (``probe_chain_cost.py``, ``probe_ws_claim.py``):
    grid, steps a launch, CUDA-graph iterations and repeats, the results folder."""
    import os

    ap.add_argument("--programs", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results"))


def step_cost(run, steps: int, iters: int, reps: int) -> dict:
    """A dependent step's cost: ``run(R)`` launches a kernel of ``R`` steps; each of ``R = 0``
    and ``R = steps`` is compiled, then timed as CUDA-graph replays (:func:`time_graph`), and
    the step costs ``(t(steps) - t(0)) / steps``. Returns ``{"us_at_0", "us_at_<steps>",
    "ns_per_step"}``."""
    import torch

    t = {}
    for R in (0, steps):
        run(R)
        torch.cuda.synchronize()
        t[R] = time_graph(lambda R=R: run(R), iters=iters, reps=reps)
    return {"us_at_0": round(t[0], 3), f"us_at_{steps}": round(t[steps], 3),
            "ns_per_step": round(1000 * (t[steps] - t[0]) / steps, 1)}


def write_probe_json(args, rows: list[dict], name: str) -> None:
    """A probe's ``rows``, with :func:`environment`, argv and options, to
    ``<args.out>/<name>.json``; prints the path."""
    import os
    import sys

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"meta": environment(), "argv": sys.argv, "args": vars(args), "rows": rows},
                  f, indent=1)
    print(f"wrote {path}")


def progress(items, enabled: bool, desc: str):
    """``items`` wrapped in a tqdm progress bar (stderr) on the reporting rank, when tqdm is
    installed (``pip install llmcomm[bench]``); the plain iterable otherwise."""
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit="size", file=sys.stderr, leave=False)


def format_trace(summaries: dict, title: str) -> str:
    """The lamport dispatch's stage trace (``P2PBackend.trace_summary()`` of each rank,
    ``{rank: summary}``) as a table: us after a program's entry, program 0 / program G//2 /
    the slowest program's mean, per rank."""
    ranks = sorted(summaries)
    head = "  ".join(f"r{r} p0 / pH / max".rjust(24) for r in ranks)
    lines = [f"{title}  (us after the program's entry; mean over passes)",
             f"  {'stage':<20}{head}"]

    def f(v):
        return "-" if v is None else f"{v:.2f}"

    for stage in summaries[ranks[0]]:
        cells = "  ".join(
            f"{f(summaries[r][stage]['p0'])} / {f(summaries[r][stage]['pH'])} / "
            f"{f(summaries[r][stage]['max'])}".rjust(24) for r in ranks)
        lines.append(f"  {stage:<20}{cells}")
    return "\n".join(lines)


def dequant_expert_rows(q, scale, counts, offsets, out):
    """An fp8 dispatch's valid rows dequantised into ``out`` (``expert_x``'s shape, the
    dispatcher's dtype; zeroed first): the identity experts' ``expert_out`` of a benchmark's
    check. ``offsets``: a packed dispatch's, else ``None``. A host loop over the local experts
    (checks only, never timed)."""
    from llmcomm.moe.fp8 import FP8_BLOCK

    out.zero_()
    offs = None if offsets is None else offsets.tolist()
    for le, c in enumerate(counts.tolist()):
        sl = (le, slice(0, c)) if offs is None else (slice(offs[le], offs[le] + c),)
        out[sl] = (q[sl].float() * scale[sl].repeat_interleave(FP8_BLOCK, dim=-1)).to(out.dtype)
    return out
