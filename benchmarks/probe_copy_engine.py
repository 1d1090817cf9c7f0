"""Does ``Tensor.copy_`` progress while kernels hold every SM (copy engine), or wait for an SM?

The p2p dispatch's copied rows (``P2PBackend(_ce_tokens=...)``) go by ``copy_``
while the dispatch's programs spin on the SMs, waiting for them. ``copy_`` is a
``cudaMemcpyAsync``, which the driver may run as a kernel (pytorch/pytorch#191284); such a copy
needs an SM the spinners leave free. This probe tells which, per destination:

* ``4 x SMs`` programs of 16 warps (every thread slot of every SM) spin on a flag in pinned host
  memory, for at most 2 s (then they count themselves late);
* beside them, on another stream, ``--mib`` MiB are copied with ``copy_`` into a local buffer
  (``local``) or, with two GPUs, into the other rank's torch symmetric-memory buffer as the p2p
  backend maps it (``peer``, rank 0 copies, rank 1 waits); the host watches the copy's event and
  then sets the flag;
* the same with the driver's ``cuMemcpyBatchAsync`` and ``PREFER_OVERLAP_WITH_COMPUTE``
  (``batch``, through ctypes; eager only: it cannot be captured into a CUDA graph, CUresult 900
  on driver 580), which asks for a copy engine; NVIDIA/nccl#2177 reports 0 SMs and ~354 GiB/s
  for 32 MB peer copies that way, and ~87 GiB/s for local ones;
* every method copies once before its trial (one-time driver set-up out of the timing);
* reported: when the copy completed (ms after launch), late programs (0: it ran beside the
  spinners, on a copy engine; all: it waited for them), and the copy's bandwidth alone (median
  of 9 runs of 10 copies: graph replays for ``copy_``, eager for ``batch``).

(Session 17 also tried ``cuStreamWaitValue32`` here, ``--stream-ops`` at commit ed2831c: the
host hung, so it was taken out; see the session log.)

Usage: ``PYTHONPATH=src:. python3 benchmarks/probe_copy_engine.py [--peer] [--mib 64]``.
Session 17, one H200 (torch 2.11, CUDA 13, driver 580): a local ``copy_`` and a local ``batch``
copy both waited for the spinners.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
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


class _Attributes(ctypes.Structure):
    """``CUmemcpyAttributes``: source access order, source / destination location hints
    (type, id; ignored for device memory), flags."""

    _fields_ = [("src_access_order", ctypes.c_int), ("src_loc_type", ctypes.c_int),
                ("src_loc_id", ctypes.c_int), ("dst_loc_type", ctypes.c_int),
                ("dst_loc_id", ctypes.c_int), ("flags", ctypes.c_uint)]


@functools.cache
def _driver_fn(name: str, version: int, *argtypes):
    """The driver's entry point ``name`` as of CUDA ``version`` (``cuGetProcAddress``), typed
    ``CUresult name(*argtypes)``; None where the driver has none."""
    lib = ctypes.CDLL("libcuda.so.1")
    get = lib.cuGetProcAddress_v2
    get.restype = ctypes.c_int
    get.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int,
                    ctypes.c_uint64, ctypes.POINTER(ctypes.c_int)]
    fn, status = ctypes.c_void_p(), ctypes.c_int()
    if get(name.encode(), ctypes.byref(fn), version, 0, ctypes.byref(status)) or not fn.value:
        return None
    return ctypes.CFUNCTYPE(ctypes.c_int, *argtypes)(fn.value)


def _batch_fn():
    """The driver's ``cuMemcpyBatchAsync`` for CUDA 13.0 (no ``failIdx``), or None."""
    u64p, szp = ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t)
    return _driver_fn("cuMemcpyBatchAsync", 13000, u64p, u64p, szp, ctypes.c_size_t,
                      ctypes.POINTER(_Attributes), szp, ctypes.c_size_t, ctypes.c_void_p)


