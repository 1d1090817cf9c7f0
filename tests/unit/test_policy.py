"""Every rule of llmcomm.policy, including the seed scenarios."""

from types import SimpleNamespace

import pytest

from llmcomm import ParallelLayout, policy
from llmcomm.errors import BackendUnavailableError
from llmcomm.topology import TopologyFacts, derive_facts

FI_OK = SimpleNamespace(available=True, agreed=True, reason="", has_mnnvl=True,
                        patterns=("kAllReduce", "kARResidualRMSNorm", "kARResidualRMSNormFP8Quant"))


def _rank(node, idx, n=8, cc=(9, 0), disabled=()):
    return {"node": node, "device_type": "cuda", "triton": True, "device_index": idx,
            "device_count": n, "capability": cc, "can_access": {j: True for j in range(n)},
            "multicast_disabled_by": tuple(disabled)}


# rule 1: auto picks by topology
def test_auto_single_node_peer_access_picks_p2p():
    d = policy.resolve_allreduce_backend("auto", TopologyFacts.simulated(4))
    assert d.choice == "p2p"
    assert any("p2p: usable" in r for r in d.reasons)


def test_auto_multi_node_picks_spanning_backend():
    facts = TopologyFacts.simulated(4, num_nodes=2)
    assert policy.resolve_allreduce_backend("auto", facts).choice == "torch"
    mc = TopologyFacts.simulated(4, num_nodes=2, multicast_allowed=True)
    assert policy.resolve_allreduce_backend("auto", mc, FI_OK).choice == "flashinfer"


def test_auto_on_cpu_is_torch_with_reason():
    d = policy.resolve_allreduce_backend("auto", TopologyFacts.simulated(2, device_type="cpu"))
    assert d.choice == "torch"
    assert any("needs CUDA" in r for r in d.reasons)


def test_auto_without_peer_access_or_triton():
    assert policy.resolve_allreduce_backend(
        "auto", TopologyFacts.simulated(2, peer_access=False)).choice == "torch"
    assert policy.resolve_allreduce_backend(
        "auto", TopologyFacts.simulated(2, triton_available=False)).choice == "torch"
    d = policy.resolve_allreduce_backend("auto", TopologyFacts.simulated(2), hidden_size=4100)
    assert d.choice == "torch" and any("% 8" in r for r in d.reasons)


# rule 2: the group's node count counts (seed: TP inside a node, DP across nodes)
def test_tp_inside_node_dp_across_nodes_is_single_node_for_tp():
    layout = ParallelLayout(tp=2, dp=2)
    node_of_world_rank = {0: "a", 1: "a", 2: "b", 3: "b"}  # two nodes in the world
    for tp_group in layout.tp_groups():
        facts = derive_facts([_rank(node_of_world_rank[r], r % 2) for r in tp_group])
        assert facts.num_nodes == 1
        d = policy.resolve_allreduce_backend("p2p", facts)  # no error: single node for TP
        assert d.choice == "p2p"
    # while the DP / EP group does span both nodes
    ep = layout.ep_groups()[0]
    assert derive_facts([_rank(node_of_world_rank[r], r % 2) for r in ep]).num_nodes == 2


# rule 3: explicit single-node backend on a multi-node group
def test_explicit_p2p_on_two_nodes_names_node_count_and_alternatives():
    facts = derive_facts([_rank("a", 0), _rank("a", 1), _rank("b", 0), _rank("b", 1)])
    with pytest.raises(ValueError, match=r"spans 2 nodes.*Backends that work here: torch"):
        policy.resolve_allreduce_backend("p2p", facts)


def test_explicit_flashinfer_trtllm_on_two_nodes_without_multicast():
    facts = TopologyFacts.simulated(4, num_nodes=2, multicast_allowed=False)
    with pytest.raises(ValueError, match="spans 2 nodes"):
        policy.resolve_allreduce_backend("flashinfer", facts, FI_OK)
    with pytest.raises(ValueError, match="2 nodes"):
        policy.flashinfer_variant(2, True, True, requested="trtllm")


def test_flashinfer_variant_rules():
    assert policy.flashinfer_variant(1, False, None).choice == "trtllm"
    assert policy.flashinfer_variant(2, True, True).choice == "mnnvl"
    assert policy.flashinfer_variant(2, False, True).choice == "none"
    assert policy.flashinfer_variant(2, True, None).choice == "none"  # unknown -> not used


def test_explicit_unavailable_backend_on_one_node_is_environment_error():
    with pytest.raises(BackendUnavailableError, match="peer access"):
        policy.resolve_allreduce_backend("p2p", TopologyFacts.simulated(2, peer_access=False))
    with pytest.raises(BackendUnavailableError, match="FlashInfer"):
        policy.resolve_allreduce_backend("flashinfer", TopologyFacts.simulated(2))


def test_unknown_backend():
    with pytest.raises(ValueError, match="one of auto, torch, p2p, flashinfer"):
        policy.resolve_allreduce_backend("nccl", TopologyFacts.simulated(2))


