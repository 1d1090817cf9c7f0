"""Does a copy progress while kernels hold every SM? Tensor.copy_ against the copy engine.

The p2p dispatch's copy-engine rows (``P2PBackend(_ce_tokens=...)``) are copied while the
dispatch kernel's programs spin on every SM waiting for them. A copy the driver runs as a kernel
then waits for an SM that never frees: session 17's first loopback run (66 programs a rank x 2
ranks = every SM of an H200) timed out at 2048 tokens. This probe isolates it on one GPU:

* ``spin``: ``4 x SMs`` programs of 16 warps (every thread slot of every SM) spin until a flag
  reaches 1 or 2 s passed (then they count themselves late);
* beside them, on another stream, 64 MiB are copied, then a 4-byte 1 into the flag, by
  ``Tensor.copy_`` or by :func:`llmcomm.copy_engine.copy_async`; eagerly and in a CUDA graph
  (spinner and copies captured as independent branches);
* reported: late programs (0 = the copy ran beside the spinners), the spinner's time, whether
  the destination holds the source; then each method's bandwidth alone (median of 9 graph
  replays of 10 copies).

Usage: ``PYTHONPATH=src:. python3 benchmarks/probe_copy_engine.py [--mib 64]``. GPU only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton
import triton.language as tl

from llmcomm.kernels.sync import globaltimer_uniform, load_uniform


@triton.jit
def _spin_kernel(flag, late, timeout_ns, NT: tl.constexpr):
    t0 = globaltimer_uniform(NT)
    v = load_uniform(flag, True, 0, NT)
    over = 0
    while (v < 1) & (over == 0):
        v = load_uniform(flag, True, 0, NT)
        over = (globaltimer_uniform(NT) - t0 > timeout_ns).to(tl.int32)
    tl.atomic_add(late, over)


def _trial(method: str, graph: bool, src, dst, one, flag, late, sms: int) -> dict:
    import torch

    from llmcomm.copy_engine import copy_async

    dst.fill_(-1)
    flag.zero_()
    late.zero_()
    torch.cuda.synchronize()
    cur = torch.cuda.current_stream()
    side = torch.cuda.Stream()

    def work():
        side.wait_stream(torch.cuda.current_stream())
        _spin_kernel[(4 * sms,)](flag, late, 2_000_000_000, NT=512, num_warps=16)
        with torch.cuda.stream(side):
            if method == "copy_":
                dst.copy_(src)
                flag.copy_(one)
            else:
                copy_async([(dst, src)], side)
                copy_async([(flag, one)], side)
        torch.cuda.current_stream().wait_stream(side)

    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if graph:
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(cur)
        with torch.cuda.graph(g, stream=s):
            work()
        dst.fill_(-1)
        flag.zero_()
        late.zero_()
        torch.cuda.synchronize()
        a.record()
        g.replay()
        b.record()
    else:
        a.record()
        work()
        b.record()
    torch.cuda.synchronize()
    return {"method": method, "graph": graph, "late_programs": int(late.item()),
            "programs": 4 * sms, "ms": round(a.elapsed_time(b), 3),
            "copied": bool(torch.equal(dst, src))}


def _bandwidth(method: str, src, dst) -> float:
    import torch

    from llmcomm.copy_engine import copy_async

    def once():
        if method == "copy_":
            dst.copy_(src)
        else:
            copy_async([(dst, src)])

    once()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(10):
            once()
    ts = []
    for _ in range(9):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / 10)
    ms = sorted(ts)[len(ts) // 2]
    return round(src.numel() * src.element_size() / ms / 1e6, 1)   # GB/s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--out", default=None, help="JSON file for the results")
    args = ap.parse_args()
    import torch

    from llmcomm import copy_engine

    if not torch.cuda.is_available():
        sys.exit("probe_copy_engine.py needs a CUDA GPU")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    n = args.mib * 2 ** 20 // 2
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    one = torch.ones(1, dtype=torch.int32, device="cuda")
    flag = torch.zeros(1, dtype=torch.int32, device="cuda")
    late = torch.zeros(1, dtype=torch.int32, device="cuda")
    print(f"{torch.cuda.get_device_name(0)}, {sms} SMs, torch {torch.__version__}, triton "
          f"{triton.__version__}, copy engine batch API: {copy_engine.available()}", flush=True)
    rows = []
    for method in ("copy_engine", "copy_"):
        for graph in (False, True):
            try:
                r = _trial(method, graph, src, dst, one, flag, late, sms)
            except Exception as e:   # report and go on: the other cells still tell
                r = {"method": method, "graph": graph, "error": f"{type(e).__name__}: {e}"}
                torch.cuda.synchronize()
            print(json.dumps(r), flush=True)
            rows.append(r)
    for method in ("copy_engine", "copy_"):
        try:
            gbs = _bandwidth(method, src, dst)
        except Exception as e:
            gbs = f"{type(e).__name__}: {e}"
        print(json.dumps({"method": method, "alone_GBps": gbs, "MiB": args.mib}), flush=True)
        rows.append({"method": method, "alone_GBps": gbs})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
