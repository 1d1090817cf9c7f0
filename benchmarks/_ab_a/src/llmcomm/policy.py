"""Pure decision functions: facts in, :class:`Decision` out. No torch.distributed here.

Every rank computes the same decision from the same (agreed) facts, so backends and launch
parameters never diverge across ranks. Each function explains itself in ``Decision.reasons``.

Rules (each has a test in ``tests/unit/test_policy.py``):

1. ``auto`` picks by topology: one node with peer access between all GPUs -> ``p2p``;
   otherwise ``flashinfer`` when usable, else ``torch`` (NCCL spans nodes).
2. The node count that counts is the *group's* (TP inside a node with DP across nodes is
   single-node for TP).
3. An explicit single-node backend (``p2p``; ``flashinfer`` trtllm without multicast) on a
   multi-node group is a ValueError naming the node count and the backends that would work.
4. Fusion that needs identical launches on every TP peer: ``p2p`` guarantees it by construction
   (launch parameters are a pure function of shape, dtype, world size and version, and a
   fingerprint is agreed at creation), so it stays on under PP > 1; FlashInfer cannot, so its
   fusion is off under PP > 1 (the allreduce runs in FlashInfer, add+norm in llmcomm's epilogue).
5. Where a backend cannot quantise across nodes (FlashInfer MNNVL), the fused allreduce is kept
   and FP8 quantisation runs in llmcomm's epilogue instead of dropping fusion.
6. The one-shot / two-shot / Lamport strategy is a pure function of message bytes and world size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .topology import TopologyFacts

ALLREDUCE_BACKENDS = ("torch", "p2p", "flashinfer")
REQUESTS = ("auto",) + ALLREDUCE_BACKENDS


@dataclass(frozen=True)
class Decision:
    """A choice and the reasons for it, in the order they were considered."""

    choice: str
    reasons: tuple[str, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        why = "; ".join(self.reasons)
        return f"{self.choice} ({why})" if why else self.choice


# --------------------------------------------------------------------------- backend registry

@dataclass(frozen=True)
class BackendSpec:
    """A registered allreduce backend and the predicate that says whether it can serve a group.

    ``check(facts, fi_caps, hidden_size)`` returns None when usable, else the reason it is not.
    ``single_node``: the backend cannot span nodes (explicit use on several nodes is an error).
    """

    name: str
    single_node: bool
    description: str
    check: Callable[[TopologyFacts, Any, int | None], str | None]


def _check_torch(facts: TopologyFacts, fi_caps: Any, hidden_size: int | None) -> str | None:
    return None


def _check_p2p(facts: TopologyFacts, fi_caps: Any, hidden_size: int | None) -> str | None:
    if facts.device_type != "cuda":
        return f"needs CUDA devices, the group is on {facts.device_type}"
    if facts.num_nodes > 1:
        return f"works within one node, the group spans {facts.num_nodes} nodes"
    if not facts.peer_access:
        return "not every pair of GPUs in the group has peer access"
    if not facts.triton_available:
        return "triton is not importable on every rank"
    if facts.compute_capability is None or facts.compute_capability < (8, 0):
        return (f"needs compute capability >= 8.0 on every rank, got "
                f"{facts.compute_capability or 'mixed/unknown'}")
    if hidden_size is not None and hidden_size % 8:
        return f"needs hidden_size % 8 == 0, got {hidden_size}"
    return None


def flashinfer_variant(num_nodes: int, multicast_allowed: bool, has_mnnvl: bool | None,
                       requested: str = "auto") -> Decision:
    """FlashInfer workspace kind: ``trtllm`` on one node, ``mnnvl`` across nodes with multicast.

    ``requested`` is "auto", "trtllm" or "mnnvl". Raises ValueError for explicit trtllm on several
    nodes. Returns choice "none" when no variant can serve.
    """
    if requested not in ("auto", "trtllm", "mnnvl"):
        raise ValueError(f"FlashInfer variant must be 'auto', 'trtllm' or 'mnnvl', got {requested!r}")
    if num_nodes > 1:
        if requested == "trtllm":
            raise ValueError(
                f"FlashInfer 'trtllm' uses CUDA IPC and works within one node, but this group "
                f"spans {num_nodes} nodes; use 'mnnvl' (needs multicast) or the 'torch' backend")
        if not multicast_allowed:
            return Decision("none", (f"{num_nodes} nodes need FlashInfer mnnvl, which needs "
                                     f"NVLink multicast, and multicast is off",))
        if has_mnnvl is not True:
            return Decision("none", (f"{num_nodes} nodes need FlashInfer mnnvl, which this "
                                     f"FlashInfer build does not provide (or it is unknown)",))
        return Decision("mnnvl", (f"{num_nodes} nodes: mnnvl spans nodes over the NVLink fabric",))
    if requested == "mnnvl":
        if not multicast_allowed:
            return Decision("none", ("mnnvl was requested but NVLink multicast is off",))
        return Decision("mnnvl", ("requested explicitly",))
    return Decision("trtllm", ("one node: trtllm (CUDA IPC, no multicast needed)",))


def _check_flashinfer(facts: TopologyFacts, fi_caps: Any, hidden_size: int | None) -> str | None:
    if fi_caps is None:
        return "FlashInfer was not probed"
    if not getattr(fi_caps, "available", False):
        return f"FlashInfer unavailable: {getattr(fi_caps, 'reason', 'unknown')}"
    if not getattr(fi_caps, "agreed", True):
        return f"ranks disagree on FlashInfer: {getattr(fi_caps, 'reason', '')}"
    if facts.device_type != "cuda":
        return f"needs CUDA devices, the group is on {facts.device_type}"
    variant = flashinfer_variant(facts.num_nodes, facts.multicast_allowed,
                                 getattr(fi_caps, "has_mnnvl", None))
    if variant.choice == "none":
        return variant.reasons[0]
    if variant.choice == "trtllm" and facts.world_size not in (2, 4, 8, 16):
        return f"FlashInfer trtllm supports 2, 4, 8 or 16 ranks, the group has {facts.world_size}"
    if hasattr(fi_caps, "accepts"):  # a real probe result: the backend's own pre-checks
        from .allreduce.flashinfer import why_not_flashinfer

        return why_not_flashinfer(fi_caps, variant=variant.choice, world_size=facts.world_size,
                                  group_is_world=facts.is_world, hidden_size=hidden_size)
    return None


BACKENDS: dict[str, BackendSpec] = {
    "p2p": BackendSpec("p2p", True, "llmcomm Triton kernels over NVLink peer memory", _check_p2p),
    "flashinfer": BackendSpec("flashinfer", False,
                              "FlashInfer allreduce fusion (trtllm in a node, mnnvl across)",
                              _check_flashinfer),
    "torch": BackendSpec("torch", False, "torch.distributed all_reduce (NCCL/gloo) + llmcomm "
                                         "epilogue", _check_torch),
}
AUTO_ORDER = ("p2p", "flashinfer", "torch")


def backend_availability(facts: TopologyFacts, fi_caps: Any = None,
                         hidden_size: int | None = None) -> dict[str, str | None]:
    """Every registered backend -> None (usable) or the reason it is not."""
    return {name: BACKENDS[name].check(facts, fi_caps, hidden_size) for name in AUTO_ORDER}


def resolve_allreduce_backend(requested: str, facts: TopologyFacts, fi_caps: Any = None,
                              pp_size: int = 1, hidden_size: int | None = None) -> Decision:
    """Which backend serves a TP group.

    Raises ValueError for an unknown name or a single-node backend on a multi-node group, and
    :class:`~llmcomm.errors.BackendUnavailableError` when an explicit backend cannot run here.
    """
    from .errors import BackendUnavailableError

    if requested not in REQUESTS:
        raise ValueError(f"backend must be one of {', '.join(REQUESTS)}; got {requested!r}")
    avail = backend_availability(facts, fi_caps, hidden_size)
    usable = [n for n in AUTO_ORDER if avail[n] is None]
    node_note = (f"group spans {facts.num_nodes} node(s)"
                 + (" (the group's node count, not the world's)" if facts.num_nodes == 1 else ""))
    if requested != "auto":
        spec = BACKENDS[requested]
        why = avail[requested]
        if why is not None:
            if facts.num_nodes > 1 and (spec.single_node or requested == "flashinfer"):
                raise ValueError(
                    f"backend {requested!r} cannot serve this TP group: it spans "
                    f"{facts.num_nodes} nodes ({why}). Backends that work here: "
                    f"{', '.join(usable)}; or use backend='auto'")
            raise BackendUnavailableError(
                f"backend {requested!r} is unavailable: {why}. Usable here: {', '.join(usable)}; "
                f"use backend='auto' to pick one")
        return Decision(requested, ("requested explicitly", node_note),
                        {"availability": avail})
    reasons = [node_note]
    for name in AUTO_ORDER:
        why = avail[name]
        if why is None and name == "flashinfer" and pp_size > 1:
            why = ("PP > 1: FlashInfer cannot guarantee identical launches on all TP peers "
                   "during concurrent warm-up (vLLM PR #43616)")
        if why is None:
            reasons.append(f"{name}: usable")
            return Decision(name, tuple(reasons), {"availability": avail})
        reasons.append(f"{name}: {why}")
    raise AssertionError("unreachable: the torch backend is always usable")  # pragma: no cover


def allreduce_fusion_decision(backend: str, facts: TopologyFacts, pp_size: int = 1,
                              fi_caps: Any = None, quant: bool = False) -> Decision:
    """How allreduce + residual + RMSNorm (+FP8) runs for a resolved backend.

    Choices: ``fused`` (one kernel), ``fused+epilogue-quant`` (fused allreduce+norm, FP8 in
    llmcomm's epilogue), ``epilogue`` (allreduce, then llmcomm's one-kernel add+norm epilogue).
    """
    if backend == "p2p":
        return Decision("fused", (
            "p2p kernels fuse allreduce + add + norm" + (" + FP8" if quant else ""),
            "launches agree by construction (fingerprint checked at creation), so fusion stays "
            f"on with PP={pp_size}"))
    if backend == "torch":
        return Decision("epilogue", (
            "torch backend: NCCL/gloo allreduce, then add + norm"
            + (" + FP8" if quant else "") + " in llmcomm's epilogue (one Triton kernel on GPU)",))
    if backend == "flashinfer":
        if pp_size > 1:
            return Decision("epilogue", (
                f"FlashInfer fusion off with PP={pp_size}: its fused kernel needs identical "
                "launch configs on all TP peers, which concurrent PP warm-up can break "
                "(deadlock, vLLM PR #43616); FlashInfer allreduce + llmcomm epilogue instead",))
        patterns = tuple(getattr(fi_caps, "patterns", ()) or ())
        if patterns and "kARResidualRMSNorm" not in patterns:
            return Decision("epilogue", ("this FlashInfer build lacks pattern kARResidualRMSNorm; "
                                         "FlashInfer allreduce + llmcomm epilogue instead",))
        # our fp8 op also returns the normed output: FlashInfer's "Out" FP8 pattern
        fp8_pattern = "kARResidualRMSNormOutFP8Quant"
        variant = flashinfer_variant(facts.num_nodes, facts.multicast_allowed,
                                     getattr(fi_caps, "has_mnnvl", None)).choice
        if quant and (variant == "mnnvl" or (patterns and fp8_pattern not in patterns)):
            why = (f"{facts.num_nodes} node(s) use FlashInfer mnnvl, which cannot quantise in its "
                   "fused kernel" if variant == "mnnvl" else
                   f"this FlashInfer build lacks pattern {fp8_pattern}")
            return Decision("fused+epilogue-quant", (
                why + "; the fused allreduce + norm is kept and FP8 runs in llmcomm's epilogue",))
        return Decision("fused", ("FlashInfer fused allreduce + residual + RMSNorm"
                                  + (" + FP8" if quant else ""),))
    raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(ALLREDUCE_BACKENDS)}")


# --------------------------------------------------------------------------- kernel strategy

#: world_size -> (largest message for the Lamport push, largest for one-shot), in bytes per rank.
#: W=2 tuned on 2 x H200, W=4 measured on 4 x H200 (docs/kernels.md); W=8 is a guess. Other
#: world sizes use the entry for the next larger listed size, or the last entry.
STRATEGY_THRESHOLDS: dict[int, tuple[int, int]] = {
    2: (32 * 1024 * 1024, 32 * 1024 * 1024),   # Lamport (pipelined rows) beats both up to 32 MiB
    # 4 x H200, 2026-11-22: two-shot beats one-shot from 2 MiB (21.5 vs 29.4 us at 4096 x 256
    # bf16); at 1 MiB one-shot is ahead or even. Lamport beats one-shot up to 256 KiB, the
    # largest size timed (8.6 vs 9.2 us at 8192 x 16); larger Lamport sizes are untimed at W=4.
    4: (256 * 1024, 1024 * 1024),
    8: (128 * 1024, 1024 * 1024),
}


def allreduce_strategy(num_bytes: int, world_size: int) -> Decision:
    """``lamport``, ``oneshot`` or ``twoshot`` for a message of ``num_bytes`` per rank."""
    if num_bytes < 0 or world_size < 1:
        raise ValueError(f"need num_bytes >= 0 and world_size >= 1, got {num_bytes}, {world_size}")
    sizes = sorted(STRATEGY_THRESHOLDS)
    key = next((s for s in sizes if s >= world_size), sizes[-1])
    lamport_max, oneshot_max = STRATEGY_THRESHOLDS[key]
    if num_bytes <= lamport_max:
        return Decision("lamport", (f"{num_bytes} B <= {lamport_max} B (W={world_size})",))
    if num_bytes <= oneshot_max:
        return Decision("oneshot", (f"{lamport_max} B < {num_bytes} B <= {oneshot_max} B",))
    return Decision("twoshot", (f"{num_bytes} B > {oneshot_max} B",))


# --------------------------------------------------------------------------- MoE p2p protocol

#: The p2p EP backend runs ``protocol="lamport"`` by default up to this many tokens per rank
#: (``max_tokens_per_rank``, i.e. a decode dispatcher) at EP=2. Measured on 2 x H200, top-8
#: (docs/moe.md), dispatch + combine at 1 / 8 / 64 / 128 tokens: hidden 7168, 256 experts, sweep:
#: lamport (shift 0) 17.3 / 18.1 / 21.7 / 27.1 us vs flags 19.6 / 19.9 / 25.2 / 29.9; ladder: 19.5 /
#: 18.6 / 21.4 / 27.9 vs 18.1 / 19.8 / 25.9 / 31.4 (one token the exception); hidden 4096, 128
#: experts: 14.6 / 15.6 / 16.6 / 20.2 vs 17.1 / 17.7 / 20.2 / 22.5. At 4096 tokens flags is ahead
#: (559 vs 608 us). The flags kernels gained 1.4-1.6 us at one token after these runs; re-timed in
#: session 5 at hidden 7168 (two runs, M = 128, 1 / 8 / 64 / 128 tokens): lamport 18.5 / 19.2 / 22.4
#: / 28.1 vs flags 17.9 / 18.9 / 22.5 / 27.9, and 17.9 / 19.2 / 21.8 / 26.4 vs 18.0 / 19.9 / 22.6 /
#: 28.0 -- a tie within run-to-run noise (the sign flips), so lamport stays (ahead by ~1.5 us at
#: hidden 4096 in session 4; hidden 4096 not re-timed against the improved flags).
LAMPORT_EP_MAX_TOKENS = 128
#: EP sizes where lamport was measured faster; others keep flags until measured.
LAMPORT_EP_WORLD_SIZES = (2,)


def ep_p2p_protocol(world_size: int, max_tokens_per_rank: int, itemsize: int) -> Decision:
    """``"lamport"`` or ``"flags"`` for a p2p EP dispatcher (pure; equal on every rank).

    Lamport (the data signals its own arrival, no flag round trip) is the faster protocol for
    small batches; it keeps three sentinel-initialised copies of the receive buffers, so its
    workspace is about 3x that of flags, and it needs a 16-, 32- or 64-bit dtype.
    """
    if world_size < 1 or max_tokens_per_rank < 1 or itemsize < 1:
        raise ValueError(f"need world_size, max_tokens_per_rank, itemsize >= 1, got "
                         f"{world_size}, {max_tokens_per_rank}, {itemsize}")
    if itemsize not in (2, 4, 8):
        return Decision("flags", (f"lamport needs a 16/32/64-bit dtype, got {8 * itemsize}-bit",))
    if world_size not in LAMPORT_EP_WORLD_SIZES:
        return Decision("flags", (f"lamport is measured faster only at EP in "
                                  f"{LAMPORT_EP_WORLD_SIZES}, the group has {world_size} ranks",))
    if max_tokens_per_rank > LAMPORT_EP_MAX_TOKENS:
        return Decision("flags", (f"max_tokens_per_rank {max_tokens_per_rank} > "
                                  f"{LAMPORT_EP_MAX_TOKENS}: flags (smaller workspace, faster "
                                  f"at large batches)",))
    return Decision("lamport", (f"max_tokens_per_rank {max_tokens_per_rank} <= "
                                f"{LAMPORT_EP_MAX_TOKENS} at EP={world_size}: lamport (no flag "
                                f"round trip; about 3x the workspace of flags)",))
