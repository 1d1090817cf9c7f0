"""CPU tests of the FlashInfer backend: keyword building, scoping, plans, decisions and the
whole backend against fake FlashInfer modules over gloo (no GPU, no real FlashInfer).

Multi-node / MNNVL decision paths are exercised only here, with fakes.
"""

from __future__ import annotations

import contextlib
import inspect

import pytest
import torch

from llmcomm import policy, probe
from llmcomm.allreduce import flashinfer as fib
from llmcomm.errors import BackendUnavailableError
from llmcomm.topology import TopologyFacts
from tests._dist import run_ranks
from tests.unit.test_probe import CALLS, fake, install_fake, make_fake  # noqa: F401 (fake: fixture)

WORLD_GROUP = object()  # stands in for a process group in the pure tests



def _ws_kwargs(caps, variant="trtllm", group_is_world=False, **over):
    args = dict(variant=variant, world_size=2, rank=1, max_tokens=64, hidden_size=128,
                dtype=torch.bfloat16, group=WORLD_GROUP, group_is_world=group_is_world,
                comm_backend_factory=lambda: "CB")
    args.update(over)
    return fib.build_workspace_kwargs(caps, **args)


def _binds(fn, kwargs) -> None:
    """Raises TypeError when the fake's real signature would reject ``kwargs``."""
    inspect.signature(fn).bind(**kwargs)


BASE_WS = {"backend", "world_size", "rank", "max_token_num", "hidden_dim", "dtype"}


# --------------------------------------------------------------------------- workspace kwargs

def test_workspace_kwargs_current_api_pass_group_and_comm_backend(fake):
    caps = fake("current")
    kw = _ws_kwargs(caps)
    assert set(kw) == BASE_WS | {"group", "comm_backend"}
    assert kw["group"] is WORLD_GROUP and kw["comm_backend"] == "CB"
    assert kw["backend"] == "trtllm" and kw["rank"] == 1 and kw["world_size"] == 2
    _binds(make_fake("current")[1].create_allreduce_fusion_workspace, kw)


def test_workspace_kwargs_068_scopes_through_comm_backend_only(fake):
    caps = fake("v068")
    kw = _ws_kwargs(caps)
    assert set(kw) == BASE_WS | {"comm_backend"}  # no `group`: 0.6.8 would raise TypeError
    _binds(make_fake("v068")[1].create_allreduce_fusion_workspace, kw)
    with pytest.raises(TypeError):
        _binds(make_fake("v068")[1].create_allreduce_fusion_workspace, {**kw, "group": 1})


def test_workspace_0610_refused_on_a_subgroup_but_fine_on_world(fake):
    caps = fake("v0610")
    with pytest.raises(BackendUnavailableError, match=r"0\.6\.10.*#45917"):
        _ws_kwargs(caps, group_is_world=False)
    kw = _ws_kwargs(caps, group_is_world=True)
    assert "group" not in kw


@pytest.mark.parametrize("kind", ["nosig", "cbuiltin", "kwargs"])
def test_workspace_unknown_signature_passes_nothing_optional(fake, kind):
    caps = fake(kind)
    kw = _ws_kwargs(caps, group_is_world=True)
    assert set(kw) == BASE_WS  # unknown = not passed
    with pytest.raises(BackendUnavailableError, match="TP group"):
        _ws_kwargs(caps, group_is_world=False)


def test_workspace_never_auto_and_mnnvl_needs_comm_backend(fake):
    caps = fake("current")
    with pytest.raises(ValueError, match="never 'auto'"):
        _ws_kwargs(caps, variant="auto")
    with pytest.raises(ValueError, match="outside"):
        _ws_kwargs(caps, rank=2)
    kw = _ws_kwargs(caps, variant="mnnvl", gpus_per_node=4)
    assert kw["backend"] == "mnnvl" and kw["comm_backend"] == "CB" and kw["gpus_per_node"] == 4
    nosig = fake("nosig")
    with pytest.raises(BackendUnavailableError, match="MPI COMM_WORLD"):
        _ws_kwargs(nosig, variant="mnnvl", group_is_world=True)


