"""GPU test of the FlashInfer backend (2 GPUs, FlashInfer installed; trtllm variant only).

Never creates an ``mnnvl`` or ``auto`` workspace: the shared GPU machines keep NVLink multicast
off. Every output is poisoned with NaN before each call; results are compared with the fp32
reference of :mod:`llmcomm.reference` over every rank's input.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests._dist import run_ranks

pytestmark = [
    pytest.mark.gpu2,
    pytest.mark.skipif(importlib.util.find_spec("flashinfer") is None,
                       reason="flashinfer is not installed"),
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                       reason="needs 2 GPUs"),
]

HIDDEN = 4096
MAX_TOKENS = 256
TOKENS = (1, 3, 64, 256)
EPS = 1e-6


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _fp8_bad(fp8: torch.Tensor, n_ref: torch.Tensor, scale: float) -> int:
    """Elements whose dequantised value is more than one FP8 step (+ bf16 slack) off."""
    ref_q = (n_ref.float() / scale).clamp(-448, 448)
    got = fp8.float()
    step = torch.clamp(torch.maximum(ref_q.abs(), got.abs()), min=2.0 ** -6) * 2.0 ** -3
    return int(((got - ref_q).abs() > step * 1.01 + 0.02 / scale).sum().item())


def _rank(rank, world, fusion):
    import torch.distributed as dist

    from llmcomm import probe, reference
    from llmcomm.allreduce.flashinfer import FlashInferAllReduceBackend

    dev = torch.device("cuda", rank)
    group = dist.group.WORLD
    caps = probe.agree_flashinfer(probe.flashinfer(), group)
    if not caps.available:
        return {"skip": caps.reason}
    b = FlashInferAllReduceBackend(group, HIDDEN, torch.bfloat16, MAX_TOKENS, dev, caps,
                                   "trtllm", fusion=fusion)
    out = {"version": caps.version, "reasons": b.reasons, "plan": (b.plan.norm_in_kernel,
                                                                    b.plan.quant_in_kernel),
           "cases": []}
    scale_value = 0.02
    scale = torch.tensor([scale_value], dtype=torch.float32, device=dev)
    for t in TOKENS:
        g = torch.Generator(device="cpu").manual_seed(1000 + t)
        xs = [(torch.randn(t, HIDDEN, generator=g) * 0.5).to(torch.bfloat16) for _ in range(world)]
        res = torch.randn(t, HIDDEN, generator=g).to(torch.bfloat16)
        w = (torch.rand(HIDDEN, generator=g) + 0.5).to(torch.bfloat16)
        x = xs[rank].to(dev)
        resd, wd = res.to(dev), w.to(dev)
        case = {"tokens": t}

        ar = torch.full_like(x, float("nan"))
        b.all_reduce(x, ar)
        torch.cuda.synchronize()
        ar_ref = reference.sum_ranks(xs)
        case["ar_nan"] = bool(torch.isnan(ar).any())
        case["ar_rel"] = _rel(ar.cpu(), ar_ref)

        normed = torch.full_like(x, float("nan"))
        r_out = torch.full_like(x, float("nan"))
        b.all_reduce_add_rms_norm(x, resd, wd, EPS, normed, r_out)
        torch.cuda.synchronize()
        n_ref32, r_ref = _ref_norm(xs, res, w)
        case["norm_nan"] = bool(torch.isnan(normed).any() or torch.isnan(r_out).any())
        case["res_rel"] = _rel(r_out.cpu(), r_ref)
        case["norm_rel"] = _rel(normed.cpu(), n_ref32)

        normed.fill_(float("nan"))
        r_out.fill_(float("nan"))
        fp8 = torch.full(x.shape, float("nan"), device=dev).to(torch.float8_e4m3fn)
        b.all_reduce_add_rms_norm(x, resd, wd, EPS, normed, r_out, quant_scale=scale,
                                  fp8_out=fp8)
        torch.cuda.synchronize()
        case["fp8_nan"] = bool(torch.isnan(fp8.float()).any() or torch.isnan(normed).any())
        case["fp8_norm_rel"] = _rel(normed.cpu(), n_ref32)
        case["fp8_bad"] = _fp8_bad(fp8.cpu(), n_ref32, scale_value)
        out["cases"].append(case)

    # CUDA graph: capture one fused call after creation, replay it, compare.
    t = 64
    g = torch.Generator(device="cpu").manual_seed(7)
    xs = [(torch.randn(t, HIDDEN, generator=g) * 0.5).to(torch.bfloat16) for _ in range(world)]
    res = torch.randn(t, HIDDEN, generator=g).to(torch.bfloat16)
    w = (torch.rand(HIDDEN, generator=g) + 0.5).to(torch.bfloat16)
    x, resd, wd = xs[rank].to(dev), res.to(dev), w.to(dev)
    normed = torch.empty_like(x)
    r_out = torch.empty_like(x)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        b.all_reduce_add_rms_norm(x, resd, wd, EPS, normed, r_out)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    dist.barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        b.all_reduce_add_rms_norm(x, resd, wd, EPS, normed, r_out)
    torch.cuda.synchronize()
    dist.barrier()
    normed.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    n_ref32, _ = _ref_norm(xs, res, w)
    out["graph_nan"] = bool(torch.isnan(normed).any())
    out["graph_rel"] = _rel(normed.cpu(), n_ref32)
    dist.barrier()
    del graph
    b.close()
    b.close()
    return out


def _ref_norm(xs, res, w):
    from llmcomm import reference

    s = reference.sum_ranks(xs)
    r = s + res.float()
    n = reference.rms_norm(r.to(torch.bfloat16).float(), w.float(), EPS)
    return n, r


def _warm_jit() -> None:
    """Build FlashInfer's trtllm comm module once, before the ranks start (version-specific)."""
    try:
        from flashinfer.comm.trtllm_ar import get_trtllm_comm_module

        get_trtllm_comm_module()
    except Exception:  # noqa: BLE001 - the ranks build it themselves then
        pass


@pytest.mark.parametrize("fusion", ["fused", "fused+epilogue-quant", "epilogue"])
def test_flashinfer_matches_fp32_reference(fusion):
    _warm_jit()
    outs = run_ranks(_rank, 2, fusion, backend="nccl", timeout=600)
    if "skip" in outs[0]:
        pytest.skip(outs[0]["skip"])
    expected_plan = {"fused": (True, True), "fused+epilogue-quant": (True, False),
                     "epilogue": (False, False)}[fusion]
    for o in outs:
        assert o["plan"] == expected_plan, o["reasons"]
        for c in o["cases"]:
            assert not (c["ar_nan"] or c["norm_nan"] or c["fp8_nan"]), c
            assert c["ar_rel"] < 1e-2, c
            assert c["res_rel"] < 1e-2, c
            assert c["norm_rel"] < 1.5e-2, c
            assert c["fp8_norm_rel"] < 1.5e-2, c
            assert c["fp8_bad"] == 0, c
        assert not o["graph_nan"] and o["graph_rel"] < 1.5e-2, o
    for a, b in zip(outs[0]["cases"], outs[1]["cases"]):
        assert a["ar_rel"] == b["ar_rel"]  # every rank holds the same sum
