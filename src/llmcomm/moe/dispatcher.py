"""``EPDispatcher``: MoE expert-parallel token exchange over an EP group.

Experts are split evenly over the EP ranks in contiguous blocks: rank ``r`` owns global experts
``[r * L, (r + 1) * L)`` with ``L = num_experts // group_size``. Per layer call::

    d = ep.dispatch(x, topk_ids, topk_weights)     # x [T, H], ids/weights [T, top_k]
    # d.expert_x [L, capacity, H]: rows [:d.counts[l]] are the tokens routed to local expert l
    expert_out = my_experts(d.expert_x, d.counts)  # same shape as expert_x
    y = ep.combine(expert_out, d)                  # y [T, H] = sum_k w[t,k] * expert(x[t])

With ``packed=True``, ``d.expert_x`` is ``[rows, H]`` (``rows = capacity * min(top_k, L)``, the
worst case of all local experts together, plus ``L * (packed_align - 1)``) and expert ``l``'s
tokens are rows ``d.offsets[l] : d.offsets[l] + d.counts[l]`` (``d.offsets[l + 1]`` unless
segments are padded to ``packed_align``) -- the layout grouped-GEMM kernels take.

With ``fp8=True`` tokens cross the wire as float8_e4m3fn with one float32 scale per 128
channels (half the bytes; :mod:`llmcomm.moe.fp8`): ``d.expert_x`` is float8_e4m3fn of the same
shape and ``d.expert_x_scale`` holds the scales (``[..., H / 128]``); ``dispatch`` quantises a
``dtype`` ``x``, or takes the caller's ``(q, scale)``. ``expert_out`` and ``y`` stay in ``dtype``.

Contract (all backends): ``combine`` returns the final reduced output -- weights applied once,
the top-k sum done once (``MoEBackend.output_is_reduced``; the dispatcher refuses a backend class
that says otherwise). A token crosses the wire once per destination *rank*. ``capacity`` is the
static worst case ``group_size * max_tokens_per_rank``; the packed layout needs
``min(top_k, L)`` times that, not ``L`` times (16x less memory at 256 experts, top-8, EP=2).
One dispatch is in flight at a time: call
``combine`` for a result before the next ``dispatch`` (the p2p backend reuses its receive buffers,
so this is enforced for every backend alike). ``expert_x`` stays valid until the next dispatch.

Backends (``backend=``): ``"torch"`` (all_to_all; spans nodes; host sync), ``"allgather"``
(all_gather + reduce_scatter; graph-safe), ``"p2p"`` (Triton over symmetric memory on one node;
graph-safe, no host sync), ``"auto"`` (p2p on one node of 2+ peer-connected GPUs, else torch).
``ep.decision`` says what was chosen and why.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .._warmup import check_warmup_context, is_int, warm_counts
from ..agree import CallChecker, agree, group_label, group_ranks
from ..config import get_config
from ..errors import BackendUnavailableError, CaptureError, ConfigMismatchError  # noqa: F401
from ..policy import Decision
from .backends import (AllGatherBackend, EPConfig, MoEBackend, TorchA2ABackend, packed_offsets,
                       packed_row_experts)
from .fp8 import FP8_BLOCK, FP8_DTYPE, check_fp8_config, split_wire, to_wire, warm_quantize

logger = logging.getLogger(__name__)

EP_BACKENDS = ("torch", "allgather", "p2p")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


#: ``DispatchHandle.generation`` of a dispatch made inside a torch.compile'd graph (the
#: dispatcher keeps the real handle for ``llmcomm::moe_combine``)
_COMPILED = -1


@dataclass
class DispatchHandle:
    """What ``combine`` needs from its ``dispatch`` (opaque to callers)."""

    num_tokens: int
    generation: int
    state: Any = field(repr=False)


@dataclass
class DispatchResult:
    """Result of :meth:`EPDispatcher.dispatch`.

    Attributes:
        expert_x: padded (the default): ``[local_experts, capacity, hidden]``; rows
            ``[:counts[l]]`` of expert ``l`` hold its tokens (order unspecified), the rest is
            undefined. Packed (``EPDispatcher(packed=True)``): ``[rows, hidden]``, expert
            ``l``'s tokens in rows ``[offsets[l], offsets[l] + counts[l])`` (order
            unspecified; ``offsets[l + 1]`` with ``packed_align=1``), the other rows undefined.
        counts: ``[local_experts]`` int32 on the device: tokens per local expert.
        handle: pass it (or this whole result) to :meth:`EPDispatcher.combine`.
        offsets: packed only, ``[local_experts + 1]`` int32 on the device: ``[0,
            *cumsum(counts)]``, each count first rounded up to ``packed_align``; ``None`` for
            the padded layout.
        expert_x_scale: ``fp8=True`` only (else ``None``): float32 ``[..., hidden / 128]``,
            ``expert_x``'s shape with one scale per 128 channels; a row's values are
            ``expert_x.float() * scale`` repeated over its block. With ``fp8=True``
            ``expert_x`` is float8_e4m3fn; both are views of the received wire rows (rows not
            contiguous: ``.contiguous()`` them where a kernel needs that).
    """

    expert_x: torch.Tensor
    counts: torch.Tensor
    handle: DispatchHandle
    offsets: torch.Tensor | None = None
    expert_x_scale: torch.Tensor | None = None

    def row_experts(self) -> torch.Tensor:
        """Packed only: ``[rows]`` int32, the local expert of each row of ``expert_x``, ``-1``
        where a row holds no token (:func:`~llmcomm.moe.backends.packed_row_experts`; device
        ops, no sync)."""
        if self.offsets is None:
            raise ValueError("row_experts() is for a packed dispatch (EPDispatcher(packed=True)); "
                             "in the padded layout expert l's rows are expert_x[l, :counts[l]]")
        return packed_row_experts(self.counts, self.offsets, self.expert_x.shape[0])


def _as_wire(expert_x: torch.Tensor, hidden_size: int, fp8: bool
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(expert_x, expert_x_scale)`` of a backend's ``expert_x``: the fp8 views of its wire
    rows with ``fp8``, else ``(expert_x, None)``."""
    if not fp8:
        return expert_x, None
    return split_wire(expert_x, hidden_size)


