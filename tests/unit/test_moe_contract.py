"""MoE EP: the combine contract, the reference, validation and backend choice (no processes)."""

from __future__ import annotations

import pytest
import torch

from llmcomm.moe import EP_BACKENDS, resolve_ep_backend
from llmcomm.moe.backends import (AllGatherBackend, EPConfig, MoEBackend, TorchA2ABackend,
                                  expand_to_experts, packed_offsets, packed_row_experts,
                                  weighted_partial)
from llmcomm.moe.dispatcher import check_layout, validate_config, validate_dispatch_args
from llmcomm.moe.reference import (affine_expert, check_combine_output, reference_combine,
                                   reference_dispatch)
from llmcomm.topology import TopologyFacts


def _case(T=37, E=16, K=4, H=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    return x, ids, w


def test_every_backend_declares_reduced_output_in_one_place():
    from llmcomm.moe.p2p import P2PBackend

    assert MoEBackend.output_is_reduced is True
    for cls in (TorchA2ABackend, AllGatherBackend, P2PBackend):
        assert cls.output_is_reduced is True
        assert "output_is_reduced" not in cls.__dict__, f"{cls.__name__} overrides the contract"
    assert set(EP_BACKENDS) == {"torch", "allgather", "p2p"}


def test_reference_matches_loop():
    x, ids, w = _case()
    y = reference_combine(x, ids, w)
    want = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            want[t] += w[t, k].double() * affine_expert(int(ids[t, k]), x[t].double())
    assert torch.allclose(y, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checker_accepts_correct_and_rejects_wrong_reductions(dtype):
    x, ids, w = _case()
    ref = reference_combine(x, ids, w)
    check_combine_output(ref.to(dtype), ref, dtype)
    # double-reduced: the caller sums again on top of an already reduced output
    with pytest.raises(AssertionError, match="more than once"):
        check_combine_output((2 * ref).to(dtype), ref, dtype)
    # unreduced: the per-(token, k) outputs, not summed over top-k
    per_k = torch.stack([w[:, k:k + 1].double() * torch.stack(
        [affine_expert(int(ids[t, k]), x[t].double()) for t in range(x.shape[0])])
        for k in range(ids.shape[1])], dim=1)
    with pytest.raises(AssertionError, match="reduced"):
        check_combine_output(per_k.to(dtype), ref, dtype)
    # only one rank's partial sum (reduction across expert ranks missing)
    only_low = ids < 8
    partial = reference_combine(x, ids, w * only_low)
    with pytest.raises(AssertionError, match="missing"):
        check_combine_output(partial.to(dtype), ref, dtype)
    # weights never applied
    with pytest.raises(AssertionError):
        check_combine_output(reference_combine(x, ids, torch.ones_like(w)).to(dtype), ref, dtype)
    # weights applied twice
    with pytest.raises(AssertionError):
        check_combine_output(reference_combine(x, ids, w * w).to(dtype), ref, dtype)
    # unwritten rows (NaN poison) are caught
    bad = ref.clone()
    bad[3] = float("nan")
    with pytest.raises(AssertionError, match="non-finite"):
        check_combine_output(bad.to(dtype), ref, dtype)


@pytest.mark.parametrize("packed, align", [(False, 1), (True, 1), (True, 4)])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_local_steps_reproduce_reference_single_process(world, packed, align):
    """expand_to_experts + weighted_partial summed over ranks == dense reference (incl.
    repeats), in the padded and the packed layout (each expert's rows at its offset; segments
    rounded up to ``align`` rows)."""
    E, K, H, T = 16, 4, 8, 29
    x, ids, w = _case(T=T, E=E, K=K, H=H, seed=world)
    ids[::5, 1] = ids[::5, 0]                         # repeated ids inside a token
    y = torch.zeros(T, H, dtype=torch.float32)
    for r in range(world):
        cfg = EPConfig(r, world, E, K, H, T, torch.float32, torch.device("cpu"), packed, align)
        L = cfg.local_experts
        assert cfg.rows == (T * world * min(K, L) + L * (align - 1) if packed
                            else L * cfg.capacity)
        ex = torch.full((cfg.rows + 1, H), float("nan"))
        counts, slot = expand_to_experts(x, ids, cfg, ex)
        want = reference_dispatch([ids] + [ids[:0]] * (world - 1), E, r) if r == 0 else None
        if want is not None:
            assert counts.tolist() == [len(v) for v in want.values()]
        out = ex[:-1].view(cfg.expert_x_shape).clone()
        offs = packed_offsets(counts, align).tolist()
        seg = [-(-c // align) * align for c in counts.tolist()]
        assert offs[0] == 0 and offs[1:] == torch.cumsum(torch.tensor(seg), 0).tolist()
        assert offs[-1] <= cfg.rows
        for le in range(cfg.local_experts):
            c = int(counts[le])
            rows = out[offs[le]:offs[le] + c] if packed else out[le, :c]
            rows.copy_(affine_expert(r * cfg.local_experts + le, rows.double()).float())
        if packed:   # every valid row was written; a segment's padding never is
            want = torch.full((cfg.rows,), -1, dtype=torch.int32)
            for le in range(L):
                want[offs[le]:offs[le] + int(counts[le])] = le
            got = packed_row_experts(counts, packed_offsets(counts, align), cfg.rows)
            assert torch.equal(got, want), (got, want)
            valid = want >= 0
            assert not out[valid].isnan().any() and out[~valid].isnan().all()
        y += weighted_partial(out, slot, w)
    check_combine_output(y, reference_combine(x, ids, w), torch.float32)


def test_validate_config_errors():
    ok = dict(num_experts=16, top_k=2, hidden_size=8, max_tokens_per_rank=4,
              dtype=torch.float32, group_size=4, backend="auto")
    validate_config(**ok)
    with pytest.raises(ValueError, match="not divisible by the EP group size 4"):
        validate_config(**{**ok, "num_experts": 18})
    with pytest.raises(ValueError, match="1 <= top_k <= num_experts"):
        validate_config(**{**ok, "top_k": 0})
    with pytest.raises(ValueError, match="1 <= top_k"):
        validate_config(**{**ok, "top_k": 17})
    with pytest.raises(TypeError, match="must be an int"):
        validate_config(**{**ok, "top_k": 2.0})
    with pytest.raises(TypeError, match="dtype"):
        validate_config(**{**ok, "dtype": torch.int32})
    with pytest.raises(ValueError, match="backend"):
        validate_config(**{**ok, "backend": "nccl"})
    with pytest.raises(ValueError, match="max_tokens_per_rank"):
        validate_config(**{**ok, "max_tokens_per_rank": 0})
    validate_config(**{**ok, "packed": True, "packed_align": 128})
    with pytest.raises(TypeError, match="packed must be a bool"):
        validate_config(**{**ok, "packed": "yes"})
    with pytest.raises(ValueError, match="packed_align=4 applies to the packed layout only"):
        validate_config(**{**ok, "packed_align": 4})
    with pytest.raises(ValueError, match="packed_align must be >= 1"):
        validate_config(**{**ok, "packed": True, "packed_align": 0})
    with pytest.raises(TypeError, match="packed_align must be an int"):
        validate_config(**{**ok, "packed": True, "packed_align": 2.0})


def test_validate_dispatch_args_errors():
    kw = dict(top_k=2, hidden_size=8, num_experts=16, max_tokens=5, dtype=torch.float32,
              device=torch.device("cpu"))
    x, ids, w = torch.zeros(3, 8), torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2)
    validate_dispatch_args(x, ids, w, **kw)
    with pytest.raises(ValueError, match="max_tokens_per_rank=5"):
        validate_dispatch_args(torch.zeros(6, 8), torch.zeros(6, 2, dtype=torch.long),
                               torch.zeros(6, 2), **kw)
    with pytest.raises(ValueError, match=r"\[T, hidden_size=8\]"):
        validate_dispatch_args(torch.zeros(3, 7), ids, w, **kw)
    with pytest.raises(TypeError, match="integer"):
        validate_dispatch_args(x, ids.float(), w, **kw)
    with pytest.raises(TypeError, match="floating"):
        validate_dispatch_args(x, ids, ids, **kw)
    with pytest.raises(ValueError, match=r"\[T=3, top_k=2\]"):
        validate_dispatch_args(x, ids[:, :1], w, **kw)
    with pytest.raises(TypeError, match="torch.float32"):
        validate_dispatch_args(x.double(), ids, w, **kw)
    with pytest.raises(TypeError, match="torch.Tensor"):
        validate_dispatch_args(x, ids.tolist(), w, **kw)


def test_layout_group_size_mismatch_names_both_sizes():
    from llmcomm.layout import ParallelLayout

    layout = ParallelLayout(tp=2, dp=2)                 # EP = 4
    check_layout(layout, [0, 1, 2, 3], 4)
    with pytest.raises(ValueError, match=r"ep_size=4.*2 ranks"):
        check_layout(layout, [0, 2], 2)                 # the DP group: seed 002's bug
    with pytest.raises(ValueError, match="not an EP group"):
        check_layout(ParallelLayout(tp=2, pp=2), [0, 2], 2)   # right size, wrong ranks


def test_resolve_backend():
    one = TopologyFacts.simulated(2, num_nodes=1)
    two = TopologyFacts.simulated(4, num_nodes=2)
    cpu = TopologyFacts.simulated(2, device_type="cpu")
    assert resolve_ep_backend("auto", one, 7168).choice == "p2p"
    d = resolve_ep_backend("auto", two, 7168)
    assert d.choice == "torch" and "2 nodes" in str(d)
    assert resolve_ep_backend("auto", cpu, 64).choice == "torch"
    with pytest.raises(ValueError, match="spans 2 nodes"):
        resolve_ep_backend("p2p", two, 7168)
    from llmcomm.errors import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="cpu"):
        resolve_ep_backend("p2p", cpu, 64)
    assert resolve_ep_backend("allgather", two, 64).choice == "allgather"
    # an EP group of one rank (TP = DP = 1 on one GPU): nothing to exchange, torch's
    # collectives are local copies; p2p's kernels need a peer
    lone = TopologyFacts.simulated(1, num_nodes=1)
    d = resolve_ep_backend("auto", lone, 7168)
    assert d.choice == "torch" and "one rank has no peer" in str(d)
    with pytest.raises(BackendUnavailableError, match="one rank has no peer"):
        resolve_ep_backend("p2p", lone, 7168)


def test_row_experts_is_for_packed_dispatches_only():
    """A padded dispatch has no ``row_experts``: the error says where its rows are instead."""
    from llmcomm.moe.dispatcher import DispatchHandle, DispatchResult

    counts = torch.tensor([2, 0, 3], dtype=torch.int32)
    padded = DispatchResult(torch.zeros(3, 4, 8), counts, DispatchHandle(2, 1, None))
    with pytest.raises(ValueError, match=r"expert_x\[l, :counts\[l\]\]"):
        padded.row_experts()
    packed = DispatchResult(torch.zeros(7, 8), counts, DispatchHandle(2, 1, None),
                            packed_offsets(counts))
    assert packed.row_experts().tolist() == [0, 0, 2, 2, 2, -1, -1]
