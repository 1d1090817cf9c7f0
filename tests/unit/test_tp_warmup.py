"""``TPCommunicator.warmup`` / ``P2PAllReduceBackend.warmup`` on the CPU, with fake kernels.

What must hold for a warmed call to neither compile nor load inside a capture: for every token
count and op, the launch a real call makes is one that ``warmup`` compiled, with the same
triton cache key -- the kernel, the keyword arguments exactly as passed (triton keys its
in-memory cache on the options' ``str``, order included: session 24's hole in the MoE warmup)
and the specialised arguments (dtypes, 16-byte alignment, ``% 16`` of the ints but ``T``).
The GPU form (a real compile hook, calls inside a CUDA-graph capture) is
``tests/gpu/test_tp_warmup.py``."""

from __future__ import annotations

import contextlib

import pytest
import torch

from llmcomm.allreduce import p2p
from llmcomm.errors import CaptureError
from tests.unit.test_cuda_driver import FakeCompiled


class RecordingKernel:
    """A stand-in for a triton kernel: records each launch and each ahead-of-time compile as
    (what, triton-like cache key)."""

    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def _key(self, args, kw):
        sig = []
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                sig.append((str(a.dtype), a.data_ptr() % 16 == 0))
            elif isinstance(a, bool) or isinstance(a, float):
                sig.append(type(a).__name__)
            elif isinstance(a, int):
                # argument 8 is T (do_not_specialize); every other int specialises
                sig.append("T" if i == 8 else ("i", a % 16 == 0, a == 1))
            else:
                sig.append(type(a).__name__)
        return (self.name, str(kw), tuple(sig))

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.log.append(("launch", self._key(args, kw)))
        return launch

    def warmup(self, *args, grid, **kw):
        self.log.append(("warmup", self._key(args, kw)))
        return FakeCompiled(0)


def _backend(monkeypatch, world=2, H=4096, dtype=torch.bfloat16, max_tokens=4096):
    """A p2p allreduce backend with the state ``_launch`` and ``warmup`` read (no group, no
    workspace, kernels recorded instead of launched)."""
    log: list = []
    be = object.__new__(p2p.P2PAllReduceBackend)
    be._k = type("K", (), {n: RecordingKernel(n, log) for n in (
        "oneshot_kernel", "twoshot_kernel", "lamport_kernel", "lamport_rows_kernel")})
    be.hidden_size, be.dtype, be.max_tokens = H, dtype, max_tokens
    be.itemsize = torch.empty((), dtype=dtype).element_size()
    be.world_size, be.rank, be.ranks = world, 0, list(range(world))
    be.table, be.use_pdl, be.timeout_s, be._timeout_ns = p2p.DEFAULT_TABLE, True, 1.0, 10 ** 9
    be.msg_elems = max_tokens * H
    be.slot_elems = p2p._align(min(be.msg_elems, p2p._cdiv(be._lamport_max_bytes(),
                                                            be.itemsize)), 256)
    be.flag_off, be.stage_off, be.lamp_off = 0, 4096, 4096 * 3
    be._state = torch.zeros(16, dtype=torch.int32)
    be._host_err = torch.zeros(8, dtype=torch.int32)
    be._host_err_np = be._host_err.numpy()
    be._dummy_scale = torch.ones(1, dtype=torch.float32)
    be._dummy_fp8 = torch.empty(1, dtype=torch.float8_e4m3fn)
    be._peers = torch.zeros(world, dtype=torch.int64)
    be._warm, be.force_strategy, be._closed, be._buf = set(), None, False, None
    be._last_op, be.last_launch = "all_reduce", None
    be.device = torch.device("cpu")   # warmup's scratch tensors; torch.cuda.device is faked
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    return be, log


