"""The ``flashinfer`` allreduce backend: FlashInfer's unified allreduce-fusion API.

``flashinfer.comm.create_allreduce_fusion_workspace`` + ``flashinfer.comm.allreduce_fusion``,
driven only by what :func:`llmcomm.probe.flashinfer` found (agreed across ranks). Every keyword
argument is built by the pure functions :func:`build_workspace_kwargs` and
:func:`build_fusion_kwargs`, so CPU tests check exactly what would be passed:

* an optional, version-dependent keyword is passed only when the probe says it is accepted
  (flag ``True``); ``None`` (unknown: no signature metadata, or only ``**kwargs``) means "not
  passed" and FlashInfer's own default applies;
* the workspace is made on the TP group handed in (never implicitly on WORLD): ``group=`` when
  accepted (FlashInfer >= 0.6.11) and ``comm_backend=`` (an llmcomm object over that group) when
  accepted. A FlashInfer that cannot be scoped to the group (0.6.10, or unknown signatures) is
  refused for a group smaller than WORLD, because its rendezvous would wait on ranks that never
  join (vLLM #45917);
* the workspace is created in ``__init__`` (collective over the group), never during CUDA-graph
  capture (:class:`~llmcomm.errors.CaptureError`).

Variants: ``trtllm`` (CUDA IPC / peer memory, one node, world sizes 2/4/8/16) and ``mnnvl``
(NVLink multicast, spans nodes). ``auto`` is never passed to FlashInfer: the variant is decided
by :func:`llmcomm.policy.flashinfer_variant` (one node -> trtllm; several nodes -> mnnvl only when
multicast is allowed; explicit trtllm on several nodes -> ValueError naming the node count).

Fusion (``fusion=`` is the choice of :func:`llmcomm.policy.allreduce_fusion_decision`):

============================  ===================================================================
``"fused"``                   one FlashInfer kernel: allreduce + residual + RMSNorm (+ FP8 with
                              pattern ``kARResidualRMSNormOutFP8Quant`` on trtllm)
``"fused+epilogue-quant"``    FlashInfer allreduce + residual + RMSNorm; FP8 in a small torch
                              epilogue on the normed output (mnnvl / multi-node, as upstream)
``"epilogue"``                FlashInfer allreduce only; add + RMSNorm (+ FP8) in llmcomm's
                              epilogue (PP > 1: FlashInfer fusion off)
============================  ===================================================================

Fusion that was asked for and is not used is reported once with :func:`warnings.warn` and on
the ``llmcomm`` logger, and :attr:`FlashInferAllReduceBackend.reasons` says why.

Numerics (vs. ``base.py``): the sum is accumulated in fp32 (``fp32_acc=True`` when accepted) and
rounded to the dtype, then the residual is added (a second rounding, where the reference rounds
once), so bf16 results may differ by one unit in the last place. FP8: FlashInfer computes
``fp8 = sat(normed * (1 / scale))`` (``FusedOp``: ``m_scale_factor = 1.f / *scale_factor``), i.e.
it *divides* by the same dequantisation scale llmcomm documents, so ``quant_scale`` is passed
unchanged; it quantises the normed value rounded to the dtype (so does llmcomm's epilogue here),
which may differ from quantising the fp32 value by one FP8 step.

FlashInfer's kernels spin on peer data without a deadline: ``LLMCOMM_TIMEOUT_S`` covers the
creation handshake (the preflight vote), not a peer that stops calling.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .._warn import warn_once
from ..errors import BackendUnavailableError, CaptureError
from ..probe import FUSION_FN, WORKSPACE_FN, FlashInferCapabilities
from .epilogue import run_epilogue

logger = logging.getLogger(__name__)

VARIANTS = ("trtllm", "mnnvl")
FUSION_CHOICES = ("fused", "fused+epilogue-quant", "epilogue")
TRTLLM_WORLD_SIZES = (2, 4, 8, 16)
MNNVL_MAX_WORLD = 64
DTYPES = (torch.bfloat16, torch.float16, torch.float32)

PATTERN_ALLREDUCE = "kAllReduce"
PATTERN_NORM = "kARResidualRMSNorm"
#: FP8 pattern that also writes the normed output (our API returns normed, residual and fp8)
PATTERN_NORM_FP8 = "kARResidualRMSNormOutFP8Quant"

#: trtllm one-shot limit: message bytes * world_size, in MiB (FlashInfer >= 0.5 heuristic,
#: PR #1972, tuned on B200); 16 is not in FlashInfer's table (KeyError there) - ours is a guess.
ONESHOT_MAX_MIB = {2: 512, 4: 64, 8: 42, 16: 32}


def _version_tuple(version: str | None) -> tuple[int, ...] | None:
    if not version:
        return None
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if not m:
        return None
    return tuple(int(g or 0) for g in m.groups())


# --------------------------------------------------------------------------- pure helpers

def flashinfer_use_oneshot(num_tokens: int, hidden_size: int, itemsize: int,
                           world_size: int) -> bool:
    """trtllm one-shot (Lamport) vs two-shot for one call; a pure function of the shape.

    Two-shot needs more tokens than ranks (FlashInfer asserts it), so fewer tokens force
    one-shot. Otherwise one-shot while ``tokens * hidden * itemsize * world`` stays within
    :data:`ONESHOT_MAX_MIB`. Passed explicitly so that every rank launches the same path.
    """
    if min(num_tokens, hidden_size, itemsize, world_size) < 1:
        raise ValueError(f"need positive sizes, got tokens={num_tokens}, hidden={hidden_size}, "
                         f"itemsize={itemsize}, world={world_size}")
    if num_tokens <= world_size:
        return True
    limit = ONESHOT_MAX_MIB.get(world_size, min(ONESHOT_MAX_MIB.values()))
    mib = num_tokens * hidden_size * itemsize * world_size / (1024 * 1024)
    return mib <= limit


def workspace_scoping(caps: FlashInferCapabilities, variant: str,
                      group_is_world: bool) -> tuple[bool, bool, str]:
    """How the workspace is tied to the TP group: ``(pass_group, pass_comm_backend, why)``.

    Raises :class:`~llmcomm.errors.BackendUnavailableError` when this FlashInfer cannot be
    scoped to a group smaller than WORLD (its rendezvous would hang), or when ``mnnvl`` has no
    ``comm_backend`` (it would fall back to MPI ``COMM_WORLD``).
    """
    pass_group = caps.workspace_accepts_group is True
    pass_cb = caps.workspace_accepts_comm_backend is True
    version = _version_tuple(caps.version)
    if variant == "mnnvl":
        if not pass_cb:
            raise BackendUnavailableError(
                f"FlashInfer {caps.version or '?'} mnnvl: create_allreduce_fusion_workspace does "
                f"not take (or the probe could not confirm) `comm_backend`, so MNNVL would "
                f"exchange handles over MPI COMM_WORLD instead of the TP group; use a FlashInfer "
                f"whose signature shows `comm_backend`, or backend='torch'")
        return pass_group, pass_cb, "mnnvl handles exchanged over the TP group (comm_backend)"
    if pass_group:
        return True, pass_cb, "workspace rendezvous on the TP group (group=)"
    # Without `group`: 0.6.0-0.6.9 exchange handles through comm_backend (scoped); 0.6.10 used a
    # torch symmetric-memory rendezvous on WORLD whatever comm_backend says.
    cb_scopes = pass_cb and version is not None and not ((0, 6, 10) <= version < (0, 6, 11))
    if cb_scopes:
        return False, True, "workspace handles exchanged over the TP group (comm_backend)"
    if group_is_world:
        return False, pass_cb, ("FlashInfer cannot be told the group, but the TP group is the "
                                "whole world, so its default (WORLD) is right")
    unknown = caps.workspace_accepts_group is None
    raise BackendUnavailableError(
        f"FlashInfer {caps.version or '?'} cannot create its workspace on the TP group: "
        f"create_allreduce_fusion_workspace "
        + ("has an unreadable signature (group/comm_backend unknown, so not passed)" if unknown
           else "takes no `group`" + ("" if pass_cb else " and no `comm_backend`")
           + (" and this version ignores comm_backend for trtllm" if pass_cb else ""))
        + "; its rendezvous would run on WORLD and hang when the TP group is smaller "
          "(vLLM #45917). Install FlashInfer >= 0.6.11, or use backend='torch' or 'p2p'")


def build_workspace_kwargs(caps: FlashInferCapabilities, *, variant: str, world_size: int,
                           rank: int, max_tokens: int, hidden_size: int, dtype: torch.dtype,
                           group: Any, group_is_world: bool,
                           comm_backend_factory: Callable[[], Any] | None = None,
                           gpus_per_node: int | None = None) -> dict[str, Any]:
    """Keyword arguments for ``create_allreduce_fusion_workspace`` (pure; no FlashInfer call).

    ``backend`` is always the explicit variant, never ``"auto"`` (auto may pick multicast).
    ``group`` / ``comm_backend`` / ``gpus_per_node`` are passed only when accepted (see
    :func:`workspace_scoping`); ``comm_backend_factory()`` is called only then.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS} (never 'auto'), got {variant!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside the group of {world_size}")
    pass_group, pass_cb, _why = workspace_scoping(caps, variant, group_is_world)
    kwargs: dict[str, Any] = {"backend": variant, "world_size": world_size, "rank": rank,
                              "max_token_num": max_tokens, "hidden_dim": hidden_size,
                              "dtype": dtype}
    if pass_group:
        kwargs["group"] = group
    if pass_cb:
        if comm_backend_factory is None:
            raise ValueError("this FlashInfer takes comm_backend: pass comm_backend_factory")
        kwargs["comm_backend"] = comm_backend_factory()
    if (variant == "mnnvl" and gpus_per_node is not None
            and caps.accepts(WORKSPACE_FN, "gpus_per_node") is True):
        kwargs["gpus_per_node"] = gpus_per_node
    return kwargs


def build_fusion_kwargs(caps: FlashInferCapabilities, *, variant: str, pattern: int,
                        num_tokens: int, world_size: int, hidden_size: int, dtype: torch.dtype,
                        tensors: Mapping[str, Any], launch_with_pdl: bool = True,
                        trigger_completion_at_end: bool = True) -> dict[str, Any]:
    """Keyword arguments for one ``allreduce_fusion`` call (pure; no FlashInfer call).

    ``tensors`` holds ``input``, ``workspace`` and the pattern's tensors (``output``,
    ``residual_in``, ``residual_out``, ``norm_out``, ``rms_gamma``, ``rms_eps``, ``quant_out``,
    ``scale_factor``); they are passed as given. Optional controls, each only when the probed
    signature names it: ``launch_with_pdl``; on trtllm ``trigger_completion_at_end`` (flag
    ``True`` only), ``use_oneshot`` (explicit, :func:`flashinfer_use_oneshot`) and
    ``fp32_acc=True``. mnnvl gets no ``use_oneshot`` (FlashInfer sizes its workspace for its own
    choice, vLLM #47589) and none of the trtllm-only controls.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    kwargs: dict[str, Any] = dict(tensors)
    kwargs["pattern"] = pattern
    if caps.accepts(FUSION_FN, "launch_with_pdl") is True:
        kwargs["launch_with_pdl"] = launch_with_pdl
    if variant == "trtllm":
        if caps.fusion_accepts_trigger_completion is True:
            kwargs["trigger_completion_at_end"] = trigger_completion_at_end
        if caps.accepts(FUSION_FN, "use_oneshot") is True:
            kwargs["use_oneshot"] = flashinfer_use_oneshot(
                num_tokens, hidden_size, torch.finfo(dtype).bits // 8, world_size)
        if caps.accepts(FUSION_FN, "fp32_acc") is True:
            kwargs["fp32_acc"] = True
    return kwargs


@dataclass(frozen=True)
class FusionPlan:
    """What runs inside FlashInfer's kernel and what in llmcomm's epilogue, and why."""

    norm_in_kernel: bool
    quant_in_kernel: bool
    reasons: tuple[str, ...]
    #: the fusion that was asked for and is not used (empty when all of it is used)
    dropped: tuple[str, ...] = ()


def fusion_plan(caps: FlashInferCapabilities, variant: str, fusion: str = "fused",
                pp_size: int = 1) -> FusionPlan:
    """Pure: which patterns this backend will use for ``fusion`` (see the module table).

    ``pp_size > 1`` turns FlashInfer fusion off whatever was asked (defence in depth: the
    policy already decides so). A pattern missing from ``caps.patterns`` moves that step to the
    epilogue. Quantisation in the kernel only on trtllm (mnnvl: as upstream, no quant fusion).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if fusion not in FUSION_CHOICES:
        raise ValueError(f"fusion must be one of {FUSION_CHOICES}, got {fusion!r}")
    if not isinstance(pp_size, int) or pp_size < 1:
        raise ValueError(f"pp_size must be an int >= 1, got {pp_size!r}")
    reasons: list[str] = []
    dropped: list[str] = []
    if pp_size > 1 and fusion != "epilogue":
        reasons.append(f"PP={pp_size}: FlashInfer fusion off (its fused kernel needs identical "
                       f"launches on every TP peer; vLLM #43616); add+norm+FP8 in llmcomm's "
                       f"epilogue")
        dropped.append("allreduce+add+norm")
        fusion = "epilogue"
    if fusion == "epilogue":
        if not reasons:
            reasons.append("FlashInfer allreduce; add + norm (+FP8) in llmcomm's epilogue")
        return FusionPlan(False, False, tuple(reasons), tuple(dropped))
    norm = PATTERN_NORM in caps.patterns
    if not norm:
        reasons.append(f"FlashInfer {caps.version or '?'} lacks pattern {PATTERN_NORM}; "
                       f"add + norm (+FP8) in llmcomm's epilogue")
        dropped.append("allreduce+add+norm")
        return FusionPlan(False, False, tuple(reasons), tuple(dropped))
    reasons.append(f"{variant}: allreduce + residual + RMSNorm in one FlashInfer kernel")
    quant = False
    if fusion == "fused+epilogue-quant":
        reasons.append("FP8 in llmcomm's epilogue on the normed output (as decided)")
    elif variant != "trtllm":
        reasons.append("mnnvl: no FP8 quant fusion (as upstream); FP8 in llmcomm's epilogue")
        dropped.append("fp8-quant")
    elif PATTERN_NORM_FP8 not in caps.patterns:
        reasons.append(f"FlashInfer {caps.version or '?'} lacks pattern {PATTERN_NORM_FP8}; "
                       f"FP8 in llmcomm's epilogue")
        dropped.append("fp8-quant")
    else:
        quant = True
        reasons.append(f"FP8 quant in the same kernel ({PATTERN_NORM_FP8})")
    return FusionPlan(True, quant, tuple(reasons), tuple(dropped))


def check_shape_support(variant: str, world_size: int, hidden_size: int, dtype: torch.dtype,
                        max_tokens: int) -> None:
    """ValueError/TypeError for what FlashInfer's kernels cannot do (pure)."""
    if not isinstance(hidden_size, int) or hidden_size < 1:
        raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    if dtype not in DTYPES:
        raise TypeError(f"FlashInfer allreduce fusion supports {', '.join(map(str, DTYPES))}; "
                        f"got {dtype}")
    vec = 16 // (torch.finfo(dtype).bits // 8)
    if hidden_size % vec:
        raise ValueError(f"FlashInfer needs hidden_size % {vec} == 0 for {dtype}, "
                         f"got {hidden_size}")
    if variant == "trtllm" and world_size not in TRTLLM_WORLD_SIZES:
        raise ValueError(f"FlashInfer trtllm supports TP sizes {TRTLLM_WORLD_SIZES}, "
                         f"the group has {world_size} ranks; use backend='torch' or 'p2p'")
    if variant == "mnnvl" and not 2 <= world_size <= MNNVL_MAX_WORLD:
        raise ValueError(f"FlashInfer mnnvl supports 2..{MNNVL_MAX_WORLD} ranks, "
                         f"the group has {world_size}")


def why_not_flashinfer(caps: FlashInferCapabilities, *, variant: str, world_size: int,
                       group_is_world: bool, hidden_size: int | None = None,
                       dtype: torch.dtype | None = None, max_tokens: int = 1) -> str | None:
    """Pure pre-check for the policy: None when the backend can be created, else why not.

    Covers what ``FlashInferAllReduceBackend.__init__`` would refuse before touching a GPU:
    availability/agreement, workspace scoping to the group, world size, hidden size and dtype.
    """
    if not caps.available or not caps.agreed:
        return f"FlashInfer unavailable: {caps.reason}"
    try:
        workspace_scoping(caps, variant, group_is_world)
        if hidden_size is not None and dtype is not None:
            check_shape_support(variant, world_size, hidden_size, dtype, max_tokens)
        elif variant == "trtllm" and world_size not in TRTLLM_WORLD_SIZES:
            return f"FlashInfer trtllm supports TP sizes {TRTLLM_WORLD_SIZES}, got {world_size}"
    except (BackendUnavailableError, ValueError, TypeError) as exc:
        return str(exc)
    if (variant == "trtllm" and caps.accepts(FUSION_FN, "use_oneshot") is not True
            and world_size not in (2, 4, 8)):
        return (f"use_oneshot cannot be passed (signature unknown) and FlashInfer's heuristic "
                f"has no entry for {world_size} ranks")
    return None


# --------------------------------------------------------------------------- comm backend

def make_comm_backend(group: Any) -> Any:
    """A FlashInfer ``CommBackend`` over ``group`` with group-local roots.

    FlashInfer's own ``TorchDistBackend.bcast`` passed the group-local root as a global rank
    before 0.6.13 (wrong for a TP group that does not contain global rank 0); this one maps it.
    It subclasses ``flashinfer.comm.mnnvl.CommBackend`` when that exists.
    """
    import torch.distributed as dist

    base: type = object
    try:  # imported lazily: only on the path that creates a workspace
        from flashinfer.comm.mnnvl import CommBackend as _FICommBackend  # type: ignore

        base = _FICommBackend
    except Exception:  # noqa: BLE001 - a FlashInfer without it still gets a duck-typed one
        base = object

    class _LlmcommGroupBackend(base):  # type: ignore[misc, valid-type]
        def __init__(self, g: Any) -> None:
            self._group = g

        def Get_rank(self) -> int:  # noqa: N802 - FlashInfer's (MPI) naming
            return dist.get_rank(self._group)

        def Get_size(self) -> int:  # noqa: N802
            return dist.get_world_size(self._group)

        def allgather(self, data: Any) -> list[Any]:
            out: list[Any] = [None] * self.Get_size()
            dist.all_gather_object(out, data, group=self._group)
            return out

        def bcast(self, data: Any, root: int) -> Any:
            objs = [data]
            dist.broadcast_object_list(objs, src=dist.get_global_rank(self._group, root),
                                       group=self._group)
            return objs[0]

        def barrier(self) -> None:
            dist.barrier(group=self._group)

        def Split(self, color: int, key: int) -> Any:  # noqa: N802
            # Only the trivial split (one color, keys in group order) is supported: a real
            # split needs dist.new_group, a WORLD collective that ranks outside this group
            # never join (it would hang).
            infos = self.allgather((color, key))
            if len({c for c, _ in infos}) == 1 and [k for _, k in infos] == sorted(
                    k for _, k in infos):
                return self
            raise NotImplementedError(
                "llmcomm's FlashInfer comm backend supports only the trivial Split (one color, "
                f"keys in group order); got {infos}")

    return _LlmcommGroupBackend(group)


# --------------------------------------------------------------------------- the backend

class FlashInferAllReduceBackend:
    """AllReduceBackend (see ``base.py``) through FlashInfer's unified allreduce-fusion API.

    Args:
        group: the TP process group (the workspace is made on it; required, never implied).
        hidden_size, dtype, max_tokens: the workspace's shape limits.
        device: this rank's CUDA device.
        caps: capabilities from :func:`llmcomm.probe.flashinfer`, agreed with
            :func:`llmcomm.probe.agree_flashinfer`.
        variant: ``"trtllm"`` or ``"mnnvl"`` (from :func:`llmcomm.policy.flashinfer_variant`).
        fusion: choice of :func:`llmcomm.policy.allreduce_fusion_decision`.
        pp_size: pipeline-parallel size; > 1 turns FlashInfer fusion off.
        gpus_per_node: passed to FlashInfer for mnnvl when accepted.
        launch_with_pdl: passed when accepted (the kernels wait on their predecessor first).

    Raises:
        ValueError / TypeError: unsupported sizes, dtype, variant or fusion.
        BackendUnavailableError: FlashInfer unusable here (not available, ranks disagree,
            cannot be scoped to the group, multicast disabled for mnnvl, creation failed on
            some rank).
        CaptureError: created during CUDA-graph capture.
    """

    name = "flashinfer"

    def __init__(self, group: Any, hidden_size: int, dtype: torch.dtype, max_tokens: int,
                 device: torch.device, caps: FlashInferCapabilities, variant: str = "trtllm",
                 *, fusion: str = "fused", pp_size: int = 1, gpus_per_node: int | None = None,
                 launch_with_pdl: bool = True) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if not isinstance(caps, FlashInferCapabilities):
            raise TypeError(f"caps must be FlashInferCapabilities, got {type(caps).__name__}")
        if group is None:
            raise ValueError("pass the TP process group explicitly; the FlashInfer workspace is "
                             "made on it (never implicitly on WORLD)")
        device = torch.device(device)
        if not caps.available or not caps.agreed:
            raise BackendUnavailableError(f"FlashInfer cannot be used: {caps.reason}")
        if device.type != "cuda":
            raise BackendUnavailableError(f"FlashInfer allreduce needs a CUDA device, got {device}")
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise CaptureError("the FlashInfer workspace is collective and must be created "
                               "before CUDA-graph capture; create the communicator first")
        from ..config import get_config

        cfg = get_config()
        if variant == "mnnvl" and cfg.multicast_disabled:
            raise BackendUnavailableError(
                "FlashInfer mnnvl needs NVLink multicast, which is disabled by "
                + ", ".join(cfg.multicast_disabled_by) + "; use backend='torch' across nodes")

        import torch.distributed as dist

        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        check_shape_support(variant, self.world_size, hidden_size, dtype, max_tokens)
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.max_tokens = max_tokens
        self.device = device
        self.caps = caps
        self.variant = variant
        self.launch_with_pdl = launch_with_pdl
        self.plan = fusion_plan(caps, variant, fusion, pp_size)
        self.reasons = self.plan.reasons
        self._fusion_key = f"{variant}-{fusion}-{pp_size}"
        if "allreduce+add+norm" in self.plan.dropped:
            self._report_dropped("allreduce+add+norm")
        if (variant == "trtllm" and caps.accepts(FUSION_FN, "use_oneshot") is not True
                and self.world_size not in (2, 4, 8)):
            raise BackendUnavailableError(
                f"FlashInfer {caps.version or '?'}: use_oneshot cannot be passed (signature "
                f"unknown) and FlashInfer's own heuristic has no entry for {self.world_size} "
                f"ranks (KeyError); use backend='torch' or 'p2p'")

        group_is_world = self.world_size == dist.get_world_size()
        self.scoping = workspace_scoping(caps, variant, group_is_world)[2]  # raises, no collective

        from ..agree import exchange

        # Preflight vote: either every rank enters the (collective) creation or none does.
        local_ok = torch.cuda.is_available()
        votes = exchange({"ok": local_ok, "version": caps.version}, group,
                         "flashinfer-preflight")
        bad = [r for r, v in enumerate(votes) if not v["ok"]]
        if bad:
            raise BackendUnavailableError(f"FlashInfer workspace not created: CUDA unavailable "
                                          f"on group rank(s) {bad}")

        import flashinfer.comm as fi_comm

        self._comm = fi_comm
        pat = fi_comm.AllReduceFusionPattern
        self._p_ar = int(getattr(pat, PATTERN_ALLREDUCE))
        self._p_norm = int(getattr(pat, PATTERN_NORM)) if self.plan.norm_in_kernel else None
        self._p_fp8 = int(getattr(pat, PATTERN_NORM_FP8)) if self.plan.quant_in_kernel else None
        ws_kwargs = build_workspace_kwargs(
            caps, variant=variant, world_size=self.world_size, rank=self.rank,
            max_tokens=max_tokens, hidden_size=hidden_size, dtype=dtype, group=group,
            group_is_world=group_is_world, comm_backend_factory=lambda: make_comm_backend(group),
            gpus_per_node=gpus_per_node)
        self._ws_keys = tuple(sorted(ws_kwargs))
        err: str | None = None
        self._workspace = None
        try:
            with torch.cuda.device(device):
                self._workspace = fi_comm.create_allreduce_fusion_workspace(**ws_kwargs)
        except Exception as exc:  # noqa: BLE001 - reported on every rank below
            err = f"{type(exc).__name__}: {exc}"[:500]
            logger.warning("FlashInfer workspace creation failed on group rank %d: %s",
                           self.rank, err)
        results = exchange({"err": err}, group, "flashinfer-created")
        failed = {r: v["err"] for r, v in enumerate(results) if v["err"]}
        if failed:
            self.close()
            raise BackendUnavailableError(
                f"FlashInfer {variant} workspace creation failed on group rank(s) "
                + "; ".join(f"{r}: {e}" for r, e in failed.items()))
        logger.info("FlashInfer %s backend on %d ranks: %s", variant, self.world_size,
                    "; ".join(self.reasons))

    def _report_dropped(self, what: str) -> None:
        warn_once(logger, f"fi-dropped-{what}-{self._fusion_key}",
                   f"llmcomm: FlashInfer fusion of {what} was asked for and is not used: "
                   + "; ".join(self.reasons))

    # ----------------------------------------------------------------- protocol

    def fingerprint(self) -> dict[str, Any]:
        """Launch-relevant facts that must match on every rank."""
        return {"backend": self.name, "variant": self.variant,
                "flashinfer_version": self.caps.version, "world_size": self.world_size,
                "hidden_size": self.hidden_size, "dtype": str(self.dtype),
                "max_tokens": self.max_tokens, "norm_in_kernel": self.plan.norm_in_kernel,
                "quant_in_kernel": self.plan.quant_in_kernel,
                "workspace_kwargs": self._ws_keys, "launch_with_pdl": self.launch_with_pdl,
                "oneshot_table": tuple(sorted(ONESHOT_MAX_MIB.items()))}

    def _call(self, pattern: int, x: torch.Tensor, tensors: dict[str, Any]) -> None:
        if self._workspace is None:
            raise BackendUnavailableError("the FlashInfer backend was closed")
        t = x.shape[0]
        if t > self.max_tokens:
            raise ValueError(f"{t} tokens exceed the workspace capacity of {self.max_tokens}")
        if not x.is_contiguous():
            raise ValueError("FlashInfer needs contiguous inputs")
        tensors = {"input": x, "workspace": self._workspace, **tensors}
        kwargs = build_fusion_kwargs(
            self.caps, variant=self.variant, pattern=pattern, num_tokens=t,
            world_size=self.world_size, hidden_size=self.hidden_size, dtype=self.dtype,
            tensors=tensors, launch_with_pdl=self.launch_with_pdl)
        self._comm.allreduce_fusion(**kwargs)

    def all_reduce(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """``out = sum over ranks of x`` (FlashInfer pattern ``kAllReduce``)."""
        self._call(self._p_ar, x, {"output": out})

    def all_reduce_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor,
                                weight: torch.Tensor, eps: float, normed_out: torch.Tensor,
                                residual_out: torch.Tensor,
                                quant_scale: torch.Tensor | None = None,
                                fp8_out: torch.Tensor | None = None) -> None:
        """See ``base.py``; which parts run in FlashInfer is :attr:`plan`."""
        if (quant_scale is None) != (fp8_out is None):
            raise ValueError("quant_scale and fp8_out go together")
        if weight.dtype != self.dtype:
            weight = weight.to(self.dtype)
        if not self.plan.norm_in_kernel:
            summed = torch.empty_like(x)
            self.all_reduce(x, summed)
            run_epilogue(summed, residual, weight, eps, normed_out, residual_out,
                              quant_scale, fp8_out, self.dtype)
            return
        tensors = {"residual_in": residual, "residual_out": residual_out, "norm_out": normed_out,
                   "rms_gamma": weight, "rms_eps": float(eps)}
        if quant_scale is not None and self.plan.quant_in_kernel:
            # FlashInfer divides by scale_factor (1/scale in FusedOp), as llmcomm: pass unchanged.
            tensors.update(quant_out=fp8_out, scale_factor=quant_scale)
            self._call(self._p_fp8, x, tensors)
            return
        self._call(self._p_norm, x, tensors)
        if quant_scale is not None:
            if "fp8-quant" in self.plan.dropped:
                self._report_dropped("fp8-quant")
            quantize_fp8_epilogue(normed_out, quant_scale, fp8_out)

    def close(self) -> None:
        """Destroy the workspace. Safe to call twice."""
        ws, self._workspace = getattr(self, "_workspace", None), None
        if ws is not None and hasattr(ws, "destroy"):
            try:
                ws.destroy()
            except Exception as exc:  # noqa: BLE001 - teardown must not raise
                logger.warning("FlashInfer workspace destroy failed: %s", exc)


def quantize_fp8_epilogue(normed: torch.Tensor, quant_scale: torch.Tensor,
                          fp8_out: torch.Tensor) -> None:
    """``fp8_out = sat(normed / quant_scale)`` as float8_e4m3fn (torch ops; graph-capturable).

    Quantises the normed output rounded to its dtype (as FlashInfer's kernel does), so the
    result may differ by one FP8 step from quantising the fp32 normed value.
    """
    from ..reference import FP8_MAX

    q = torch.div(normed.float(), quant_scale.float()).clamp_(-FP8_MAX, FP8_MAX)
    fp8_out.copy_(q.to(torch.float8_e4m3fn))