def resolve_ep_backend(requested: str, facts: Any, hidden_size: int) -> Decision:
    """Pure: which EP backend serves a group with these :class:`TopologyFacts`, and why."""
    if requested not in ("auto",) + EP_BACKENDS:
        raise ValueError(f"EPDispatcher backend must be one of {('auto',) + EP_BACKENDS}, got "
                         f"{requested!r}")
    why_not_p2p = None
    if facts.device_type != "cuda":
        why_not_p2p = f"needs CUDA devices, the group is on {facts.device_type}"
    elif facts.num_nodes > 1:
        why_not_p2p = f"works within one node, the EP group spans {facts.num_nodes} nodes"
    elif facts.world_size < 2:
        # its kernels pair this rank with a peer (session 33: at EP=1 the flags dispatch
        # failed to compile, found by the demo at --tp 1 on one H100)
        why_not_p2p = "an EP group of one rank has no peer to exchange with"
    elif not facts.peer_access:
        why_not_p2p = "not every pair of GPUs in the group has peer access"
    elif not facts.triton_available:
        why_not_p2p = "triton is not importable on every rank"
    elif hidden_size % 8:
        why_not_p2p = f"needs hidden_size % 8 == 0, got {hidden_size}"
    if requested == "p2p":
        if facts.device_type == "cuda" and facts.num_nodes > 1:
            raise ValueError(
                f"EP backend 'p2p' works within one node, but this EP group spans "
                f"{facts.num_nodes} nodes; use backend='torch' (all_to_all, spans nodes) or "
                f"'allgather', or 'auto'")
        if why_not_p2p:
            raise BackendUnavailableError(f"EP backend 'p2p' cannot serve this group: "
                                          f"{why_not_p2p}; use backend='torch' or 'auto'")
        return Decision("p2p", ("requested explicitly", "one node with peer access"))
    if requested in ("torch", "allgather"):
        return Decision(requested, ("requested explicitly",))
    if why_not_p2p is None:
        return Decision("p2p", (f"one node, {facts.world_size} GPUs with peer access: "
                                f"p2p (NVLink stores into symmetric memory)",))
    return Decision("torch", (f"p2p not usable: {why_not_p2p}",
                              "torch: all_to_all_single over the group's backend"))


def _type_name(t: Any) -> str:
    return type(t).__name__ if not isinstance(t, torch.Tensor) else f"Tensor({t.dtype})"