def _copy(method: str, dst, src, stream=None) -> None:
    """``dst.copy_(src)``, or the same bytes by ``cuMemcpyBatchAsync`` asking for a copy engine
    (source read in stream order, flag ``PREFER_OVERLAP_WITH_COMPUTE``) on ``stream``."""
    import torch

    if method == "copy_":
        dst.copy_(src)
        return
    fn = _batch_fn()
    if fn is None:
        raise RuntimeError("this driver has no cuMemcpyBatchAsync for CUDA 13.0")
    stream = stream or torch.cuda.current_stream()
    if stream.cuda_stream == 0:
        raise RuntimeError("cuMemcpyBatchAsync refuses the legacy default stream")
    rc = fn((ctypes.c_uint64 * 1)(dst.data_ptr()), (ctypes.c_uint64 * 1)(src.data_ptr()),
            (ctypes.c_size_t * 1)(src.numel() * src.element_size()), 1,
            (_Attributes * 1)(_Attributes(1, 0, 0, 0, 0, 1)), (ctypes.c_size_t * 1)(0), 1,
            ctypes.c_void_p(stream.cuda_stream))
    if rc:
        raise RuntimeError(f"cuMemcpyBatchAsync returned CUresult {rc}")


def _trial(src, dst, method: str = "copy_") -> dict:
    """Spinners on every SM, ``dst.copy_(src)`` (or ``batch``) beside them (module docstring)."""
    import torch

    sms = torch.cuda.get_device_properties(src.device).multi_processor_count
    flag = torch.zeros(1, dtype=torch.int32, pin_memory=True)
    late = torch.zeros(1, dtype=torch.int32, device=src.device)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):   # once before: any one-time driver set-up is not timed
        _copy(method, dst, src, side)
    flag[0] = 1                     # the spinner compiled and loaded (it exits at once)
    _spin_kernel[(1,)](flag.data_ptr(), late, 2_000_000_000, NT=512, num_warps=16)
    torch.cuda.synchronize()
    flag[0] = 0
    dst.fill_(-1)
    torch.cuda.synchronize()
    side.wait_stream(torch.cuda.current_stream())
    done = torch.cuda.Event()
    t0 = time.perf_counter()
    _spin_kernel[(4 * sms,)](flag.data_ptr(), late, 2_000_000_000, NT=512, num_warps=16)
    with torch.cuda.stream(side):
        _copy(method, dst, src, side)
        done.record()
    while not done.query() and time.perf_counter() - t0 < 5:
        time.sleep(0.0002)
    copied_ms = (time.perf_counter() - t0) * 1e3
    flag[0] = 1
    torch.cuda.synchronize()
    return {"method": method, "copy_done_ms": round(copied_ms, 2),
            "late_programs": int(late.item()),
            "programs": 4 * sms, "copied": bool(torch.equal(dst, src))}


def _bandwidth(src, dst, method: str = "copy_") -> float:
    """GB/s of 10 copies in a row, median of 9 (graph replays for ``copy_``, eager on a side
    stream for ``batch``, which cannot be captured)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _copy(method, dst, src, side)
        torch.cuda.synchronize()
        g = None
        if method == "copy_":
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(10):
                    dst.copy_(src)
        ts = []
        for _ in range(9):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            if g is not None:
                g.replay()
            else:
                for _ in range(10):
                    _copy(method, dst, src, side)
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b) / 10)
    return round(src.numel() * src.element_size() / sorted(ts)[4] / 1e6, 1)


def _local(mib: int) -> dict:
    import torch

    src = torch.randn(mib * 2 ** 19, device="cuda").bfloat16()
    dst = torch.empty_like(src)
    return [_each(m, "local", src, dst) for m in ("copy_", "batch")]


def _each(method: str, dest: str, src, dst) -> dict:
    """One trial and the bandwidth alone of ``method``; an error is reported, not raised."""
    try:
        return {"dest": dest, **_trial(src, dst, method),
                "alone_GBps": _bandwidth(src, dst, method)}
    except RuntimeError as e:
        return {"dest": dest, "method": method, "error": str(e)}


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
        out = [_each(m, "peer (symmetric memory)", src, dst) for m in ("copy_", "batch")]
    dist.barrier()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--peer", action="store_true", help="also into a second GPU's buffer")
    ap.add_argument("--out", default=None, help="JSON file for the results")
    args = ap.parse_args()
    from benchmarks._common import set_safe_env

    set_safe_env()
    import torch

    if not torch.cuda.is_available():
        sys.exit("probe_copy_engine.py needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, triton "
          f"{triton.__version__}", flush=True)
    rows = _local(args.mib)
    if args.peer:
        from llmcomm.launch import run_ranks

        rows += run_ranks(_peer_worker, 2, args.mib, backend="nccl", timeout=120)[0]
    for r in rows:
        print(json.dumps(r), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
