"""The CUDA driver calls torch does not expose (``ctypes`` on ``libcuda``; GPU processes only).

Both are about a launch that waits for the kernels already running, which deadlocks where
those kernels spin on a peer whose kernels the same host thread has yet to launch (every rank
of a :class:`~llmcomm.moe.loopback.Loopback` on one GPU), so both are done ahead, while nothing
spins (``P2PBackend._load``, which ``warmup`` and a loopback's first call of each kernel run).

**Lazy loading** (:func:`load_function`). Since CUDA 12.2 the driver loads a kernel's code
onto the device at its first launch (``CUDA_MODULE_LOADING=LAZY``, also torch's default), and
that load may need the context synchronised: NVIDIA's lazy-loading guide names exactly a kernel
that spins until another one runs as the case that deadlocks. Session 24 met it: a loopback's
first free-running batch after ``warmup`` (rank 0's 64 calls launched before rank 1's) ran
into the deadline in the first call in two fresh processes of three, and the same batch in the
same process later passed. ``cuFuncLoad`` (CUDA 12.4+) finishes the load without a launch::

    cuFuncIsLoaded(&state, f)             # CU_FUNCTION_LOADING_STATE_LOADED == 1 ?
    if state != LOADED: cuFuncLoad(f)

**The stack limit** (:func:`ensure_stack_limit`): the current context's per-thread stack limit (``CU_LIMIT_STACK_SIZE``), which is
how the driver sizes the local memory a kernel's register spills live in. A launch of a kernel
whose local memory exceeds the limit makes the driver raise the limit first, and that resize
waits for the work already running on the GPU. When that work is a kernel spinning on a peer
whose kernels the same host thread has not launched yet -- every rank of a
:class:`~llmcomm.moe.loopback.Loopback` on one GPU -- the launch never returns and the
spinners run into their deadline (session 22: the EP=8 lamport combine spills 124-272 words a
thread, growing with the rank; rank 6's was the first above the default 1 KiB, and its launch
blocked until the deadline). It is raised ahead instead::

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
_CU_FUNCTION_LOADING_STATE_LOADED = 1


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


def function_loaded(handle: int) -> bool | None:
    """Whether the kernel ``handle`` (a ``CUfunction``, e.g. triton's ``CompiledKernel.function``)
    has its code loaded on the device (``cuFuncIsLoaded``); ``None`` where the driver predates
    the call (CUDA 12.4)."""
    try:
        fn = _libcuda().cuFuncIsLoaded
    except AttributeError:
        return None
    state = ctypes.c_int(0)
    _check(fn(ctypes.byref(state), ctypes.c_void_p(handle)), "cuFuncIsLoaded")
    return state.value == _CU_FUNCTION_LOADING_STATE_LOADED


def load_function(handle: int) -> bool:
    """Load the kernel ``handle``'s code onto the device now rather than at its first launch
    (``cuFuncLoad``; see the module docstring); ``True`` where this call loaded it. Call it
    with nothing spinning on work this thread has yet to launch. Without ``cuFuncIsLoaded``
    (a driver before CUDA 12.4) it does nothing and returns ``False``: set
    ``CUDA_MODULE_LOADING=EAGER`` there."""
    if function_loaded(handle) is not False:
        return False
    _check(_libcuda().cuFuncLoad(ctypes.c_void_p(handle)), "cuFuncLoad")
    return True
