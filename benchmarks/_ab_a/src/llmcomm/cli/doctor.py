"""``llmcomm doctor``: versions, topology facts, every backend with its availability and reason,
and the decisions for a layout. Works on a CPU machine and under torchrun.

Without torchrun the facts are this machine's (``--simulate-gpus N`` pretends N GPUs with peer
access, ``--nodes`` spreads the world over several nodes). Under torchrun every rank gathers the
real facts of its TP group and rank 0 prints them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("doctor", help="explain what llmcomm would choose here, and why")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: world)")
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--pcp", type=int, default=1)
    p.add_argument("--nodes", type=int, default=1, help="nodes the world spans (simulated)")
    p.add_argument("--hidden", type=int, default=8192)
    p.add_argument("--simulate-gpus", type=int, default=None, metavar="N",
                   help="pretend each node has N GPUs with full peer access (sm_90)")
    p.add_argument("--flashinfer", choices=["probe", "current", "old", "signatureless", "absent"],
                   default="probe", help="probe the installed FlashInfer, or assume a kind of build")
    p.set_defaults(func=run)


def _version(dist_name: str) -> str:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _versions() -> list[tuple[str, str]]:
    import torch

    import llmcomm

    rows = [("llmcomm", llmcomm.__version__), ("python", platform.python_version()),
            ("torch", torch.__version__), ("triton", _version("triton")),
            ("flashinfer", _version("flashinfer-python")),
            ("cuda", str(torch.version.cuda)),
            ("gpus", str(torch.cuda.device_count() if torch.cuda.is_available() else 0))]
    if torch.cuda.is_available():
        try:
            rows.append(("nccl", ".".join(map(str, torch.cuda.nccl.version()))))
        except Exception as e:  # noqa: BLE001
            rows.append(("nccl", f"unknown ({e})"))
    return rows


_PATTERNS = ("kAllReduce", "kARResidualRMSNorm", "kARResidualRMSNormFP8Quant",
             "kARResidualRMSNormFP4Quant", "kARResidualRMSNormOutFP8Quant",
             "kARResidualRMSNormOutFP4Quant")
_WS = ("backend", "world_size", "rank", "max_token_num", "hidden_dim", "dtype")
_FUSION = ("input", "workspace", "pattern", "launch_with_pdl", "output", "residual_in",
           "residual_out", "norm_out", "quant_out", "scale_out", "rms_gamma", "rms_eps",
           "scale_factor", "use_oneshot", "fp32_acc")


def _assumed_caps(kind: str) -> Any:
    """Capabilities of a kind of FlashInfer build, for seeing its decisions without it."""
    from ..probe import FlashInferCapabilities, unavailable

    if kind == "absent":
        return unavailable("assumed absent (--flashinfer absent)")
    if kind == "old":  # before the group= / comm_backend= keywords (e.g. 0.5.3)
        return FlashInferCapabilities(
            available=True, version="0.5.3", reason="assumed old build: no group=, no "
            "comm_backend=, no trigger_completion_at_end=", has_allreduce_fusion=True,
            workspace_accepts_group=False, workspace_accepts_comm_backend=False,
            fusion_accepts_trigger_completion=False, patterns=_PATTERNS, has_mnnvl=False,
            workspace_params=_WS, fusion_params=_FUSION)
    if kind == "signatureless":  # builtins whose inspect.signature raises
        return FlashInferCapabilities(
            available=True, version="0.6.8", reason="assumed build without signature metadata: "
            "optional keywords unknown, so not passed", has_allreduce_fusion=True,
            workspace_accepts_group=None, workspace_accepts_comm_backend=None,
            fusion_accepts_trigger_completion=None, patterns=_PATTERNS, has_mnnvl=None)
    return FlashInferCapabilities(
        available=True, version="0.6.13", reason="assumed current build", has_allreduce_fusion=True,
        workspace_accepts_group=True, workspace_accepts_comm_backend=True,
        fusion_accepts_trigger_completion=True, patterns=_PATTERNS, has_mnnvl=True,
        workspace_params=_WS + ("comm_backend", "group", "gpus_per_node"),
        fusion_params=_FUSION + ("trigger_completion_at_end",))


def _local_facts(layout: Any, nodes: int, simulate: int | None) -> Any:
    import torch

    from ..topology import TopologyFacts

    tp = layout.tp
    per_node = max(1, layout.world_size // max(1, nodes))
    tp_nodes = max(1, -(-tp // per_node))
    from ..config import get_config

    mc = not get_config().multicast_disabled
    is_world = tp == layout.world_size
    if simulate is not None:
        return TopologyFacts.simulated(tp, num_nodes=tp_nodes, device_type="cuda",
                                       multicast_allowed=mc, is_world=is_world)
    if torch.cuda.is_available() and torch.cuda.device_count() >= min(tp, per_node):
        n = min(tp, torch.cuda.device_count())
        peer = all(i == j or torch.cuda.can_device_access_peer(i, j)
                   for i in range(n) for j in range(n))
        cc = tuple(torch.cuda.get_device_capability(0))
        return TopologyFacts.simulated(tp, num_nodes=tp_nodes, device_type="cuda",
                                       compute_capability=cc, peer_access=peer and tp_nodes == 1,
                                       multicast_allowed=mc, is_world=is_world,
                                       triton_available=importlib.util.find_spec("triton")
                                       is not None)
    return TopologyFacts.simulated(tp, num_nodes=tp_nodes, device_type="cpu",
                                   compute_capability=None, is_world=is_world,
                                   triton_available=importlib.util.find_spec("triton") is not None)


def _compile_support() -> str:
    from .. import ops

    return ops.describe()


def report(layout: Any, facts: Any, fi_caps: Any, hidden: int) -> str:
    """The doctor's text for a layout's TP group (pure: facts in, text out)."""
    from .. import policy
    from ..config import get_config

    cfg = get_config()
    lines = [f"layout: tp={layout.tp} pp={layout.pp} dp={layout.dp} pcp={layout.pcp} "
             f"(world {layout.world_size}, ep {layout.ep_size})",
             f"  tp groups: {layout.tp_groups()}", f"  ep groups: {layout.ep_groups()}",
             f"topology of the TP group: {facts.describe()}",
             f"env: LLMCOMM_TIMEOUT_S={cfg.timeout_s:g} LLMCOMM_CHECK={int(cfg.check)} "
             f"multicast disabled by: {', '.join(cfg.multicast_disabled_by) or 'nothing'}",
             f"flashinfer: {fi_caps.summary()}", f"  ({fi_caps.reason})",
             f"torch.compile: {_compile_support()}",
             "backends:"]
    for name, why in policy.backend_availability(facts, fi_caps, hidden).items():
        lines.append(f"  {name:<10} {'available' if why is None else 'unavailable'}"
                     + ("" if why is None else f": {why}"))
    lines.append("decisions:")
    for req in policy.REQUESTS:
        try:
            d = policy.resolve_allreduce_backend(req, facts, fi_caps, pp_size=layout.pp,
                                                 hidden_size=hidden)
        except Exception as e:  # noqa: BLE001 - the doctor shows the error a user would get
            lines.append(f"  backend={req:<10} -> {type(e).__name__}: {e}")
            continue
        fus = policy.allreduce_fusion_decision(d.choice, facts, layout.pp, fi_caps)
        fq = policy.allreduce_fusion_decision(d.choice, facts, layout.pp, fi_caps, quant=True)
        lines.append(f"  backend={req:<10} -> {d.choice}: {'; '.join(d.reasons)}")
        lines.append(f"      fusion: {fus}")
        if fq.choice != fus.choice:
            lines.append(f"      fusion+fp8: {fq}")
    if facts.device_type == "cuda":
        from ..allreduce.p2p import launch_plan

        lines.append("p2p kernel strategy by message size (bytes per rank; fused launch plan):")
        for tokens in (1, 64, 1024, 8192):
            nbytes = tokens * hidden * 2
            s = policy.allreduce_strategy(nbytes, facts.world_size)
            plan = launch_plan(s.choice, True, tokens, hidden, 2, facts.world_size)
            kern = {"lamport": "lamport_rows_kernel" if plan["rows"] else "lamport_kernel",
                    "oneshot": "oneshot_kernel", "twoshot": "twoshot_kernel"}[s.choice]
            lines.append(f"  {nbytes:>10} B ({tokens} tokens bf16) -> {s}; {kern} "
                         f"grid={plan['grid']} warps={plan['num_warps']}")
        lines.append(f"MoE p2p protocol (EP={layout.ep_size}, bf16) by max_tokens_per_rank "
                     f"(protocol='auto'):")
        for m in (policy.LAMPORT_EP_MAX_TOKENS, 4096):
            lines.append(f"  {m:>5} -> {policy.ep_p2p_protocol(layout.ep_size, m, 2)}")
    return "\n".join(lines)


def run(args: Any) -> int:
    from ..layout import ParallelLayout

    from ..config import launcher_env

    launched = launcher_env()
    distributed = launched is not None
    world_env = launched.world_size if launched else 1
    tp = args.tp if args.tp is not None else (world_env if distributed else 1)
    layout = ParallelLayout(tp=tp, pp=args.pp, dp=args.dp, pcp=args.pcp)
    print("llmcomm doctor")
    for k, v in _versions():
        print(f"  {k:<11} {v}")
    if args.flashinfer == "probe":
        from .. import probe

        fi_caps = probe.flashinfer()
    else:
        fi_caps = _assumed_caps(args.flashinfer)
    if not distributed:
        facts = _local_facts(layout, args.nodes, args.simulate_gpus)
        print(report(layout, facts, fi_caps, args.hidden))
        return 0
    import torch
    import torch.distributed as dist

    from ..topology import gather_topology

    layout.check_world_size(world_env)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(launched.local_rank)
    dist.init_process_group(backend)
    try:
        groups = layout.create_groups()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" \
            else torch.device("cpu")
        facts = gather_topology(groups.tp, device)
        if dist.get_rank() == 0:
            print(report(layout, facts, fi_caps, args.hidden))
    finally:
        dist.destroy_process_group()
    return 0
