"""CPU checks of :mod:`llmcomm._cuda` (the stack limit) and of its use by the p2p MoE backend's
kernel loads, against a fake ``libcuda``. Session 22: an EP=8 loopback hung in its first call
because a combine's launch raised the stack limit while the other ranks' kernels spun."""

from __future__ import annotations

import contextlib
import logging
import types

import pytest
import torch

from llmcomm import _cuda
from llmcomm.errors import BackendUnavailableError
from llmcomm.moe.p2p import P2PBackend


class FakeDriver:
    """``cuCtxGetLimit`` / ``cuCtxSetLimit`` of one context, with a call log."""

    def __init__(self, stack: int = 1024, rc: int = 0) -> None:
        self.stack, self.rc, self.sets = stack, rc, []

    def cuCtxGetLimit(self, ref, limit):
        assert limit == 0   # CU_LIMIT_STACK_SIZE
        ref._obj.value = self.stack
        return self.rc

    def cuCtxSetLimit(self, limit, value):
        assert limit == 0
        self.sets.append(value.value)
        self.stack = value.value
        return self.rc


@pytest.fixture
def driver(monkeypatch):
    fake = FakeDriver()
    monkeypatch.setattr(_cuda, "_libcuda", lambda: fake)
    return fake


def test_stack_limit_raised_only_when_too_small(driver):
    assert _cuda.stack_limit() == 1024
    assert _cuda.ensure_stack_limit(1024) is False and _cuda.ensure_stack_limit(0) is False
    assert driver.sets == []
    assert _cuda.ensure_stack_limit(1088) is True
    assert driver.sets == [1088] and _cuda.stack_limit() == 1088
    assert _cuda.ensure_stack_limit(1072) is False and driver.sets == [1088]


def test_stack_limit_errors(driver):
    with pytest.raises(ValueError, match="nbytes must be an int >= 0, got -4"):
        _cuda.ensure_stack_limit(-4)
    driver.rc = 201   # CUDA_ERROR_INVALID_CONTEXT
    with pytest.raises(BackendUnavailableError, match="cuCtxGetLimit.*CUresult 201.*context"):
        _cuda.stack_limit()


class FakeCompiled:
    def __init__(self, n_spills: int) -> None:
        self.n_spills, self.name, self.loaded = n_spills, "fake_kernel", False

    def _init_handles(self) -> None:
        self.loaded = True


def _backend(monkeypatch, capturing: bool) -> P2PBackend:
    """A p2p backend with only what ``_load`` touches (no group, no workspace)."""
    be = object.__new__(P2PBackend)
    be.cfg = types.SimpleNamespace(device=torch.device("cuda", 0))
    be._warmed = None
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
    return be


@pytest.mark.parametrize("spills, limit", [(0, 1024), (124, 1024), (272, 1088)])
def test_kernel_load_raises_the_stack_to_its_local_memory(driver, monkeypatch, spills, limit):
    """Triton's ``n_spills`` is the kernel's local bytes / 4: 272 (rank 7's EP=8 combine at 8
    warps) needs 1088 bytes, above the default 1024; 124 fits."""
    be = _backend(monkeypatch, capturing=False)
    k = FakeCompiled(spills)
    be._load(types.SimpleNamespace(warmup=lambda *a, **kw: k), (), (1,), {})
    assert k.loaded and _cuda.stack_limit() == limit
    assert driver.sets == ([limit] if limit > 1024 else [])


def test_kernel_load_inside_a_capture_only_warns(driver, monkeypatch, caplog):
    be = _backend(monkeypatch, capturing=True)
    with caplog.at_level(logging.WARNING, logger="llmcomm.moe.p2p"):
        be._load(types.SimpleNamespace(warmup=lambda *a, **kw: FakeCompiled(300)), (), (1,), {})
    assert driver.sets == [] and "1200 bytes of local memory" in caplog.text
    assert "warmup()" in caplog.text
