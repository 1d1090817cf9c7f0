"""torch.compile: llmcomm calls trace as single custom ops (``llmcomm.ops``), with fullgraph=True.

World 2 on gloo. Each compiled function mixes llmcomm calls with ordinary tensor ops, is compiled
once with ``dynamic=True`` and called at several token counts; its results are checked against
the float64 references (allreduce + RMSNorm; the dense MoE; every received row against its
source) and, for the allreduce, must equal the eager call's bitwise. A recording backend checks
the graph: one graph for three token counts >= 2 (0 and 1 are specialised by Dynamo and get
graphs of their own), every llmcomm call in it as one ``torch.ops.llmcomm.*`` node, and no
trace of torch.distributed.
"""

import importlib.util

import pytest
import torch

from llmcomm import reference
from llmcomm.moe.reference import quantize_fp8_blocks
from tests._dist import run_ranks
from tests.distributed._moe_cases import check_combine, check_dispatch, make_inputs

HIDDEN = 40
SIM = {"TRITON_INTERPRET": "1"}


class _Recorder:
    """A torch.compile backend: runs AOT (fake tensors, functionalisation) via ``aot_eager``
    and keeps the Dynamo graphs it was given."""

    def __init__(self):
        from torch._dynamo.backends.debugging import aot_eager

        self.graphs = []
        self._aot = aot_eager

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm.code)
        return self._aot(gm, example_inputs)


def _tp_worker(rank, world, dtype):
    import torch.distributed as dist

    import llmcomm

    comm = llmcomm.TPCommunicator(dist.group.WORLD, HIDDEN, dtype, max_tokens=64)

    def layer(x, residual, weight, scale):
        normed, res = comm.all_reduce_add_rms_norm(x * 0.5, residual, weight, 1e-6)
        q, res2, normed2 = comm.all_reduce_add_rms_norm(x, res, weight, 1e-6, quant_scale=scale)
        y = comm.all_reduce(normed + 1)
        out = torch.empty_like(y)
        comm.all_reduce(y, out=out)
        return normed, res, q, res2, normed2, y, out

    rec = _Recorder()
    compiled = torch.compile(layer, backend=rec, fullgraph=True, dynamic=True)
    errs, graphs_after_3 = [], None
    for i, tokens in enumerate((7, 33, 2, 1)):   # 1: a graph of its own (0/1 specialisation)
        if i == 3:
            graphs_after_3 = len(rec.graphs)
        g = torch.Generator().manual_seed(10 + i)
        xs = [torch.randn(tokens, HIDDEN, generator=g).to(dtype) for _ in range(world)]
        residual = torch.randn(tokens, HIDDEN, generator=g).to(dtype)
        weight = (torch.rand(HIDDEN, generator=g) + 0.5).to(dtype)
        scale = torch.tensor([0.02])
        got = compiled(xs[rank], residual, weight, scale)
        want = layer(xs[rank], residual, weight, scale)
        for a, b in zip(got, want):   # the same eager code runs inside the op: bitwise equal
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        ref_n, ref_r = reference.all_reduce_add_rms_norm([x * 0.5 for x in xs], residual, weight,
                                                         1e-6, acc_dtype=torch.float64)
        normed, res = got[0], got[1]
        for a, b in ((normed, ref_n), (res, ref_r)):
            errs.append(((a.double() - b.double()).norm() / b.double().norm()).item())
    return errs, rec.graphs, graphs_after_3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tp_communicator_under_torch_compile(dtype):
    res = run_ranks(_tp_worker, 2, dtype, timeout=240)
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    for errs, graphs, after_3 in res:
        assert max(errs) < tol, errs
        assert after_3 == 1, f"expected one graph for 3 token counts, got {after_3}"
        code = graphs[0]
        assert code.count("torch.ops.llmcomm.all_reduce_add_rms_norm(") == 1, code
        assert code.count("torch.ops.llmcomm.all_reduce_add_rms_norm_fp8(") == 1, code
        assert code.count("torch.ops.llmcomm.all_reduce(") == 1, code
        assert code.count("torch.ops.llmcomm.all_reduce_out(") == 1, code
        assert "gloo" not in code and "distributed" not in code, code