# --------------------------------------------------------------------------- fusion kwargs

def _fusion_kwargs(caps, variant="trtllm", tokens=4, world=2):
    return fib.build_fusion_kwargs(caps, variant=variant, pattern=1, num_tokens=tokens,
                                   world_size=world, hidden_size=128, dtype=torch.bfloat16,
                                   tensors={"input": "x", "workspace": "ws"})


def test_fusion_kwargs_current(fake):
    caps = fake("current")
    kw = _fusion_kwargs(caps)
    assert kw == {"input": "x", "workspace": "ws", "pattern": 1, "launch_with_pdl": True,
                  "trigger_completion_at_end": True, "use_oneshot": True, "fp32_acc": True}
    _binds(make_fake("current")[1].allreduce_fusion, kw)


def test_fusion_kwargs_old_api_omits_trigger(fake):
    caps = fake("old")
    kw = _fusion_kwargs(caps)
    assert "trigger_completion_at_end" not in kw and kw["use_oneshot"] is True
    _binds(make_fake("old")[1].allreduce_fusion, kw)
    with pytest.raises(TypeError):  # what sglang #26197 hit
        _binds(make_fake("old")[1].allreduce_fusion, {**kw, "trigger_completion_at_end": True})


@pytest.mark.parametrize("kind", ["nosig", "cbuiltin", "kwargs"])
def test_fusion_kwargs_unknown_signature_pass_only_required(fake, kind):
    kw = _fusion_kwargs(fake(kind))
    assert kw == {"input": "x", "workspace": "ws", "pattern": 1}


def test_fusion_kwargs_mnnvl_has_no_trtllm_controls(fake):
    kw = _fusion_kwargs(fake("current"), variant="mnnvl")
    assert kw == {"input": "x", "workspace": "ws", "pattern": 1, "launch_with_pdl": True}


def test_oneshot_is_a_pure_function_of_shape():
    assert fib.flashinfer_use_oneshot(2, 8192, 2, 2)  # tokens <= world forces one-shot
    assert fib.flashinfer_use_oneshot(128, 8192, 2, 8)  # 16 MiB <= 42
    assert not fib.flashinfer_use_oneshot(4096, 8192, 2, 8)  # 512 MiB > 42
    assert fib.flashinfer_use_oneshot(16384, 8192, 2, 2)  # 512 MiB <= 512
    assert not fib.flashinfer_use_oneshot(16385, 8192, 2, 2)
    assert not fib.flashinfer_use_oneshot(4096, 8192, 2, 16)  # table entry for 16 (no KeyError)
    with pytest.raises(ValueError):
        fib.flashinfer_use_oneshot(0, 8192, 2, 2)


# --------------------------------------------------------------------------- plans & checks

def test_fusion_plan_single_node_trtllm_fuses_fp8(fake):
    plan = fib.fusion_plan(fake("v068"), "trtllm", "fused")
    assert plan.norm_in_kernel and plan.quant_in_kernel and plan.dropped == ()


def test_fusion_plan_pp_gt_1_turns_fusion_off(fake):
    plan = fib.fusion_plan(fake("current"), "trtllm", "fused", pp_size=2)
    assert not plan.norm_in_kernel and not plan.quant_in_kernel
    assert "PP=2" in plan.reasons[0] and "#43616" in plan.reasons[0]
    assert plan.dropped == ("allreduce+add+norm",)


def test_fusion_plan_mnnvl_quantises_in_epilogue(fake):
    plan = fib.fusion_plan(fake("current"), "mnnvl", "fused")
    assert plan.norm_in_kernel and not plan.quant_in_kernel
    assert plan.dropped == ("fp8-quant",)
    plan = fib.fusion_plan(fake("current"), "mnnvl", "fused+epilogue-quant")
    assert plan.norm_in_kernel and not plan.quant_in_kernel and plan.dropped == ()


