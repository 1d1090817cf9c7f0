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


def test_lamport_pre_load_is_the_entry_its_launch_uses(monkeypatch):
    """triton keys its in-memory cache on the options exactly as passed (``str(options)``,
    order included). The both-warps pre-load of a lamport kernel's first call must therefore
    pass what the later launch at the other warp count passes, or that launch compiles and loads
    a module again while the peers spin (session 24: the 16-warp lamport dispatch for 33-127
    tokens after a warmup that covered that class at 2 tokens, 8 warps)."""
    import types

    be = _backend(monkeypatch, capturing=False)
    be.cfg = types.SimpleNamespace(device=torch.device("cuda", 0), rank=0, world_size=2,
                                   max_tokens_per_rank=128, hidden_size=7168, top_k=8,
                                   local_experts=128, num_experts=256, dtype=torch.bfloat16)
    be._sim, be.G, be.combine_split, be.num_warps, be._small_warps = False, 128, 4, 16, 8
    be._loaded, be.variants, be.shift = set(), {"POSTED": False, "PDL": True}, 0
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    k = FakeKernel()
    ids, w = torch.zeros(2, 8, dtype=torch.int64), torch.zeros(2, 8)
    be._compile_only = True      # warmup() at 2 tokens: 8 warps, both counts pre-loaded
    be._launch_lamport(k, 2, 1, ids, w, "x", ids, w, 2, TSPIN=True, MSPIN=True)
    be._compile_only = False     # a later call of the same class at 40 tokens: 16 warps
    be._launch_lamport(k, 40, 1, ids, w, "x", ids, w, 40, TSPIN=True, MSPIN=True)
    loads = [list(kw.items()) for what, _, kw in k.calls if what == "warmup"]
    (launch,) = [list(kw.items()) for what, _, kw in k.calls if what == "launch"]
    assert dict(launch)["num_warps"] == 16 and not dict(launch)["MSPIN"]
    assert launch in loads, (launch, loads)
    # and every token count 0..M after warmup's counts (warm_token_counts): each launch is an
    # entry a load made (the T class itself is _launch_lamport's key, not modelled here)
    from llmcomm.moe.dispatcher import warm_token_counts

    k, be._loaded, be._compile_only = FakeKernel(), set(), True
    for T in warm_token_counts(128):
        be._launch_lamport(k, T, 1, ids, w, "x", ids, w, T, TSPIN=True, MSPIN=True)
    be._compile_only = False
    for T in range(129):
        be._launch_lamport(k, T, 1, ids, w, "x", ids, w, T, TSPIN=True, MSPIN=True)
    loads = {tuple(kw.items()) for what, _, kw in k.calls if what == "warmup"}
    launches = {tuple(kw.items()) for what, _, kw in k.calls if what == "launch"}
    assert len(launches) == 2 and launches <= loads, launches - loads   # 8 and 16 warps