def _moe_worker(rank, world, backend, tmp):
    import torch.distributed as dist

    from llmcomm.moe import EPDispatcher

    E, K, H, M = 8, 3, 24, 13
    L = E // world
    # fp8: the wire rows viewed as expert_x / expert_x_scale in the graph; the caller's own
    # (q, scale) in the last two calls
    fp8 = backend.endswith("-fp8")
    backend = backend.removesuffix("-fp8")
    H = 128 if fp8 else H
    packed = backend.endswith("-packed")   # offsets traced from counts in the graph
    backend = backend.removesuffix("-packed")
    if backend == "p2p-sim":
        from llmcomm.moe.p2p import P2PBackend

        ep = EPDispatcher(dist.group.WORLD, E, K, H, M, torch.float32, _backend_cls=P2PBackend,
                          _backend_kwargs={"simulate_dir": tmp, "num_programs": 3},
                          packed=packed, fp8=fp8)
    else:
        ep = EPDispatcher(dist.group.WORLD, E, K, H, M, torch.float32, backend=backend,
                          packed=packed, fp8=fp8)
    e = (torch.arange(L) + rank * L).double().view(L, 1, 1)

    def moe(x, ids, w):
        d = ep.dispatch(x, ids, w)
        rows = d.expert_x.double()
        scale = None
        if fp8:
            scale = d.expert_x_scale.clone()
            rows = rows * d.expert_x_scale.double().repeat_interleave(128, dim=-1)
        if packed:   # each row's expert (-1: no token there; any value does for those rows)
            er = (d.row_experts().clamp_min(0) + rank * L).double().view(-1, 1)
            out = (rows * (1.0 + er / 8.0) + er / 16.0).float()
            return (ep.combine(out, d), d.expert_x.clone(), d.counts.clone(), d.offsets.clone(),
                    scale)
        out = (rows * (1.0 + e / 8.0) + e / 16.0).float()  # affine_expert
        return ep.combine(out, d), d.expert_x.clone(), d.counts.clone(), None, scale

    rec = _Recorder()
    compiled = torch.compile(moe, backend=rec, fullgraph=True, dynamic=True)
    errs, graphs_after_3 = [], None
    # the last two: 0 and 1 tokens on a rank (graphs of their own: 0/1 specialisation)
    for i, tokens in enumerate(([5, 9], [13, 2], [3, 4], [0, 1], [1, 0])):
        if i == 3:
            graphs_after_3 = len(rec.graphs)
        inputs = make_inputs(300 + i, world, tokens, E, K, H, torch.float32, "random")
        x, ids, w = inputs[rank]
        if fp8 and i >= 3:   # the 0/1-token graphs: with the caller's (q, scale)
            x = quantize_fp8_blocks(x)
        y, expert_x, counts, offsets, scale = compiled(x, ids, w)
        check_dispatch(rank, world, E, inputs, expert_x, counts, offsets, scale=scale)
        errs.append(check_combine(rank, inputs, y, torch.float32, what=f"compiled {backend}",
                                  fp8=fp8))
    return errs, rec.graphs, graphs_after_3


@pytest.mark.parametrize("backend", [
    "torch", "allgather", "torch-packed", "allgather-fp8",
    *(pytest.param(b, marks=pytest.mark.skipif(
        importlib.util.find_spec("triton") is None, reason="the p2p simulation needs triton"))
      # (p2p-sim: protocol auto, lamport here; packed: flags; -fp8: lamport with fp8 since
      # session 33)
      for b in ("p2p-sim", "p2p-sim-packed", "p2p-sim-packed-fp8", "p2p-sim-fp8"))])
def test_ep_dispatcher_under_torch_compile(backend, tmp_path):
    res = run_ranks(_moe_worker, 2, backend, str(tmp_path), timeout=240,
                    env=SIM if backend.startswith("p2p-sim") else None)
    for errs, graphs, after_3 in res:
        assert max(errs) <= 2e-5, errs
        assert after_3 == 1, f"expected one graph for 3 token counts, got {after_3}"
        assert graphs[0].count("torch.ops.llmcomm.moe_dispatch(") == 1, graphs[0]
        assert graphs[0].count("torch.ops.llmcomm.moe_combine(") == 1, graphs[0]


def _effects_worker(rank, world):
    import torch.distributed as dist

    import llmcomm

    comm = llmcomm.TPCommunicator(dist.group.WORLD, HIDDEN, torch.float32, max_tokens=64)

    def f(x):
        comm.all_reduce(x)           # result unused: still a collective every rank must make
        y = comm.all_reduce(x)
        z = comm.all_reduce(x)       # an equal call: not to be merged with the one above
        return y + z

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    x = torch.randn(5, HIDDEN)
    before = comm._call_check.seq    # counts the calls that ran
    y = compiled(x)
    return comm._call_check.seq - before, y


def test_compiled_collectives_are_neither_dropped_nor_merged():
    """The ops are registered ORDERED-effectful; without that, AOT / inductor dead-code
    elimination drops the unused allreduce (2 calls instead of 3)."""
    res = run_ranks(_effects_worker, 2, timeout=120)
    for calls, y in res:
        assert calls == 3, calls
    assert torch.equal(res[0][1], res[1][1])