class EPDispatcher:
    """Dispatch tokens to the ranks that own their top-k experts, and combine the outputs back.

    Args:
        group: the EP process group (DP x PCP x TP ranks of one pipeline stage). Never WORLD
            unless the world *is* the EP group.
        num_experts: global expert count, divisible by the group size.
        top_k: experts per token, ``1 <= top_k <= num_experts``.
        hidden_size: token width.
        max_tokens_per_rank: most tokens any rank passes to one ``dispatch``; sizes the static
            workspaces (``capacity = group_size * max_tokens_per_rank``). Memory grows with
            it: ``expert_x`` alone is ``[local_experts, capacity, hidden]``, i.e.
            ``num_experts * max_tokens_per_rank * hidden`` elements whatever the group size
            (15 GB in bf16 at 256 experts, 4096 tokens, hidden 7168; 0.47 GB at 128 tokens),
            plus the p2p receive buffers. Size it to the largest batch one call carries (an
            engine's prefill chunk), and use a second dispatcher with a small value for decode.
        dtype: activation dtype of ``x`` / ``expert_x`` / ``expert_out`` / ``y``.
        backend: ``"auto" | "torch" | "allgather" | "p2p"``.
        packed: ``expert_x`` as ``[rows, hidden]`` with every local expert's tokens in one
            segment (``DispatchResult.offsets``), ``rows = group_size * max_tokens_per_rank *
            min(top_k, local_experts)``: ``L / min(top_k, L)`` times less memory than the
            padded ``[L, capacity, hidden]`` (0.94 instead of 15 GB at 256 experts, top-8,
            4096 tokens, hidden 7168, EP=2). For prefill-sized dispatchers. The p2p backend
            then uses its ``"flags"`` protocol, and a dispatch first exchanges per-expert token
            counts with every peer (one more kernel, one more round trip).
        packed_align: with ``packed=True``, each expert's segment starts at a multiple of this
            many rows (``offsets[l + 1] - offsets[l]`` is ``counts[l]`` rounded up; the rows
            past ``counts[l]`` are undefined), for grouped GEMMs that tile experts' rows in
            blocks (e.g. 64 or 128); ``rows`` grows by ``local_experts * (packed_align - 1)``.
            Default 1.
        fp8: dispatch tokens as float8_e4m3fn with one float32 scale per 128 channels
            (:mod:`llmcomm.moe.fp8`; DeepSeek-V3's activation format): half the bytes on the
            wire and in ``expert_x`` (``DispatchResult.expert_x_scale`` holds the scales).
            ``dispatch`` quantises ``x`` (power-of-two scales, exact) or takes an already
            quantised ``(q [T, H] float8_e4m3fn, scale [T, H / 128] float32)``. Needs
            ``hidden_size % 128 == 0`` and a bf16 / fp16 / fp32 ``dtype``; the combine, its
            ``expert_out`` and ``y`` stay in ``dtype``. Both p2p protocols carry it (lamport
            since session 33: a caller's scale whose low 16 bits are ``0x8000`` arrives one
            ulp up there, see ``_no_sentinel`` in :mod:`llmcomm.kernels.moe`).
        layout: optional :class:`~llmcomm.ParallelLayout`; its ``ep_size`` (and, when given, its EP
            rank lists) must match ``group`` -- a workspace sized to another group is the bug of
            seed 002, caught here at creation.
        device: defaults to ``cuda:<current>`` for NCCL groups, else CPU.

    Creation is collective over ``group`` (topology facts and a fingerprint of every argument
    are exchanged with a deadline); a mismatch raises :class:`ConfigMismatchError` on every rank.
    """

    def __init__(self, group: Any, num_experts: int, top_k: int, hidden_size: int,
                 max_tokens_per_rank: int, dtype: torch.dtype, backend: str = "auto",
                 layout: Any = None, device: torch.device | str | None = None,
                 packed: bool = False, packed_align: int = 1, fp8: bool = False,
                 _backend_cls: type[MoEBackend] | None = None,
                 _backend_kwargs: dict[str, Any] | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call "
                               "init_process_group() before creating an EPDispatcher")
        if group is None:
            group = dist.group.WORLD
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        if rank < 0:
            raise ValueError(f"this rank ({dist.get_rank()}) is not a member of the EP group "
                             f"{group_label(group)}; create the dispatcher on the ranks of "
                             f"layout.ep_groups() only")
        validate_config(num_experts=num_experts, top_k=top_k, hidden_size=hidden_size,
                        max_tokens_per_rank=max_tokens_per_rank, dtype=dtype,
                        group_size=world, backend=backend, packed=packed,
                        packed_align=packed_align, fp8=fp8)
        check_layout(layout, group_ranks(group), world)
        if device is None:
            device = (torch.device("cuda", torch.cuda.current_device())
                      if dist.get_backend(group) == "nccl" else torch.device("cpu"))
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.group = group
        self.rank, self.world_size = rank, world
        self.num_experts, self.top_k, self.hidden_size = num_experts, top_k, hidden_size
        self.max_tokens_per_rank, self.dtype, self.device = max_tokens_per_rank, dtype, device
        self.local_experts = num_experts // world
        self.capacity = world * max_tokens_per_rank
        self.packed, self.packed_align, self.fp8 = packed, packed_align, fp8
        self.expert_offset = rank * self.local_experts

        from ..topology import gather_topology

        self.facts = gather_topology(group, device)
        if _backend_cls is not None:
            self.decision = Decision(_backend_cls.name, ("backend class given explicitly",))
            cls = _backend_cls
        else:
            self.decision = resolve_ep_backend(backend, self.facts, hidden_size)
            cls = _backend_class(self.decision.choice)
        if cls.__dict__.get("output_is_reduced", MoEBackend.output_is_reduced) is not True or \
                cls.output_is_reduced is not True:
            raise TypeError(
                f"EP backend {cls.__name__} declares output_is_reduced="
                f"{cls.output_is_reduced!r}; every llmcomm EP backend must return the final "
                f"reduced output from combine (weights applied once, top-k summed once) and "
                f"inherit MoEBackend.output_is_reduced = True unchanged")
        cfg = EPConfig(rank=rank, world_size=world, num_experts=num_experts, top_k=top_k,
                       hidden_size=hidden_size, max_tokens_per_rank=max_tokens_per_rank,
                       dtype=dtype, device=device, packed=packed, packed_align=packed_align,
                       fp8=fp8)
        self._cfg = cfg
        self._backend: MoEBackend = cls(group, cfg, **(_backend_kwargs or {}))
        sub = getattr(self._backend, "protocol_decision", None)
        if sub is not None:      # the p2p backend's protocol and why, in the same record
            self.decision = Decision(self.decision.choice, self.decision.reasons + (
                f"protocol {sub}",))
        fp = {"num_experts": num_experts, "top_k": top_k, "hidden_size": hidden_size,
              "max_tokens_per_rank": max_tokens_per_rank, "capacity": self.capacity,
              "packed": packed, "packed_align": packed_align, "fp8": fp8,
              "dtype": str(dtype), "backend": self._backend.name, "group_size": world,
              "device_type": device.type}
        fp.update({f"backend.{k}": v for k, v in self._backend.fingerprint().items()})
        try:
            agree(fp, group, "EPDispatcher")
        except ConfigMismatchError:
            self._backend.close()
            raise
        self._generation = 0
        self._in_flight: int | None = None
        self._call_check = CallChecker(group, "EPDispatcher")
        from .. import ops

        self._op_key = ops.register(self)      # what torch.compile'd graphs call (llmcomm.ops)
        self._compiled_in_flight: DispatchHandle | None = None
        self._warm_hint = self._backend.name == "p2p"   # say once if dispatch runs unwarmed
        self._warmed: int | None = None    # warmup(): the kernel variants it loaded
        logger.info("EPDispatcher on %s: %s", group_label(group), self.decision)

    # ------------------------------------------------------------------ properties
    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def expert_x_shape(self) -> tuple[int, ...]:
        """``expert_x``'s (and ``expert_out``'s) shape: ``(local_experts, capacity, hidden)``,
        or ``(rows, hidden)`` with ``packed=True``."""
        return self._cfg.expert_x_shape

    @property
    def graph_safe(self) -> bool:
        """Whether dispatch/combine may be captured in a CUDA graph."""
        return self._backend.graph_safe

    # ------------------------------------------------------------------ calls
    def dispatch(self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor], topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> DispatchResult:
        """Send each token once to every rank owning one of its experts; see the module doc.
        With ``fp8=True``, ``x`` is a ``dtype`` ``[T, H]`` (quantised here) or the caller's
        ``(q [T, H] float8_e4m3fn, scale [T, H / 128] float32)``. Under ``torch.compile`` one
        opaque op (:mod:`llmcomm.ops`)."""
        x, x_scale = self._input_pair(x)
        if torch.compiler.is_compiling():
            wire, counts = torch.ops.llmcomm.moe_dispatch(x, topk_ids, topk_weights,
                                                          self._op_key, x_scale)
            return self._result(wire, counts, DispatchHandle(x.shape[0], _COMPILED, None),
                                packed_offsets(counts, self.packed_align) if self.packed
                                else None)
        wire, counts, handle = self._dispatch(x, x_scale, topk_ids, topk_weights)
        return self._result(wire, counts, handle,
                            self._backend.offsets(counts) if self.packed else None)

    def _input_pair(self, x: Any) -> tuple[Any, torch.Tensor | None]:
        """``(x, None)``, or an fp8 dispatcher's ``(q, scale)`` pair taken apart."""
        if not isinstance(x, (tuple, list)):
            return x, None
        if not self.fp8:
            raise TypeError(f"dispatch: x must be a tensor [T, hidden_size={self.hidden_size}] "
                            f"of {self.dtype}, got a {type(x).__name__}; a (q, scale) pair is "
                            f"for dispatchers created with fp8=True")
        if len(x) != 2:
            raise TypeError(f"dispatch: an fp8 x given as a pair must be (q [T, H] "
                            f"float8_e4m3fn, scale [T, H / {FP8_BLOCK}] float32), got "
                            f"{len(x)} items")
        return x[0], x[1]

    def _result(self, wire: torch.Tensor, counts: torch.Tensor, handle: DispatchHandle,
                offsets: torch.Tensor | None) -> DispatchResult:
        expert_x, scale = _as_wire(wire, self.hidden_size, self.fp8)
        return DispatchResult(expert_x, counts, handle, offsets, scale)

    def _dispatch(self, x: torch.Tensor, x_scale: torch.Tensor | None, topk_ids: torch.Tensor,
                  topk_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                       DispatchHandle]:
        """Validate, quantise (fp8), run the backend's dispatch: ``(its expert_x -- wire rows
        with fp8 --, counts, handle)``. ``llmcomm::moe_dispatch`` calls this."""
        if x_scale is not None:
            _check_fp8_pair(x, x_scale, self.hidden_size)
        validate_dispatch_args(x, topk_ids, topk_weights, top_k=self.top_k,
                               hidden_size=self.hidden_size, num_experts=self.num_experts,
                               max_tokens=self.max_tokens_per_rank,
                               dtype=self.dtype if x_scale is None else FP8_DTYPE,
                               device=self.device)
        self._check_capture()
        self._call_check("dispatch")  # token counts may differ per rank; op and order may not
        if self._in_flight is not None:
            raise RuntimeError(
                "EPDispatcher.dispatch called while the previous dispatch (generation "
                f"{self._in_flight}) was not combined; call combine() for it first. Receive "
                "buffers are reused, so every rank must alternate dispatch and combine")
        self._backend.check_errors(sync=False)
        if self._warm_hint:
            self._warm_hint = False
            logger.info("EPDispatcher on %s: dispatch before warmup(); each new token-count "
                        "class compiles at its first call (seconds) while the peers wait on "
                        "it -- call warmup() on every rank after creation", group_label(self.group))
        if x.device.type == "cpu" or self._backend.name == "torch" or get_config().check:
            _check_id_range(topk_ids, self.num_experts)
        if self.fp8:
            x = to_wire(x, x_scale, self.dtype)
        expert_x, counts, state = self._backend.dispatch(x, topk_ids, topk_weights)
        self._generation += 1
        self._in_flight = self._generation
        return expert_x, counts, DispatchHandle(x.shape[0], self._generation, state)

    def combine(self, expert_out: torch.Tensor, handle: DispatchResult | DispatchHandle
                ) -> torch.Tensor:
        """``y[t] = sum_k topk_weights[t, k] * expert_out(t, k)``: reduced exactly once.
        Under ``torch.compile`` one opaque op (:mod:`llmcomm.ops`), combining the dispatch in
        flight."""
        if torch.compiler.is_compiling():
            if isinstance(handle, DispatchResult):
                handle = handle.handle
            return torch.ops.llmcomm.moe_combine(expert_out, handle.num_tokens, self._op_key)
        if isinstance(handle, DispatchResult):
            handle = handle.handle
        if not isinstance(handle, DispatchHandle):
            raise TypeError(f"combine() needs the DispatchResult (or its .handle) returned by "
                            f"dispatch(), got {_type_name(handle)}")
        if handle.generation != self._in_flight:
            raise ValueError(
                f"combine() got the handle of dispatch generation {handle.generation}, but the "
                f"dispatch in flight is {self._in_flight}; combine each dispatch once, with its "
                f"own handle")
        shape = self.expert_x_shape
        if not isinstance(expert_out, torch.Tensor):
            raise TypeError(f"expert_out must be a tensor of shape {shape}, got "
                            f"{_type_name(expert_out)}")
        if tuple(expert_out.shape) != shape:
            what = "[rows, hidden], packed" if self.packed else "[local_experts, capacity, hidden]"
            raise ValueError(f"expert_out must have the shape of expert_x {shape} ({what}), "
                             f"got {tuple(expert_out.shape)}")
        if expert_out.dtype != self.dtype:
            raise TypeError(f"expert_out must be {self.dtype} (the dispatcher's dtype), got "
                            f"{expert_out.dtype}; cast it with .to({self.dtype})")
        if expert_out.device != self.device:
            raise ValueError(f"expert_out must be on {self.device}, got {expert_out.device}")
        if not expert_out.is_contiguous():
            expert_out = expert_out.contiguous()
        self._call_check("combine")
        self._backend.check_errors(sync=False)
        y = self._backend.combine(expert_out, handle.state, handle.num_tokens)
        self._in_flight = None
        return y

    def warmup(self, num_tokens: Sequence[int] | None = None, *,
               topk_ids_dtype: torch.dtype | Sequence[torch.dtype] = (torch.int32, torch.int64),
               topk_weights_dtype: torch.dtype = torch.float32) -> int:
        """Compile and load, ahead, every kernel that later ``dispatch``/``combine`` calls with
        these token counts and dtypes would launch; launch nothing. Call it on every rank
        after creation, before serving or capturing CUDA graphs.

        Why: triton compiles a kernel at its first call for each class of arguments it
        specialises (token count ``T == 1``, ``T`` a multiple of 16 -- 0 included -- or any
        other; the ids dtype), and ranks of one batch often hold different token counts. A
        rank that meets a new class compiles (seconds per kernel) while its peers' kernels,
        already launched, spin on its data; past ``LLMCOMM_TIMEOUT_S`` that ends in a
        :class:`CollectiveTimeoutError` and an unusable workspace. After ``warmup`` no call
        with these counts' classes and dtypes compiles.

        Local: no peer is involved, so ranks may call it at different times (it is not
        counted by the call-order check). Backends without kernels of their own (``torch``,
        ``allgather``) have nothing to compile. Compiled kernels also land in triton's disk
        cache, so a later process mostly loads them.

        Args:
            num_tokens: token counts to cover, each in ``[0, max_tokens_per_rank]``. Default
                :func:`warm_token_counts` (one count per class triton tells apart, and the
                maximum).
            topk_ids_dtype: the ids dtype(s) ``dispatch`` will get (each compiles apart).
                Default both int32 (vLLM/SGLang routers) and int64 (``torch.topk``); pass
                the one you use to halve the work.
            topk_weights_dtype: the weights dtype ``dispatch`` will get.

        Returns:
            how many kernel variants are loaded for these counts and dtypes.

        Inputs of other strides or alignment (e.g. a row slice not 16-byte aligned) are
        another class: pass contiguous, freshly allocated tensors as :meth:`dispatch` asks.
        """
        check_warmup_context("EPDispatcher", self.device)
        M = self.max_tokens_per_rank
        counts = warm_counts(num_tokens, warm_token_counts(M), M, "max_tokens_per_rank")
        id_dtypes = (topk_ids_dtype,) if isinstance(topk_ids_dtype, torch.dtype) \
            else tuple(topk_ids_dtype)
        for d in id_dtypes:
            if not isinstance(d, torch.dtype) or d.is_floating_point or d.is_complex \
                    or d == torch.bool:
                raise TypeError(f"warmup: topk_ids_dtype must be integer torch dtype(s) "
                                f"(torch.int32 / torch.int64), got {topk_ids_dtype!r}")
        if not isinstance(topk_weights_dtype, torch.dtype) \
                or not topk_weights_dtype.is_floating_point:
            raise TypeError(f"warmup: topk_weights_dtype must be a floating torch dtype (e.g. "
                            f"torch.float32), got {topk_weights_dtype!r}")
        self._warm_hint = False
        t0 = time.perf_counter()
        n = self._backend.warmup(sorted(set(counts)), id_dtypes, topk_weights_dtype)
        if self.fp8 and self.device.type == "cuda":
            n += warm_quantize(self.hidden_size, self.dtype, self.device)
        logger.info("EPDispatcher.warmup: %d kernel variants loaded for token counts %s, ids "
                    "%s, in %.1f s", n, sorted(set(counts)),
                    [str(d) for d in id_dtypes], time.perf_counter() - t0)
        self._warmed = n
        return n

    def describe(self) -> str:
        """Multi-line, human-readable account of this dispatcher: its shape, the backend (and
        p2p protocol) chosen and why, the memory its static capacity costs, and warm-up."""
        esize = torch.empty(0, dtype=self.dtype).element_size()
        gb = self._cfg.rows * self._cfg.row_width * esize / 1e9
        shape = ", ".join(map(str, self.expert_x_shape))
        ws = self._backend.fingerprint().get("workspace_bytes")
        lines = [repr(self),
                 f"  topology: {self.facts.describe()}",
                 f"  backend:  {self.decision}",
                 f"  memory:   expert_x [{shape}]{' packed' if self.packed else ''}"
                 f"{' fp8 + scales' if self.fp8 else ''} "
                 f"{gb:.3g} GB" + (
                     "" if ws is None else f"; symmetric workspace {ws / 1e9:.3g} GB"),
                 "  warmup:   " + (f"done ({self._warmed} kernel variants loaded)"
                                   if self._warmed is not None else "not called")]
        return "\n".join(lines)

    def check_errors(self, sync: bool = True) -> None:
        """Raise :class:`CollectiveTimeoutError` if a device wait timed out (p2p backend)."""
        self._backend.check_errors(sync=sync)

    def close(self) -> None:
        self._backend.close()

    def __repr__(self) -> str:
        return (f"EPDispatcher(backend={self.backend}, group={group_label(self.group)}, "
                f"experts={self.num_experts} ({self.local_experts}/rank), top_k={self.top_k}, "
                f"hidden={self.hidden_size}, max_tokens_per_rank={self.max_tokens_per_rank}, "
                f"capacity={self.capacity}, dtype={self.dtype}"
                + (", packed" if self.packed else "") + (", fp8" if self.fp8 else "") + ")")

    def _check_capture(self) -> None:
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing() \
                and not self._backend.graph_safe:
            raise CaptureError(
                f"EP backend {self.backend!r} synchronises the host and cannot be captured in a "
                f"CUDA graph; use backend='p2p' (one node) or 'allgather' for graphs, or run "
                f"this layer eagerly")