def test_fusion_plan_missing_patterns(fake):
    old = fake("old")  # patterns 0..5 only: has OutFP8Quant (4)
    assert fib.fusion_plan(old, "trtllm").quant_in_kernel
    caps = probe.FlashInferCapabilities(True, "x", "r", True, True, True, True,
                                        ("kAllReduce", "kARResidualRMSNorm"), True)
    plan = fib.fusion_plan(caps, "trtllm")
    assert plan.norm_in_kernel and not plan.quant_in_kernel and plan.dropped == ("fp8-quant",)
    caps = probe.FlashInferCapabilities(True, "x", "r", True, True, True, True, ("kAllReduce",),
                                        True)
    plan = fib.fusion_plan(caps, "trtllm")
    assert not plan.norm_in_kernel and "lacks pattern kARResidualRMSNorm" in plan.reasons[0]
    with pytest.raises(ValueError):
        fib.fusion_plan(caps, "trtllm", "bogus")
    with pytest.raises(ValueError):
        fib.fusion_plan(caps, "trtllm", pp_size=0)


def test_shape_support():
    with pytest.raises(ValueError, match="TP sizes"):
        fib.check_shape_support("trtllm", 3, 128, torch.bfloat16, 8)
    fib.check_shape_support("mnnvl", 32, 128, torch.bfloat16, 8)
    with pytest.raises(ValueError, match="% 8"):
        fib.check_shape_support("trtllm", 2, 132, torch.bfloat16, 8)
    fib.check_shape_support("trtllm", 2, 132, torch.float32, 8)
    with pytest.raises(TypeError):
        fib.check_shape_support("trtllm", 2, 128, torch.int32, 8)
    with pytest.raises(ValueError):
        fib.check_shape_support("trtllm", 2, 128, torch.bfloat16, 0)


def test_why_not_flashinfer(fake):
    assert fib.why_not_flashinfer(fake("current"), variant="trtllm", world_size=8,
                                  group_is_world=False, hidden_size=4096,
                                  dtype=torch.bfloat16) is None
    why = fib.why_not_flashinfer(fake("nosig"), variant="trtllm", world_size=2,
                                 group_is_world=False)
    assert why and "TP group" in why
    why = fib.why_not_flashinfer(fake("nosig"), variant="trtllm", world_size=16,
                                 group_is_world=True)
    assert why and "use_oneshot" in why
    assert "unavailable" in fib.why_not_flashinfer(fake("missing"), variant="trtllm",
                                                   world_size=2, group_is_world=True)


# --------------------------------------------------------------------------- decisions (policy)

def test_decision_paths_multi_node_and_pp(fake):
    caps = fake("current")
    one = policy.flashinfer_variant(1, False, caps.has_mnnvl)
    assert one.choice == "trtllm"
    two = policy.flashinfer_variant(2, True, caps.has_mnnvl)
    assert two.choice == "mnnvl"
    assert policy.flashinfer_variant(2, False, caps.has_mnnvl).choice == "none"
    with pytest.raises(ValueError, match="2 nodes"):
        policy.flashinfer_variant(2, True, caps.has_mnnvl, "trtllm")
    facts = TopologyFacts.simulated(8, num_nodes=2, multicast_allowed=True)
    dec = policy.resolve_allreduce_backend("auto", facts, caps)
    assert dec.choice == "flashinfer"
    fused = policy.allreduce_fusion_decision("flashinfer", facts, 1, caps, quant=True)
    assert fused.choice == "fused+epilogue-quant"
    assert fib.fusion_plan(caps, two.choice, fused.choice).norm_in_kernel
    pp = policy.allreduce_fusion_decision("flashinfer", facts, 2, caps)
    assert pp.choice == "epilogue" and "PP=2" in pp.reasons[0]


def test_decision_disagreeing_or_missing_flashinfer_is_not_used(fake):
    facts = TopologyFacts.simulated(2, num_nodes=1, peer_access=False)
    caps = fake("missing")
    dec = policy.resolve_allreduce_backend("auto", facts, caps)
    assert dec.choice == "torch" and any("FlashInfer unavailable" in r for r in dec.reasons)
    import dataclasses
    bad = dataclasses.replace(fake("current"), available=False, agreed=False,
                              reason="ranks disagree on FlashInfer (version)")
    dec = policy.resolve_allreduce_backend("auto", facts, bad)
    assert dec.choice == "torch" and any("disagree" in r for r in dec.reasons)


