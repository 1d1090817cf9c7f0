"""Does ``Tensor.copy_`` progress while kernels hold every SM (copy engine), or wait for an SM?

The p2p dispatch's copy-engine rows (``P2PBackend(_ce_tokens=...)``) are copied with ``copy_``
while the dispatch's programs spin on the SMs, waiting for them. ``copy_`` is a
``cudaMemcpyAsync``, which the driver may run as a kernel (pytorch/pytorch#191284); such a copy
needs an SM the spinners leave free. This probe tells which, per destination:

* ``4 x SMs`` programs of 16 warps (every thread slot of every SM) spin on a flag in pinned host
  memory, for at most 2 s (then they count themselves late);
* beside them, on another stream, ``--mib`` MiB are copied with ``copy_`` into a local buffer
  (``local``) or, with two GPUs, into the other rank's torch symmetric-memory buffer as the p2p
  backend maps it (``peer``, rank 0 copies, rank 1 waits); the host watches the copy's event and
  then sets the flag;
* reported: when the copy completed (ms after launch), late programs (0: it ran beside the
  spinners, on a copy engine; all: it waited for them), and the copy's bandwidth alone (median
  of 9 graph replays of 10 copies).

Usage: ``PYTHONPATH=src:. python3 benchmarks/probe_copy_engine.py [--peer] [--mib 64]``.
Session 17, one H200 (torch 2.11, CUDA 13, driver 580): a local copy waited for the spinners.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton
import triton.language as tl

from llmcomm.kernels.sync import globaltimer_uniform, load_uniform


@triton.jit
def _spin_kernel(flag_addr, late, timeout_ns, NT: tl.constexpr):
    flag = flag_addr.to(tl.pointer_type(tl.int32))   # pinned host memory
    t0 = globaltimer_uniform(NT)
    v = load_uniform(flag, True, 0, NT)
    over = 0
    while (v < 1) & (over == 0):
        v = load_uniform(flag, True, 0, NT)
        over = (globaltimer_uniform(NT) - t0 > timeout_ns).to(tl.int32)
    tl.atomic_add(late, over)


def _trial(src, dst) -> dict:
    """Spinners on every SM, ``dst.copy_(src)`` beside them (see the module docstring)."""
    import torch

    sms = torch.cuda.get_device_properties(src.device).multi_processor_count
    flag = torch.zeros(1, dtype=torch.int32, pin_memory=True)
    late = torch.zeros(1, dtype=torch.int32, device=src.device)
    dst.fill_(-1)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    done = torch.cuda.Event()
    t0 = time.perf_counter()
    _spin_kernel[(4 * sms,)](flag.data_ptr(), late, 2_000_000_000, NT=512, num_warps=16)
    with torch.cuda.stream(side):
        dst.copy_(src)
        done.record()
    while not done.query() and time.perf_counter() - t0 < 5:
        time.sleep(0.0002)
    copied_ms = (time.perf_counter() - t0) * 1e3
    flag[0] = 1
    torch.cuda.synchronize()
    return {"copy_done_ms": round(copied_ms, 2), "late_programs": int(late.item()),
            "programs": 4 * sms, "copied": bool(torch.equal(dst, src))}


def _bandwidth(src, dst) -> float:
    import torch

    dst.copy_(src)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(10):
            dst.copy_(src)
    ts = []
    for _ in range(9):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / 10)
    return round(src.numel() * src.element_size() / sorted(ts)[4] / 1e6, 1)   # GB/s


def _local(mib: int) -> dict:
    import torch

    src = torch.randn(mib * 2 ** 19, device="cuda").bfloat16()
    dst = torch.empty_like(src)
    return {"dest": "local", **_trial(src, dst), "alone_GBps": _bandwidth(src, dst)}


def _peer_worker(rank, world, mib):
    import torch
    import torch.distributed as dist
    import torch.distributed._symmetric_memory as symm_mem

    n = mib * 2 ** 19
    local = symm_mem.empty(n, dtype=torch.bfloat16, device=f"cuda:{rank}")
    hdl = symm_mem.rendezvous(local, dist.group.WORLD.group_name)
    out = None
    if rank == 0:
        src = torch.randn(n, device="cuda:0").bfloat16()
        dst = hdl.get_buffer(1, [n], torch.bfloat16)
        out = {"dest": "peer (symmetric memory)", **_trial(src, dst),
               "alone_GBps": _bandwidth(src, dst)}
    dist.barrier()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--peer", action="store_true", help="also into a second GPU's buffer")
    ap.add_argument("--out", default=None, help="JSON file for the results")
    args = ap.parse_args()
    for k, v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                 ("NVSHMEM_DISABLE_NVLS", "1")):
        os.environ.setdefault(k, v)
    import torch

    if not torch.cuda.is_available():
        sys.exit("probe_copy_engine.py needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, triton "
          f"{triton.__version__}", flush=True)
    rows = [_local(args.mib)]
    print(json.dumps(rows[-1]), flush=True)
    if args.peer:
        from llmcomm.launch import run_ranks

        rows.append(run_ranks(_peer_worker, 2, args.mib, backend="nccl", timeout=120)[0])
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