def warm_token_counts(max_tokens: int) -> list[int]:
    """Token counts :meth:`EPDispatcher.warmup` covers by default: one of each class triton
    compiles apart -- ``0`` (with every multiple of 16), ``1``, ``2`` (any other) -- plus 16
    and ``max_tokens``, which cost nothing more where triton puts them in a class already
    covered and protect against a triton that tells more classes apart."""
    return sorted({0, 1, min(2, max_tokens), min(16, max_tokens), max_tokens})


def _backend_class(name: str) -> type[MoEBackend]:
    if name == "torch":
        return TorchA2ABackend
    if name == "allgather":
        return AllGatherBackend
    if name == "p2p":
        from .p2p import P2PBackend

        return P2PBackend
    raise ValueError(f"unknown EP backend {name!r}; choose one of {EP_BACKENDS}")


# ---------------------------------------------------------------------- validation (pure)

def validate_config(*, num_experts: int, top_k: int, hidden_size: int, max_tokens_per_rank: int,
                    dtype: Any, group_size: int, backend: str, packed: Any = False,
                    packed_align: Any = 1, fp8: Any = False) -> None:
    """Check the constructor arguments; raise TypeError/ValueError saying how to fix them."""
    for name, v in (("num_experts", num_experts), ("top_k", top_k), ("hidden_size", hidden_size),
                    ("max_tokens_per_rank", max_tokens_per_rank)):
        if not is_int(v):
            raise TypeError(f"EPDispatcher {name} must be an int, got {type(v).__name__} {v!r}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if num_experts % group_size:
        lo = num_experts - num_experts % group_size
        raise ValueError(
            f"num_experts={num_experts} is not divisible by the EP group size {group_size}; "
            f"experts are split evenly in contiguous blocks, so use a multiple of {group_size} "
            f"(e.g. {lo or group_size} or {lo + group_size}) or an EP group whose size divides "
            f"{num_experts}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must satisfy 1 <= top_k <= num_experts={num_experts}, "
                         f"got top_k={top_k}")
    if hidden_size < 1:
        raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
    if max_tokens_per_rank < 1:
        raise ValueError(f"max_tokens_per_rank must be >= 1, got {max_tokens_per_rank}; it "
                         f"sizes the static workspaces (the most tokens one dispatch may carry)")
    if not isinstance(dtype, torch.dtype) or dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {[str(d) for d in _FLOAT_DTYPES]}, got {dtype!r}")
    if not isinstance(backend, str) or backend not in ("auto",) + EP_BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + EP_BACKENDS}, got {backend!r}")
    if not isinstance(packed, bool):
        raise TypeError(f"EPDispatcher packed must be a bool (True: expert_x as [rows, hidden] "
                        f"with per-expert offsets), got {type(packed).__name__} {packed!r}")
    if not is_int(packed_align):
        raise TypeError(f"EPDispatcher packed_align must be an int, got "
                        f"{type(packed_align).__name__} {packed_align!r}")
    if packed_align < 1:
        raise ValueError(f"packed_align must be >= 1 (rows a segment is rounded up to), got "
                         f"{packed_align}")
    if packed_align != 1 and not packed:
        raise ValueError(f"packed_align={packed_align} applies to the packed layout only: pass "
                         f"packed=True too, or leave packed_align at 1")
    if not isinstance(fp8, bool):
        raise TypeError(f"EPDispatcher fp8 must be a bool (True: tokens cross the wire as "
                        f"float8_e4m3fn + scales), got {type(fp8).__name__} {fp8!r}")
    if fp8:
        check_fp8_config(hidden_size, dtype)


