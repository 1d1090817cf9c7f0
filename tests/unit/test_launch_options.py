"""The options every launch of our kernels carries (:data:`llmcomm.kernels.LAUNCH_OPTIONS`):
FMA contraction pinned on, so triton 3.10's new default (off) does not change the outputs'
last bits. Checked through the MoE p2p backend's one launch path, with a fake kernel."""

from __future__ import annotations


import torch

from llmcomm.kernels import LAUNCH_OPTIONS
from tests.unit.test_cuda_driver import FakeCompiled, _backend


class FakeKernel:
    """Records the keyword arguments of ``kernel[grid](...)`` and ``kernel.warmup(...)``."""

    def __init__(self) -> None:
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append(("launch", grid, kw))

    def warmup(self, *args, grid, **kw):
        self.calls.append(("warmup", grid, kw))
        return FakeCompiled(0)


def test_launch_options_pin_fp_fusion_on():
    assert LAUNCH_OPTIONS == {"enable_fp_fusion": True}


def test_moe_launches_and_loads_carry_the_launch_options(monkeypatch):
    be = _backend(monkeypatch, capturing=False)
    be._sim, be.G = False, 7
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    k = FakeKernel()
    for compile_only in (True, False):
        be._compile_only = compile_only
        be._launch(k, 1, 2, num_warps=8, RANK=0)
    assert [c[0] for c in k.calls] == ["warmup", "launch"]
    for _, grid, kw in k.calls:
        assert grid == (7,)
        assert kw == {"enable_fp_fusion": True, "num_warps": 8, "RANK": 0}
    # a caller's own value wins (an A/B of the option), in both paths
    be._launch(k, 1, enable_fp_fusion=False)
    assert k.calls[-1][2] == {"enable_fp_fusion": False}
