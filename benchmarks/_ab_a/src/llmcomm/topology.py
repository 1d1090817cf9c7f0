"""Facts about a process group, gathered once and identical on every rank.

:func:`gather_topology` exchanges each rank's local facts (host identity, device, capability,
peer access) through :mod:`llmcomm.agree` and derives the group's facts from the gathered list
in the same way on every rank. :class:`TopologyFacts` is a plain frozen dataclass, so policy
tests build it directly (see :meth:`TopologyFacts.simulated`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .config import get_config

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TopologyFacts:
    """What the policy needs to know about one group.

    Attributes:
        world_size: ranks in the group.
        node_of_rank: node index (0..num_nodes-1, by first appearance) of each group rank.
        num_nodes: nodes spanned by *this group* (not the world).
        gpus_per_node: GPUs visible per node (min over ranks; 0 on CPU).
        device_type: "cuda" or "cpu" (the group's communication device).
        compute_capability: (major, minor), identical on every rank, else None.
        peer_access: every pair of ranks on one node can access each other's memory, and the
            group lies on one node. False on CPU.
        multicast_allowed: NVLink multicast may be used (never when it is disabled by env).
        multicast_reason: why (not).
        triton_available: triton imports on every rank.
        is_world: the group holds every rank of the job (matters to libraries that would
            otherwise rendezvous on WORLD).
    """

    world_size: int
    node_of_rank: tuple[int, ...]
    num_nodes: int
    gpus_per_node: int
    device_type: str
    compute_capability: tuple[int, int] | None
    peer_access: bool
    multicast_allowed: bool
    multicast_reason: str
    triton_available: bool
    is_world: bool = True

    @classmethod
    def simulated(cls, world_size: int, num_nodes: int = 1, device_type: str = "cuda",
                  compute_capability: tuple[int, int] | None = (9, 0),
                  peer_access: bool | None = None, multicast_allowed: bool = False,
                  triton_available: bool = True, is_world: bool = True) -> "TopologyFacts":
        """Facts for a layout without a job: ranks spread evenly over ``num_nodes`` nodes."""
        per_node = max(1, world_size // num_nodes)
        nodes = tuple(min(r // per_node, num_nodes - 1) for r in range(world_size))
        if peer_access is None:
            peer_access = device_type == "cuda" and num_nodes == 1
        return cls(world_size=world_size, node_of_rank=nodes, num_nodes=num_nodes,
                   gpus_per_node=per_node if device_type == "cuda" else 0,
                   device_type=device_type, compute_capability=compute_capability,
                   peer_access=peer_access, multicast_allowed=multicast_allowed,
                   multicast_reason="simulated", triton_available=triton_available,
                   is_world=is_world)

    def describe(self) -> str:
        cc = "n/a" if self.compute_capability is None else "sm_%d%d" % self.compute_capability
        return (f"{self.world_size} rank(s) on {self.num_nodes} node(s), device={self.device_type}, "
                f"gpus/node={self.gpus_per_node}, capability={cc}, peer_access={self.peer_access}, "
                f"multicast={'allowed' if self.multicast_allowed else 'off'} "
                f"({self.multicast_reason}), triton={'yes' if self.triton_available else 'no'}")


def local_facts(device: Any) -> dict[str, Any]:
    """This rank's own facts (no communication)."""
    import importlib.util

    import torch

    cfg = get_config()
    facts: dict[str, Any] = {"node": cfg.node_id, "device_type": device.type,
                             "triton": importlib.util.find_spec("triton") is not None,
                             "multicast_disabled_by": cfg.multicast_disabled_by}
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        n = torch.cuda.device_count()
        facts.update(device_index=idx, device_count=n,
                     capability=tuple(torch.cuda.get_device_capability(idx)),
                     can_access={j: (j == idx or torch.cuda.can_device_access_peer(idx, j))
                                 for j in range(n)})
    else:
        facts.update(device_index=None, device_count=0, capability=None, can_access={})
    return facts


def derive_facts(per_rank: list[dict[str, Any]], is_world: bool = True) -> TopologyFacts:
    """Group facts from the gathered per-rank facts (pure; identical on every rank)."""
    order: dict[str, int] = {}
    for f in per_rank:
        order.setdefault(f["node"], len(order))
    nodes = tuple(order[f["node"]] for f in per_rank)
    device_types = {f["device_type"] for f in per_rank}
    device_type = device_types.pop() if len(device_types) == 1 else "mixed"
    caps = {f["capability"] for f in per_rank}
    capability = caps.pop() if len(caps) == 1 else None
    peer = device_type == "cuda" and len(order) == 1
    if peer:
        for f in per_rank:
            for g in per_rank:
                if not f["can_access"].get(g["device_index"], False):
                    peer = False
    disabled = sorted({d for f in per_rank for d in f["multicast_disabled_by"]})
    if device_type != "cuda":
        mc, why = False, "no CUDA devices"
    elif disabled:
        mc, why = False, "disabled by " + ", ".join(disabled)
    else:
        # llmcomm never creates multicast objects itself; a backend that wants multicast
        # (FlashInfer MNNVL) checks fabric support when it creates its workspace.
        mc, why = True, "not disabled by environment"
    return TopologyFacts(
        world_size=len(per_rank), node_of_rank=nodes, num_nodes=len(order),
        gpus_per_node=min(f["device_count"] for f in per_rank),
        device_type=device_type, compute_capability=capability, peer_access=peer,
        multicast_allowed=mc, multicast_reason=why,
        triton_available=all(f["triton"] for f in per_rank), is_world=is_world)


def gather_topology(group: Any, device: Any) -> TopologyFacts:
    """Collective over ``group`` (with a deadline): the group's :class:`TopologyFacts`."""
    import torch.distributed as dist

    from .agree import exchange

    per_rank = exchange(local_facts(device), group, "topology")
    facts = derive_facts(per_rank, is_world=len(per_rank) == dist.get_world_size())
    logger.debug("topology: %s", facts.describe())
    return facts