def check_layout(layout: Any, ranks: list[int], group_size: int) -> None:
    """Refuse a group whose size (or rank list) is not the layout's EP group."""
    if layout is None:
        return
    ep_size = getattr(layout, "ep_size", None)
    if ep_size is None:
        raise TypeError(f"layout must be a ParallelLayout (with .ep_size), got "
                        f"{type(layout).__name__}")
    if ep_size != group_size:
        raise ValueError(
            f"EP workspace/group size mismatch: layout {layout} has ep_size={ep_size} "
            f"(= dp*pcp*tp of one pipeline stage) but the process group passed in has "
            f"{group_size} ranks. Workspaces are sized to the EP group: pass groups.ep from "
            f"layout.create_groups() (not the DP or TP group)")
    ep_groups = getattr(layout, "ep_groups", None)
    if callable(ep_groups) and sorted(ranks) not in [sorted(g) for g in ep_groups()]:
        raise ValueError(f"the group's ranks {ranks} are not an EP group of {layout} "
                         f"(EP groups: {ep_groups()}); pass groups.ep from "
                         f"layout.create_groups()")


def _check_fp8_pair(q: Any, scale: Any, hidden_size: int) -> None:
    """An fp8 dispatcher's ``(q, scale)`` input: q's dtype, scale's type, dtype and shape."""
    if not isinstance(q, torch.Tensor) or q.dtype != FP8_DTYPE:
        raise TypeError(f"dispatch: q of an fp8 (q, scale) pair must be a float8_e4m3fn tensor "
                        f"[T, {hidden_size}], got {_type_name(q)}")
    want = (q.shape[0], hidden_size // FP8_BLOCK) if q.dim() == 2 else None
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32:
        raise TypeError(f"dispatch: scale of an fp8 (q, scale) pair must be a float32 tensor "
                        f"[T, {hidden_size // FP8_BLOCK}] (one per {FP8_BLOCK} channels), got "
                        f"{_type_name(scale)}")
    if want is not None and tuple(scale.shape) != want:
        raise ValueError(f"dispatch: scale must have shape [T, hidden_size / {FP8_BLOCK}] = "
                         f"{list(want)} for q of shape {list(q.shape)}, got {list(scale.shape)}")
    if scale.device != q.device:
        raise ValueError(f"dispatch: scale is on {scale.device}, q on {q.device}; put both on "
                         f"the dispatcher's device")


def validate_dispatch_args(x: Any, topk_ids: Any, topk_weights: Any, *, top_k: int,
                           hidden_size: int, num_experts: int, max_tokens: int,
                           dtype: torch.dtype, device: torch.device) -> None:
    """Types, dtypes, shapes, devices and the token bound (no device sync)."""
    for name, t in (("x", x), ("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"dispatch: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2 or x.shape[1] != hidden_size:
        raise ValueError(f"dispatch: x must have shape [T, hidden_size={hidden_size}], got "
                         f"{tuple(x.shape)}")
    T = x.shape[0]
    if T > max_tokens:
        raise ValueError(f"dispatch: x has {T} tokens but the dispatcher was created with "
                         f"max_tokens_per_rank={max_tokens}; split the batch or create it with "
                         f"a larger max_tokens_per_rank")
    if x.dtype != dtype:
        raise TypeError(f"dispatch: x must be {dtype} (the dispatcher's dtype), got {x.dtype}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype.is_complex or \
            topk_ids.dtype == torch.bool:
        raise TypeError(f"dispatch: topk_ids must be an integer tensor (int32/int64), got "
                        f"{topk_ids.dtype}")
    if not topk_weights.dtype.is_floating_point:
        raise TypeError(f"dispatch: topk_weights must be floating point (e.g. float32), got "
                        f"{topk_weights.dtype}")
    for name, t in (("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if tuple(t.shape) != (T, top_k):
            raise ValueError(f"dispatch: {name} must have shape [T={T}, top_k={top_k}], got "
                             f"{tuple(t.shape)}")
    for name, t in (("x", x), ("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if t.device != device:
            raise ValueError(f"dispatch: {name} is on {t.device} but the dispatcher works on "
                             f"{device}; move it with .to({str(device)!r})")
        if not t.is_contiguous():
            raise ValueError(f"dispatch: {name} must be contiguous; call .contiguous() first")


def _check_id_range(topk_ids: torch.Tensor, num_experts: int) -> None:
    """Value check of the ids (reads the device on CUDA: only for backends that sync anyway)."""
    if topk_ids.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.stack([topk_ids.min(), topk_ids.max()]).tolist())
    if lo < 0 or hi >= num_experts:
        bad = lo if lo < 0 else hi
        raise ValueError(f"dispatch: topk_ids must lie in [0, num_experts={num_experts}), found "
                         f"{bad}; the router must emit global expert ids")