# rule 4: fusion under PP > 1 (seed: PP=2 x TP=2 deadlock)
def test_pp2_tp2_p2p_keeps_fusion_because_launches_agree():
    facts = TopologyFacts.simulated(2)
    d = policy.allreduce_fusion_decision("p2p", facts, pp_size=2)
    assert d.choice == "fused"
    assert any("agree by construction" in r for r in d.reasons)


def test_pp2_flashinfer_fusion_off_with_reason_and_auto_skips_it():
    facts = TopologyFacts.simulated(2, peer_access=False)  # p2p out, FlashInfer usable
    d = policy.allreduce_fusion_decision("flashinfer", facts, pp_size=2, fi_caps=FI_OK)
    assert d.choice == "epilogue" and "PP=2" in d.reasons[0]
    assert policy.resolve_allreduce_backend("auto", facts, FI_OK, pp_size=1).choice == "flashinfer"
    auto_pp2 = policy.resolve_allreduce_backend("auto", facts, FI_OK, pp_size=2)
    assert auto_pp2.choice == "torch"
    assert any("PP > 1" in r for r in auto_pp2.reasons)


# rule 5: multi-node quant fusion keeps the fused allreduce, quantises in the epilogue
def test_multinode_quant_keeps_fusion_quantises_in_epilogue():
    facts = TopologyFacts.simulated(4, num_nodes=2, multicast_allowed=True)
    d = policy.allreduce_fusion_decision("flashinfer", facts, fi_caps=FI_OK, quant=True)
    assert d.choice == "fused+epilogue-quant"
    assert policy.allreduce_fusion_decision("flashinfer", facts, fi_caps=FI_OK).choice == "fused"


def test_missing_pattern_is_reported_not_silent():
    caps = SimpleNamespace(**{**vars(FI_OK), "patterns": ("kAllReduce",)})
    d = policy.allreduce_fusion_decision("flashinfer", TopologyFacts.simulated(2), fi_caps=caps)
    assert d.choice == "epilogue" and "lacks pattern" in d.reasons[0]


# rule 6: strategy is a pure function of size and world size
def test_strategy_by_size():
    for w, (lam, one) in policy.STRATEGY_THRESHOLDS.items():
        assert lam <= one, "thresholds must be ordered"
        assert policy.allreduce_strategy(1, w).choice == "lamport"
        assert policy.allreduce_strategy(lam, w).choice == "lamport"
        assert policy.allreduce_strategy(lam + 1, w).choice == ("oneshot" if lam < one
                                                                else "twoshot")
        assert policy.allreduce_strategy(one + 1, w).choice == "twoshot"
    # unlisted world sizes use the next larger listed entry, then the last
    lam4, _ = policy.STRATEGY_THRESHOLDS[4]
    assert policy.allreduce_strategy(lam4 + 1, 3) == policy.allreduce_strategy(lam4 + 1, 4)
    lam8, _ = policy.STRATEGY_THRESHOLDS[8]
    assert policy.allreduce_strategy(lam8, 16).choice == "lamport"
    assert policy.allreduce_strategy(lam8 + 1, 16) == policy.allreduce_strategy(lam8 + 1, 8)
    with pytest.raises(ValueError):
        policy.allreduce_strategy(-1, 2)


def test_multicast_never_allowed_when_env_disables_it():
    facts = derive_facts([_rank("a", 0, disabled=("NCCL_NVLS_ENABLE=0",)), _rank("a", 1)])
    assert not facts.multicast_allowed and "NCCL_NVLS_ENABLE=0" in facts.multicast_reason
    assert derive_facts([_rank("a", 0), _rank("a", 1)]).multicast_allowed


def test_peer_access_requires_every_pair():
    a, b = _rank("a", 0), _rank("a", 1)
    b["can_access"] = {0: False, 1: True}
    assert not derive_facts([a, b]).peer_access
    assert derive_facts([_rank("a", 0), _rank("a", 1)]).peer_access


def test_decisions_are_deterministic():
    facts = TopologyFacts.simulated(8)
    assert policy.resolve_allreduce_backend("auto", facts) == \
        policy.resolve_allreduce_backend("auto", facts)


def test_ep_p2p_protocol_lamport_only_for_small_dispatchers_where_measured():
    small = policy.LAMPORT_EP_MAX_TOKENS
    d = policy.ep_p2p_protocol(2, small, 2)
    assert d.choice == "lamport" and f"<= {small} at EP=2" in str(d)
    assert policy.ep_p2p_protocol(2, 1, 4).choice == "lamport"
    big = policy.ep_p2p_protocol(2, small + 1, 2)
    assert big.choice == "flags" and f"max_tokens_per_rank {small + 1} > {small}" in str(big)
    unmeasured = policy.ep_p2p_protocol(4, 8, 2)
    assert unmeasured.choice == "flags" and "the group has 4 ranks" in str(unmeasured)
    odd = policy.ep_p2p_protocol(2, 8, 1)
    assert odd.choice == "flags" and "16/32/64-bit" in str(odd)
    with pytest.raises(ValueError, match="max_tokens_per_rank"):
        policy.ep_p2p_protocol(2, 0, 2)
