"""The CUDA driver calls torch does not expose (``ctypes`` on ``libcuda``; GPU processes only).

One so far: the current context's per-thread stack limit (``CU_LIMIT_STACK_SIZE``), which is
how the driver sizes the local memory a kernel's register spills live in. A launch of a kernel
whose local memory exceeds the limit makes the driver raise the limit first, and that resize
waits for the work already running on the GPU. When that work is a kernel spinning on a peer
whose kernels the same host thread has not launched yet -- every rank of a
:class:`~llmcomm.moe.loopback.Loopback` on one GPU -- the launch never returns and the
spinners run into their deadline (session 22: the EP=8 lamport combine spills 124-272 words a
thread, growing with the rank; rank 6's was the first above the default 1 KiB, and its launch
blocked until the deadline). :func:`ensure_stack_limit` raises the limit while nothing waits::

    before = stack_limit()
    if nbytes > before:
        cuCtxSetLimit(CU_LIMIT_STACK_SIZE, nbytes)   # waits for running work, like the launch

The limit only grows (the driver never lowers it after a launch either), so this costs a
resize at most once per size, and local memory of ``nbytes * threads the GPU holds``
(1 KiB x 2048 threads x 132 SMs = 264 MiB on an H100/H200).
"""

from __future__ import annotations

import ctypes
import functools
import logging

from .errors import BackendUnavailableError

log = logging.getLogger(__name__)

_CU_LIMIT_STACK_SIZE = 0x00


@functools.cache
def _libcuda() -> ctypes.CDLL:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise BackendUnavailableError(
            f"the CUDA driver library (libcuda.so.1) could not be loaded ({e}); the p2p kernels "
            f"need an NVIDIA driver: run on a GPU machine, or use the CPU simulation "
            f"(TRITON_INTERPRET=1)") from e


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise BackendUnavailableError(
            f"{what} failed with CUresult {rc} (expected 0, CUDA_SUCCESS); is a CUDA context "
            f"current on this thread (call torch.cuda.init() or run any CUDA op first)?")


def stack_limit() -> int:
    """The current CUDA context's per-thread stack limit in bytes (``cuCtxGetLimit``)."""
    value = ctypes.c_size_t(0)
    _check(_libcuda().cuCtxGetLimit(ctypes.byref(value), _CU_LIMIT_STACK_SIZE),
           "cuCtxGetLimit(CU_LIMIT_STACK_SIZE)")
    return int(value.value)


def ensure_stack_limit(nbytes: int) -> bool:
    """Raise the current context's per-thread stack limit to at least ``nbytes`` (see the
    module docstring); ``True`` where it raised it. Call it with nothing spinning on work this
    thread has yet to launch: the resize waits for every kernel running on the GPU."""
    if not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"nbytes must be an int >= 0, got {nbytes!r}")
    before = stack_limit()
    if nbytes <= before:
        return False
    _check(_libcuda().cuCtxSetLimit(_CU_LIMIT_STACK_SIZE, ctypes.c_size_t(nbytes)),
           f"cuCtxSetLimit(CU_LIMIT_STACK_SIZE, {nbytes})")
    log.info("per-thread stack limit raised from %d to %d bytes (a kernel's local memory)",
             before, nbytes)
    return True