# --------------------------------------------------------------------------- constructor checks

def test_constructor_refuses_before_any_collective(fake, monkeypatch):
    caps = fake("current")
    cuda0 = torch.device("cuda", 0)
    with pytest.raises(ValueError, match="variant"):
        fib.FlashInferAllReduceBackend(WORLD_GROUP, 128, torch.bfloat16, 8, cuda0, caps, "auto")
    with pytest.raises(ValueError, match="TP process group"):
        fib.FlashInferAllReduceBackend(None, 128, torch.bfloat16, 8, cuda0, caps)
    with pytest.raises(TypeError):
        fib.FlashInferAllReduceBackend(WORLD_GROUP, 128, torch.bfloat16, 8, cuda0, {})
    with pytest.raises(BackendUnavailableError, match="CUDA device"):
        fib.FlashInferAllReduceBackend(WORLD_GROUP, 128, torch.bfloat16, 8, "cpu", caps)
    with pytest.raises(BackendUnavailableError, match="not usable"):
        fib.FlashInferAllReduceBackend(WORLD_GROUP, 128, torch.bfloat16, 8, cuda0,
                                       fake("missing"))
    caps = fake("current")
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    with pytest.raises(BackendUnavailableError, match="NCCL_NVLS_ENABLE=0"):
        fib.FlashInferAllReduceBackend(WORLD_GROUP, 128, torch.bfloat16, 8, cuda0, caps, "mnnvl")


# --------------------------------------------------------------------------- whole backend, gloo

def _pretend_cuda() -> None:
    """In a spawned CPU rank: let the backend run on CPU tensors against the fake FlashInfer."""
    torch.cuda.is_available = lambda: True
    torch.cuda.is_current_stream_capturing = lambda: False
    torch.cuda.device = lambda d: contextlib.nullcontext()


def _data(world, tokens, hidden, dtype, seed=7):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(tokens, hidden, generator=g).to(dtype) for _ in range(world)]
    res = torch.randn(tokens, hidden, generator=g).to(dtype)
    w = (torch.rand(hidden, generator=g) + 0.5).to(dtype)
    return xs, res, w


def _backend_rank(rank, world, kind, fusion, groups):
    import torch.distributed as dist

    from llmcomm import reference

    _pretend_cuda()
    install_fake(kind)
    subgroups = [dist.new_group(g) for g in groups]
    group = next(sg for sg, g in zip(subgroups, groups) if rank in g)
    grank = dist.get_rank(group)
    gsize = dist.get_world_size(group)
    caps = probe.agree_flashinfer(probe.flashinfer(refresh=True), group)
    tokens, hidden, dtype = 5, 64, torch.bfloat16
    b = fib.FlashInferAllReduceBackend(group, hidden, dtype, 16, torch.device("cuda", 0), caps,
                                       "trtllm", fusion=fusion)
    xs, res, w = _data(gsize, tokens, hidden, dtype, seed=11 + groups.index(
        next(g for g in groups if rank in g)))
    x = xs[grank]
    out = {"fingerprint": b.fingerprint(), "reasons": b.reasons}

    ar = torch.full_like(x, float("nan"))
    b.all_reduce(x, ar)
    out["ar_err"] = (ar.float() - reference.all_reduce(xs).float()).abs().max().item()

    scale = torch.tensor([0.05], dtype=torch.float32)
    normed = torch.full_like(x, float("nan"))
    r_out = torch.full_like(x, float("nan"))
    fp8 = torch.full(x.shape, float("nan")).to(torch.float8_e4m3fn)
    b.all_reduce_add_rms_norm(x, res, w, 1e-6, normed, r_out, quant_scale=scale, fp8_out=fp8)
    q_ref, r_ref, n_ref = reference.all_reduce_add_rms_norm(xs, res, w, 1e-6, quant_scale=scale)
    out["nan"] = bool(torch.isnan(normed.float()).any() or torch.isnan(r_out.float()).any()
                      or torch.isnan(fp8.float()).any())
    out["res_err"] = (r_out.float() - r_ref.float()).abs().max().item()
    out["norm_err"] = (normed.float() - n_ref.float()).abs().max().item()
    # one FP8 step (e4m3: 3 mantissa bits) plus the bf16 error of the normed value it was
    # quantised from (FlashInfer rounds the sum to bf16 before adding the residual)
    mag = torch.maximum(q_ref.float().abs(), fp8.float().abs())
    step = torch.clamp(mag, min=2.0 ** -6) * 2.0 ** -3
    tol = step * 1.01 + 0.02 / scale
    out["fp8_ok"] = bool(((fp8.float() - q_ref.float()).abs() <= tol).all())
    out["fp8_close"] = ((fp8.float() - q_ref.float()).abs().max().item())
    calls = [(name, sorted(k for k in kw if k not in ("input", "workspace")), kw.get("pattern"))
             for name, kw in CALLS]
    out["calls"] = calls
    ws_kw = CALLS[0][1]
    out["ws_group_passed"] = ws_kw.get("group") is not None
    out["ws_comm_backend_size"] = (ws_kw["comm_backend"].Get_size()
                                   if ws_kw.get("comm_backend") is not None else None)
    b.close()
    b.close()
    out["destroyed"] = CALLS and True
    return out


