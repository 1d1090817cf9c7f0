"""Copies by the GPU's copy engines (DMA), not by kernels on its SMs.

``Tensor.copy_`` between two device buffers is a ``cudaMemcpyAsync`` that the driver may run as
one or two copy *kernels* on the SMs (pytorch/pytorch#191284 summarises what is known; session
17 saw it on one H200: a copy issued beside kernels that held every SM and spun on the copy's
completion never ran). A copy that overlaps kernels which occupy the whole GPU must not need an
SM, so :func:`copy_async` asks the driver for the copy engines: ``cuMemcpyBatchAsync`` with
``CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE`` (CUDA 12.8+ drivers), through ctypes (torch does
not bind it). Where the driver has no such entry point it falls back to ``Tensor.copy_`` and
logs once. Semantics, with ``pairs = [(dst, src), ...]`` (contiguous tensors of equal byte
size, on one device; a ``dst`` may be a peer's buffer mapped into this process)::

    for dst, src in pairs:                  # no order among the pairs of one call
        dst.view(-1).view(torch.uint8).copy_(src.view(-1).view(torch.uint8))

enqueued on ``stream`` (default: the current one) and ordered after the work before it there;
the next work on that stream starts after every pair completed. ``benchmarks/probe_copy_engine.py``
checks on a GPU that these copies progress while kernels hold every SM, eagerly and inside a
CUDA graph, and times them.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
from collections.abc import Sequence
from typing import Any

import torch

from .errors import CopyEngineError

log = logging.getLogger(__name__)

_PREFER_OVERLAP_WITH_COMPUTE = 0x1   # CUmemcpyFlags
_SRC_ACCESS_ORDER_STREAM = 0x1       # CUmemcpySrcAccessOrder: read the source in stream order


class _Attributes(ctypes.Structure):
    """``CUmemcpyAttributes``: access order, source / destination location hints (type, id;
    ignored for device memory), flags."""

    _fields_ = [("src_access_order", ctypes.c_int), ("src_loc_type", ctypes.c_int),
                ("src_loc_id", ctypes.c_int), ("dst_loc_type", ctypes.c_int),
                ("dst_loc_id", ctypes.c_int), ("flags", ctypes.c_uint)]


@functools.cache
def _batch_copy() -> tuple[Any, bool] | None:
    """``(cuMemcpyBatchAsync, takes_fail_idx)`` from the driver, or None where it has none.
    Asked for by CUDA version through ``cuGetProcAddress``: 13.0 drops the ``failIdx``
    argument that 12.8 had, and the entry point is the driver's, whatever toolkit torch was
    built with."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        get = lib.cuGetProcAddress_v2
    except (OSError, AttributeError):
        return None
    get.restype = ctypes.c_int
    get.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int,
                    ctypes.c_uint64, ctypes.POINTER(ctypes.c_int)]
    u64p, szp = ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t)
    for version, fail_idx in ((13000, False), (12080, True)):
        fn, status = ctypes.c_void_p(), ctypes.c_int()
        if get(b"cuMemcpyBatchAsync", ctypes.byref(fn), version, 0, ctypes.byref(status)) \
                or not fn.value:
            continue
        args = [u64p, u64p, szp, ctypes.c_size_t, ctypes.POINTER(_Attributes), szp,
                ctypes.c_size_t] + ([szp] if fail_idx else []) + [ctypes.c_void_p]
        return ctypes.CFUNCTYPE(ctypes.c_int, *args)(fn.value), fail_idx
    return None


def available() -> bool:
    """Whether :func:`copy_async` can use the copy engines here (else it uses ``copy_``)."""
    return torch.cuda.is_available() and _batch_copy() is not None


@functools.cache
def _warn_fallback() -> None:
    log.warning("this CUDA driver has no cuMemcpyBatchAsync (CUDA 12.8+): copies fall back to "
                "Tensor.copy_, which the driver may run on the SMs")


def copy_async(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
               stream: torch.cuda.Stream | None = None) -> None:
    """Copy every ``src`` into its ``dst`` on ``stream`` by copy engine (module docstring).

    Args:
        pairs: ``(dst, src)`` tensors, each contiguous, equal byte sizes within a pair, all on
            one CUDA device (or all on the CPU: plain copies, for the CPU simulation).
        stream: default ``torch.cuda.current_stream()`` of that device.
    """
    pairs = [(d, s) for d, s in pairs if d.numel()]
    for d, s in pairs:
        if not (d.is_contiguous() and s.is_contiguous()):
            raise ValueError("copy_async needs contiguous tensors; call .contiguous() first")
        if d.numel() * d.element_size() != s.numel() * s.element_size():
            raise ValueError(f"copy_async: destination of {d.numel() * d.element_size()} bytes "
                             f"for a source of {s.numel() * s.element_size()}")
    if not pairs:
        return
    if pairs[0][0].device.type != "cuda" or _batch_copy() is None:
        if pairs[0][0].device.type == "cuda":
            _warn_fallback()
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx:
            for d, s in pairs:
                d.view(-1).view(torch.uint8).copy_(s.view(-1).view(torch.uint8))
        return
    fn, fail_idx = _batch_copy()
    n = len(pairs)
    dsts = (ctypes.c_uint64 * n)(*(d.data_ptr() for d, _ in pairs))
    srcs = (ctypes.c_uint64 * n)(*(s.data_ptr() for _, s in pairs))
    sizes = (ctypes.c_size_t * n)(*(d.numel() * d.element_size() for d, _ in pairs))
    attrs = (_Attributes * 1)(_Attributes(_SRC_ACCESS_ORDER_STREAM, 0, 0, 0, 0,
                                          _PREFER_OVERLAP_WITH_COMPUTE))
    idxs = (ctypes.c_size_t * 1)(0)
    if stream is None:
        stream = torch.cuda.current_stream(pairs[0][0].device)
    extra = [ctypes.byref(ctypes.c_size_t(0))] if fail_idx else []
    with torch.cuda.device(pairs[0][0].device):
        rc = fn(dsts, srcs, sizes, n, attrs, idxs, 1, *extra, ctypes.c_void_p(stream.cuda_stream))
    if rc:
        raise CopyEngineError(f"cuMemcpyBatchAsync of {n} copies returned CUresult {rc}; "
                              f"expected 0 (CUDA_SUCCESS). Check that every pointer is device "
                              f"memory this device can address and that the stream is not the "
                              f"legacy default stream")
