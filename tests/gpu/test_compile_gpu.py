"""torch.compile on 2 GPUs: the p2p allreduce and MoE backends inside compiled graphs.

The CPU tests (``tests/distributed/test_compile.py``) show that the calls trace as single custom
ops; this runs the p2p kernels inside them: inductor with ``mode="reduce-overhead"`` (CUDA-graph
trees replay the ops) for the fused allreduce + RMSNorm, ``aot_eager`` for the MoE pair (its
p2p backend is graph-safe; the point here is the op boundary). Results against the float64
references, fresh inputs per call, outputs compared after every replay.
"""

from __future__ import annotations

import importlib.util

import pytest

from tests._dist import run_ranks

pytestmark = [pytest.mark.gpu2,
              pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                 reason="triton is not installed")]


def _tp_worker(rank, world):
    import torch
    import torch.distributed as dist

    import llmcomm
    from llmcomm import reference

    H, dtype = 4096, torch.bfloat16
    comm = llmcomm.TPCommunicator(dist.group.WORLD, H, dtype, max_tokens=256, backend="p2p")

    def layer(x, residual, weight):
        normed, res = comm.all_reduce_add_rms_norm(x * 0.5, residual, weight, 1e-6)
        return normed * 2.0, res

    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    errs = []
    for i in range(6):             # the first calls warm up / record, the later ones replay
        g = torch.Generator(device="cuda").manual_seed(500 + i)
        xs = [torch.randn(16, H, generator=g, device="cuda").to(dtype) for _ in range(world)]
        residual = torch.randn(16, H, generator=g, device="cuda").to(dtype)
        weight = (torch.rand(H, generator=g, device="cuda") + 0.5).to(dtype)
        normed, res = compiled(xs[rank], residual, weight)
        normed, res = normed.clone(), res.clone()   # cudagraph outputs are overwritten later
        ref_n, ref_r = reference.all_reduce_add_rms_norm([x * 0.5 for x in xs], residual,
                                                         weight, 1e-6, acc_dtype=torch.float64)
        for a, b in ((normed, ref_n * 2.0), (res, ref_r)):
            errs.append(((a.double() - b.double()).norm() / b.double().norm()).item())
    torch.cuda.synchronize()
    return errs


def test_p2p_allreduce_under_torch_compile_reduce_overhead():
    for errs in run_ranks(_tp_worker, 2, backend="nccl", timeout=400):
        assert max(errs) < 1e-2, errs


def _moe_worker(rank, world, protocol):
    import torch
    import torch.distributed as dist

    from llmcomm.moe import EPDispatcher
    from tests.distributed._moe_cases import check_combine, check_dispatch, make_inputs

    E, K, H, M = 64, 6, 1024, 64
    ep = EPDispatcher(dist.group.WORLD, E, K, H, M, torch.bfloat16, backend="p2p",
                      _backend_kwargs={"protocol": protocol})
    L = E // world
    e = (torch.arange(L, device="cuda") + rank * L).double().view(L, 1, 1)

    def moe(x, ids, w):
        d = ep.dispatch(x, ids, w)
        out = (d.expert_x.double() * (1.0 + e / 8.0) + e / 16.0).to(torch.bfloat16)
        return ep.combine(out, d), d.expert_x.clone(), d.counts.clone()

    compiled = torch.compile(moe, backend="aot_eager", fullgraph=True, dynamic=True)
    errs = []
    for i, tokens in enumerate(([50, 7], [64, 64], [3, 33], [20, 2])):
        inputs = make_inputs(600 + i, world, tokens, E, K, H, torch.bfloat16, "random")
        x, ids, w = (t.cuda() for t in inputs[rank])
        y, expert_x, counts = compiled(x, ids, w)
        check_dispatch(rank, world, E, inputs, expert_x, counts)
        errs.append(check_combine(rank, inputs, y, torch.bfloat16, what=f"compiled {protocol}"))
    ep.check_errors(sync=True)
    return errs


@pytest.mark.parametrize("protocol", ["flags", "lamport"])
def test_p2p_moe_under_torch_compile(protocol):
    for errs in run_ranks(_moe_worker, 2, protocol, backend="nccl", timeout=400):
        assert max(errs) < 2.5e-2, errs
