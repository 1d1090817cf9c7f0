"""``TPCommunicator``: the public allreduce API over one tensor-parallel group.

Creation is collective over the group and happens once, before any CUDA-graph capture:

1. gather the group's topology facts (with a deadline) and probe optional libraries;
2. pick the backend and the fusion mode with :mod:`llmcomm.policy` (same answer on every rank);
3. build the backend (workspaces are allocated and rendezvoused here, on this group only);
4. agree a launch fingerprint across the group; a mismatch is a ConfigMismatchError.

Per call it validates the inputs (dtype, device, 2-D ``[tokens, hidden]``, contiguity,
``tokens <= max_tokens``), allocates the outputs and hands them to the backend.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from .. import __version__, policy
from .._warn import warn_once
from .._warmup import check_warmup_context, warm_counts
from ..agree import CallChecker, agree, group_label, group_ranks
from ..topology import TopologyFacts, gather_topology
from .torch_backend import TorchAllReduceBackend

logger = logging.getLogger(__name__)

_SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _group_device(group: Any) -> torch.device:
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class TPCommunicator:
    """Allreduce, and allreduce + residual + RMSNorm (+FP8), over a TP group.

    Args:
        group: the TP process group (e.g. ``ParallelLayout(...).create_groups().tp``).
        hidden_size: H, the last dimension of every input.
        dtype: bfloat16, float16 or float32: the dtype of every input.
        max_tokens: the largest T any call will carry; sizes the workspace.
        backend: "auto" | "torch" | "p2p" | "flashinfer".
        layout: the ParallelLayout (its ``pp`` feeds the fusion decision); or give ``pp_size``.
        device: defaults to the current CUDA device for NCCL groups, CPU otherwise.

    ``decision`` tells which backend was chosen and why; ``fusion`` how fused calls run.
    """

    def __init__(self, group: Any, hidden_size: int, dtype: torch.dtype, max_tokens: int,
                 backend: str = "auto", *, layout: Any = None, pp_size: int | None = None,
                 device: torch.device | None = None) -> None:
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        if dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"dtype must be one of torch.bfloat16, torch.float16, torch.float32; "
                            f"got {dtype}")
        if backend not in policy.REQUESTS:
            raise ValueError(f"backend must be one of {', '.join(policy.REQUESTS)}; got {backend!r}")
        if pp_size is None:
            pp_size = layout.pp if layout is not None else 1
        self.group = group
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.max_tokens = max_tokens
        self.requested = backend
        self.pp_size = pp_size
        self.device = device if device is not None else _group_device(group)
        self.ranks = group_ranks(group)
        self.world_size = len(self.ranks)
        self.label = group_label(group)
        self._call_check = CallChecker(group, "TPCommunicator")
        self._warmed: int | None = None
        self._warned: set[str] = set()

        self.facts: TopologyFacts = gather_topology(group, self.device)
        self.fi_caps = self._probe_flashinfer()  # collective on GPU groups, whatever is asked
        self.decision = policy.resolve_allreduce_backend(
            backend, self.facts, self.fi_caps, pp_size=pp_size, hidden_size=hidden_size)
        self.fusion = policy.allreduce_fusion_decision(
            self.decision.choice, self.facts, pp_size, self.fi_caps)
        self.fusion_fp8 = policy.allreduce_fusion_decision(
            self.decision.choice, self.facts, pp_size, self.fi_caps, quant=True)
        for d in (self.fusion, self.fusion_fp8):  # fusion asked for and not used is never silent
            if d.choice != "fused" and self.decision.choice != "torch":
                warn_once(logger, f"fusion:{self.decision.choice}:{d}",
                          f"TPCommunicator on {self.label}: fusion not fully used with backend "
                          f"{self.decision.choice}: {d}")
        self._torch = TorchAllReduceBackend(group, hidden_size, dtype, max_tokens, self.device)
        self.backend = self._make_backend(self.decision.choice)
        self.fingerprint = {
            "llmcomm_version": __version__, "world_size": self.world_size,
            "hidden_size": hidden_size, "dtype": str(dtype), "max_tokens": max_tokens,
            "backend": self.decision.choice, "fusion": self.fusion.choice,
            "fusion_fp8": self.fusion_fp8.choice, "pp_size": pp_size,
            "strategy_table": sorted(policy.STRATEGY_THRESHOLDS.items()),
            **{f"backend.{k}": v for k, v in self.backend.fingerprint().items()},
        }
        agree(self.fingerprint, group, "TPCommunicator fingerprint")
        from .. import ops

        self._op_key = ops.register(self)   # what torch.compile'd graphs call (llmcomm.ops)
        logger.info("TPCommunicator on %s: backend %s; fusion %s", self.label, self.decision,
                    self.fusion)

    # ------------------------------------------------------------------ creation helpers
    def _probe_flashinfer(self) -> Any:
        if self.device.type != "cuda":
            return None
        from .. import probe

        return probe.agree_flashinfer(probe.flashinfer(), self.group)

    def _make_backend(self, name: str) -> Any:
        args = (self.group, self.hidden_size, self.dtype, self.max_tokens, self.device)
        if name == "torch":
            return self._torch
        if name == "p2p":
            from .p2p import P2PAllReduceBackend

            return P2PAllReduceBackend(*args)
        if name == "flashinfer":
            from .flashinfer import FlashInferAllReduceBackend

            variant = policy.flashinfer_variant(self.facts.num_nodes, self.facts.multicast_allowed,
                                                getattr(self.fi_caps, "has_mnnvl", None))
            fused = self.fusion.choice
            return FlashInferAllReduceBackend(*args, caps=self.fi_caps, variant=variant.choice,
                                              fusion=fused, pp_size=self.pp_size,
                                              gpus_per_node=self.facts.gpus_per_node or None)
        raise ValueError(f"unknown backend {name!r}")  # pragma: no cover

    # ------------------------------------------------------------------ validation
    def _check_tensor(self, name: str, t: Any, shape: tuple[int, ...] | None = None,
                      dtype: torch.dtype | tuple[torch.dtype, ...] | None = None) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        dtypes = dtype if isinstance(dtype, tuple) else (dtype or self.dtype,)
        if t.dtype not in dtypes:
            want = " or ".join(str(d) for d in dtypes)
            raise TypeError(f"{name} must have dtype {want} (the communicator's dtype), got "
                            f"{t.dtype}; cast it with .to({dtypes[0]}) or create a communicator "
                            f"for {t.dtype}")
        if t.device.type != self.device.type or (
                self.device.type == "cuda" and t.device.index != self.device.index):
            raise ValueError(f"{name} is on {t.device}, but this communicator runs on "
                             f"{self.device}; move it with .to('{self.device}')")
        if shape is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (got strides {t.stride()}); "
                             f"call .contiguous() first")

    def _check_input(self, x: Any) -> int:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.hidden_size:
            raise ValueError(f"x must be 2-D [tokens, {self.hidden_size}], got shape "
                             f"{list(x.shape)}; reshape it with x.view(-1, {self.hidden_size})")
        self._check_tensor("x", x)
        return int(x.shape[0])

    def _route(self, op: str, tokens: int) -> Any:
        """The backend for a call of ``tokens`` rows: the chosen one, or the torch fallback."""
        if tokens <= self.max_tokens:
            return self.backend
        if self.requested == "auto":
            if self.backend is not self._torch and op not in self._warned:
                self._warned.add(op)
                logger.warning("%s: %d tokens exceed max_tokens=%d of the %s workspace; using the "
                               "torch backend for such calls (create the communicator with "
                               "max_tokens=%d to keep them on %s)", op, tokens, self.max_tokens,
                               self.decision.choice, tokens, self.decision.choice)
            return self._torch
        raise ValueError(f"{op}: x has {tokens} tokens but the {self.decision.choice} workspace "
                         f"holds max_tokens={self.max_tokens}; create the communicator with "
                         f"max_tokens>={tokens}, or use backend='auto' to fall back to the torch backend for "
                         f"larger calls")

    # ------------------------------------------------------------------ public ops
    def all_reduce(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Sum of ``x`` [T, H] over the group's ranks; returns ``out`` (new if not given).
        Under ``torch.compile`` one opaque op (:mod:`llmcomm.ops`)."""
        if torch.compiler.is_compiling():
            if out is None:
                return torch.ops.llmcomm.all_reduce(x, self._op_key)
            torch.ops.llmcomm.all_reduce_out(x, out, self._op_key)
            return out
        tokens = self._check_input(x)
        if out is None:
            out = torch.empty_like(x)
        else:
            self._check_tensor("out", out, tuple(x.shape))
        self._call_check("all_reduce", tokens=tokens)
        self._route("all_reduce", tokens).all_reduce(x, out)
        return out

    def all_reduce_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor,
                                weight: torch.Tensor, eps: float = 1e-6,
                                quant_scale: torch.Tensor | None = None):
        """``residual_out = allreduce(x) + residual``; ``normed = rms_norm(residual_out) * weight``.

        Shapes: x, residual ``[T, H]`` (communicator dtype); weight ``[H]`` (dtype or float32).
        Returns ``(normed, residual_out)``, or ``(normed_fp8, residual_out, normed)`` when
        ``quant_scale`` (a float32 tensor of one element, the dequantisation scale) is given.
        Exact semantics: :mod:`llmcomm.allreduce.base`. Under ``torch.compile`` one opaque op
        (:mod:`llmcomm.ops`).
        """
        if torch.compiler.is_compiling():
            if quant_scale is None:
                return torch.ops.llmcomm.all_reduce_add_rms_norm(x, residual, weight, float(eps),
                                                                 self._op_key)
            return torch.ops.llmcomm.all_reduce_add_rms_norm_fp8(x, residual, weight, float(eps),
                                                                 quant_scale, self._op_key)
        tokens = self._check_input(x)
        self._check_tensor("residual", residual, tuple(x.shape))
        self._check_tensor("weight", weight, (self.hidden_size,), (self.dtype, torch.float32))
        if not isinstance(eps, (int, float)) or eps < 0:
            raise ValueError(f"eps must be a non-negative float, got {eps!r}")
        if quant_scale is not None:
            self._check_tensor("quant_scale", quant_scale, None, (torch.float32,))
            if quant_scale.numel() != 1:
                raise ValueError(f"quant_scale must hold one element (a static per-tensor "
                                 f"scale), got shape {list(quant_scale.shape)}")
        self._call_check("all_reduce_add_rms_norm", tokens=tokens,
                         fp8=quant_scale is not None)
        normed = torch.empty_like(x)
        residual_out = torch.empty_like(x)
        fp8 = (torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
               if quant_scale is not None else None)
        backend = self._route("all_reduce_add_rms_norm", tokens)
        backend.all_reduce_add_rms_norm(x, residual, weight, float(eps), normed, residual_out,
                                        quant_scale=quant_scale, fp8_out=fp8)
        if quant_scale is None:
            return normed, residual_out
        return fp8, residual_out, normed

    def check_errors(self, sync: bool = True) -> None:
        """Raise :class:`~llmcomm.errors.CollectiveTimeoutError` if a device wait of this
        communicator's kernels timed out (``p2p``: a missing peer). ``sync=True`` waits for the
        current stream first, so every call launched so far is checked; call it after
        synchronising when calls run in CUDA-graph replays (eager calls check the host's copy
        of the error record at their start anyway). Backends without device waits of their own
        (``torch``: NCCL's watchdog; ``flashinfer``) have nothing to report."""
        fn = getattr(self.backend, "check_errors", None)
        if fn is not None:
            fn(sync)

    def warmup(self, num_tokens: Sequence[int] | None = None, *,
               weight_dtypes: Sequence[torch.dtype] | None = None, fp8: bool = True) -> int:
        """Compile and load, ahead, every kernel later calls with these token counts would
        launch; launch nothing. Call it on every rank after creation, before capturing CUDA
        graphs (the p2p backend refuses to compile inside a capture: :class:`CaptureError`).

        Local: no peer is involved, and it is not counted by the call-order check. Only the
        ``p2p`` backend has triton kernels of its own; ``torch`` and ``flashinfer`` return 0
        (FlashInfer builds and loads its own module; build it once before spawning ranks).

        Args:
            num_tokens: token counts to cover, each in ``[0, max_tokens]``. Default: all of
                them (triton does not specialise the kernels on ``T``, so this costs one
                compile per distinct launch plan, a handful, not one per count).
            weight_dtypes: the RMSNorm weight dtype(s) fused calls will get. Default the
                communicator's dtype and float32.
            fp8: cover the fused calls with ``quant_scale`` (FP8 output) too.

        Returns:
            how many kernel variants are loaded (0 for backends without kernels).

        Inputs that are not 16-byte aligned (e.g. a row slice) are another class: such a call
        still compiles at its first eager call and raises inside a capture.
        """
        check_warmup_context("TPCommunicator", self.device)
        counts = None if num_tokens is None else warm_counts(num_tokens, [], self.max_tokens,
                                                              "max_tokens")
        wds = None if weight_dtypes is None else (
            (weight_dtypes,) if isinstance(weight_dtypes, torch.dtype) else tuple(weight_dtypes))
        if wds is not None and (not wds or any(d not in (self.dtype, torch.float32)
                                                for d in wds)):
            raise TypeError(f"warmup: weight_dtypes must be {self.dtype} and/or torch.float32 "
                            f"(what all_reduce_add_rms_norm accepts), got {weight_dtypes!r}")
        fn = getattr(self.backend, "warmup", None)
        if fn is None:
            self._warmed = 0
            return 0
        t0 = time.perf_counter()
        n = fn(counts, wds, bool(fp8))
        logger.info("TPCommunicator.warmup: %d kernel variants loaded in %.1f s", n,
                    time.perf_counter() - t0)
        self._warmed = n
        return n

    def describe(self) -> str:
        """Multi-line, human-readable account of the choices made for this group."""
        lines = [f"TPCommunicator group={self.label} hidden={self.hidden_size} dtype={self.dtype} "
                 f"max_tokens={self.max_tokens}",
                 f"  topology: {self.facts.describe()}",
                 f"  backend:  {self.decision}",
                 f"  fusion:   {self.fusion}",
                 f"  fp8:      {self.fusion_fp8}",
                 "  warmup:   " + (f"done ({self._warmed} kernel variants loaded)"
                                   if self._warmed is not None else "not called")]
        for r in getattr(self.backend, "reasons", ()) or ():
            lines.append(f"  note:     {r}")
        return "\n".join(lines)

    def close(self) -> None:
        self.backend.close()

    def __repr__(self) -> str:
        return (f"TPCommunicator(group={self.label}, backend={self.decision.choice!r}, "
                f"fusion={self.fusion.choice!r})")