def _calls(be, T, capturing, monkeypatch):
    """Every op a caller can make at ``T`` tokens, on fresh (aligned) tensors."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
    H, dt = be.hidden_size, be.dtype
    x, res, out, rout = (torch.randn(T, H).to(dt) for _ in range(4))
    be.all_reduce(x, out)
    for wd in (dt, torch.float32):
        w = torch.rand(H).to(wd)
        be.all_reduce_add_rms_norm(x, res, w, 1e-5, out, rout)
        be.all_reduce_add_rms_norm(x, res, w, 1e-5, out, rout, quant_scale=torch.ones(1),
                                   fp8_out=torch.empty(T, H, dtype=torch.float8_e4m3fn))


@pytest.mark.parametrize("world, H, dtype", [(2, 4096, torch.bfloat16),
                                             (4, 7168, torch.float16), (8, 2880, torch.float32)])
def test_every_launch_is_one_warmup_compiled(monkeypatch, world, H, dtype):
    be, log = _backend(monkeypatch, world, H, dtype)
    n = be.warmup()
    warmed = {k for what, k in log if what == "warmup"}
    assert n == len(warmed) and 4 <= n <= 64, (n, len(warmed))   # a handful of plans, not T
    log.clear()
    plans = set()
    for T in (1, 2, 7, 16, 33, 64, 100, 128, 129, 256, 300, 512, 1000, 2048, 3000, 4096):
        _calls(be, T, capturing=True, monkeypatch=monkeypatch)   # no CaptureError
        plans.add((be.strategy(T), be.last_launch[0]["rows"]))
    launched = {k for what, k in log if what == "launch"}
    assert launched and launched <= warmed, sorted(launched - warmed)[:3]
    assert len(plans) >= 2, plans   # the counts cross a strategy or plan threshold


def test_capture_without_warmup_refuses_to_compile(monkeypatch):
    be, log = _backend(monkeypatch)
    with pytest.raises(CaptureError, match="TPCommunicator.warmup"):
        _calls(be, 5, capturing=True, monkeypatch=monkeypatch)
    assert log == []


def test_warmup_covers_only_what_it_was_asked(monkeypatch):
    """A narrower warmup (counts up to 8, bf16 weights, no fp8) leaves the other classes to
    compile: capture of an fp8 call or of a larger count's plan still raises."""
    be, log = _backend(monkeypatch)
    be.warmup(range(1, 9), (torch.bfloat16,), fp8=False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    x, res, out, rout = (torch.randn(4, 4096).to(torch.bfloat16) for _ in range(4))
    w = torch.rand(4096).to(torch.bfloat16)
    be.all_reduce(x, out)
    be.all_reduce_add_rms_norm(x, res, w, 1e-5, out, rout)
    with pytest.raises(CaptureError):
        be.all_reduce_add_rms_norm(x, res, w, 1e-5, out, rout, quant_scale=torch.ones(1),
                                   fp8_out=torch.empty(4, 4096, dtype=torch.float8_e4m3fn))
    with pytest.raises(CaptureError):
        be.all_reduce_add_rms_norm(x, res, w.float(), 1e-5, out, rout)
    big = be.max_tokens
    if be.warm_classes([big], (torch.bfloat16,), False).keys() - be._warm:
        xb = torch.randn(big, 4096).to(torch.bfloat16)
        with pytest.raises(CaptureError):
            be.all_reduce(xb, torch.empty_like(xb))


def test_communicator_warmup_checks_its_arguments():
    import types

    from llmcomm.allreduce.communicator import TPCommunicator

    comm = object.__new__(TPCommunicator)
    comm.device, comm.max_tokens, comm.dtype = torch.device("cpu"), 16, torch.bfloat16
    comm.backend, comm._warmed = types.SimpleNamespace(), None   # torch-like: no warmup
    with pytest.raises(ValueError, match=r"\[0, max_tokens=16\]"):
        comm.warmup([17])
    with pytest.raises(ValueError, match="non-empty"):
        comm.warmup([])
    with pytest.raises(TypeError, match="weight_dtypes"):
        comm.warmup(weight_dtypes=torch.float16)
    assert comm.warmup() == 0 and comm._warmed == 0
    got = []
    comm.backend = types.SimpleNamespace(warmup=lambda *a: got.append(a) or 3)
    assert comm.warmup([1, 4], weight_dtypes=torch.float32, fp8=False) == 3
    assert got == [([1, 4], (torch.float32,), False)]


def test_communicator_check_errors_reaches_the_backend():
    """Under CUDA-graph replay the caller checks for a device timeout itself: the communicator
    forwards to a backend with device waits (p2p), and is a no-op for one without (torch)."""
    import types

    from llmcomm.allreduce.communicator import TPCommunicator
    from llmcomm.errors import CollectiveTimeoutError

    comm = object.__new__(TPCommunicator)
    comm.backend = types.SimpleNamespace()
    comm.check_errors()

    def fail(sync):
        raise CollectiveTimeoutError("all_reduce", "ranks [0, 1]", [1], 1.0, f"sync={sync}")
    comm.backend = types.SimpleNamespace(check_errors=fail)
    with pytest.raises(CollectiveTimeoutError, match="sync=False"):
        comm.check_errors(sync=False)