@pytest.mark.parametrize("kind,fusion,expect_patterns", [
    ("current", "fused", [0, 4]),             # FP8 in FlashInfer's kernel
    ("v068", "fused", [0, 4]),
    ("old", "fused+epilogue-quant", [0, 1]),  # FP8 in llmcomm's epilogue
    ("current", "epilogue", [0, 0]),          # PP > 1 style: allreduce only
])
def test_backend_end_to_end_on_fakes(kind, fusion, expect_patterns):
    outs = run_ranks(_backend_rank, 2, kind, fusion, [[0, 1]], timeout=120)
    for o in outs:
        assert not o["nan"], "an output was left poisoned"
        assert o["ar_err"] <= 0.07, o
        assert o["res_err"] <= 0.07, o
        assert o["norm_err"] <= 0.05, o
        assert o["fp8_ok"], o["fp8_close"]
        patterns = [p for name, _, p in o["calls"] if name == "allreduce_fusion"]
        assert patterns == expect_patterns, o["calls"]
        assert o["calls"][0][0] == "create_allreduce_fusion_workspace"
        assert o["fingerprint"]["variant"] == "trtllm"
    assert outs[0]["fingerprint"] == outs[1]["fingerprint"]


def test_backend_on_tp_subgroups_scopes_the_workspace():
    # world 4, TP groups [0,1] and [2,3]: 0.6.8 has no `group`; the workspace is scoped through
    # llmcomm's comm_backend, whose bcast maps group root 0 to global rank 2 in the second group.
    outs = run_ranks(_backend_rank, 4, "v068", "fused", [[0, 1], [2, 3]], timeout=180)
    for o in outs:
        assert not o["ws_group_passed"]
        assert o["ws_comm_backend_size"] == 2
        assert o["ar_err"] <= 0.07 and o["norm_err"] <= 0.05 and o["fp8_ok"]


def _refused_rank(rank, world, kind):
    import torch.distributed as dist

    _pretend_cuda()
    install_fake(kind)
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group = groups[rank // 2]
    caps = probe.agree_flashinfer(probe.flashinfer(refresh=True), group)
    try:
        fib.FlashInferAllReduceBackend(group, 64, torch.bfloat16, 16, torch.device("cuda", 0),
                                       caps, "trtllm")
    except BackendUnavailableError as exc:
        return str(exc)
    return "created"


@pytest.mark.parametrize("kind", ["v0610", "nosig"])
def test_unscopable_flashinfer_refused_on_every_rank_without_hanging(kind):
    outs = run_ranks(_refused_rank, 4, kind, timeout=180)
    for o in outs:
        assert o != "created"
        assert "TP group" in o and "#45917" in o
