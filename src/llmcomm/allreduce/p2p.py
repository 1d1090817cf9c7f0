"""The ``p2p`` allreduce backend: Triton kernels over torch symmetric memory, one node, NVLink.

Creation (collective over ``group``, never WORLD unless that is the group, before any capture):
one symmetric workspace is allocated and rendezvoused on the group, flags zeroed, Lamport slots
filled with the sentinel, then a group barrier. Nothing is allocated per call.

Per call the strategy is ``policy.allreduce_strategy(T * H * itemsize, W)``: ``lamport`` (push,
sentinel-marked data, no flags), ``oneshot`` (stage, flag barrier, pull all peers) or ``twoshot``
(stage, barrier, reduce own share, barrier, pull the others' results). Every launch parameter
(grid, block, warps, push chunk) is a pure function of (strategy, T, H, dtype, W,
:class:`LaunchTable`), see :func:`launch_plan`; :meth:`P2PAllReduceBackend.fingerprint` lists the
table and :data:`KERNEL_TABLE_VERSION`.

Error policy (no hang): every spin-wait in the kernels has a deadline of ``LLMCOMM_TIMEOUT_S``.
On expiry the kernel writes an error record (missing ranks bitmask, program, phase, epoch) into
device state and into a pinned host mirror, and finishes without waiting again; later calls
skip their waits too. The host reads the mirror without synchronising at the start of every
eager (non-capturing) call, and :meth:`check_errors` synchronises the stream and reads it: either
raises :class:`~llmcomm.errors.CollectiveTimeoutError` naming the op, the group's ranks and the
missing rank(s). Under CUDA-graph replay call :meth:`check_errors` after synchronising. A
backend that timed out is broken for good (peers' epochs differ): create a new communicator.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch

from .. import __version__, policy
from ..config import get_config
from ..errors import BackendUnavailableError, CaptureError, CollectiveTimeoutError
from ..kernels import LAUNCH_OPTIONS

logger = logging.getLogger(__name__)

#: bump whenever kernels or :func:`launch_plan` change (part of the fingerprint)
KERNEL_TABLE_VERSION = "p2p-4"
MAX_PROGRAMS = 264          # flag slots per rank; flag-barrier grids never exceed this
LAMPORT_MAX_PROGRAMS = 128  # Lamport needs every program resident (no pairwise barrier);
                            # 128 CTAs fit one per SM of a 132-SM H200 even at 16 warps
MAX_NORM_HIDDEN = 16384     # fused kernels keep one row in registers
ERR_OFF = 8                 # error record offset in the state tensor (matches kernels)
_ALIGN = 4096
_PHASES = {1: "one-shot barrier", 2: "two-shot barrier 1", 3: "two-shot barrier 2",
           4: "Lamport poll", 5: "Lamport poll (fused)"}


def _next_pow2(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _align(n: int, a: int = _ALIGN) -> int:
    return _cdiv(n, a) * a


@dataclasses.dataclass(frozen=True)
class LaunchTable:
    """Launch knobs of :func:`launch_plan` (defaults: the tuned table of 2026-11-22).

    Every rank of a group must use the same table (it is part of the fingerprint). The kernels
    are unchanged by any value here; only grid, warps and tile sizes move.

    Attributes:
        lamport_max_programs: Lamport grid cap. Every Lamport program must be resident (no
            pairwise barrier), so the effective cap is also ``128 * (16 // num_warps)``: 128 at
            16 warps, 256 at <= 8 warps (2 CTAs per SM on a 132-SM H200). At most 256.
        lamport_chunk_vecs: 16-byte vectors per thread per Lamport push iteration (power of 2);
            more keeps more loads/stores in flight per program.
        lamport_rows_min_tiles: Lamport calls with at least this many tiles (rows when fused,
            ``flat_block`` chunks otherwise) use the software-pipelined ``lamport_rows_kernel``
            (each program pushes its tile ``i + lamport_lag`` then reduces tile ``i``); smaller
            ones use ``lamport_kernel`` (all pushes, then all reduces). 0 = never.
        lamport_lag: tiles a program pushes ahead of the one it reduces (1..4).
        lamport_rows_wide_tiles: a rows-kernel call with at most this many tiles gets one
            program per tile (up to the resident cap of ``128 * (16 // num_warps)``, at most
            256) instead of ``lamport_max_programs``: with one tile each there is nothing to
            pipeline, and more programs keep more rows in flight. 0 = never.
        norm_max_warps: warps of a fused (one row per tile) program; the kernel uses
            ``min(norm_max_warps, max(norm_min_warps, next_pow2(H) // 512))``.
        norm_min_warps: see ``norm_max_warps``.
        flat_block: elements per tile of the unfused kernels (power of 2).
        flat_warps: warps of the unfused kernels.
        oneshot_max_programs: one-shot grid cap (<= MAX_PROGRAMS flag slots).
        twoshot_max_programs: two-shot grid cap (<= MAX_PROGRAMS flag slots).
    """

    lamport_max_programs: int = 128
    lamport_chunk_vecs: int = 1
    lamport_rows_min_tiles: int = 64
    lamport_lag: int = 1
    lamport_rows_wide_tiles: int = 256
    norm_max_warps: int = 16
    norm_min_warps: int = 4
    flat_block: int = 4096
    flat_warps: int = 8
    oneshot_max_programs: int = 264
    twoshot_max_programs: int = 264

    def __post_init__(self) -> None:
        for name in ("lamport_chunk_vecs", "norm_max_warps", "norm_min_warps", "flat_block",
                     "flat_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"LaunchTable.{name} must be a power of 2, got {v}")
        if self.norm_min_warps > self.norm_max_warps or self.norm_max_warps > 16 \
                or self.flat_warps > 16:
            raise ValueError(f"LaunchTable warps must satisfy norm_min_warps <= norm_max_warps "
                             f"<= 16 and flat_warps <= 16, got {self}")
        if not 1 <= self.lamport_lag <= 4 or self.lamport_rows_min_tiles < 0 \
                or self.lamport_rows_wide_tiles < 0:
            raise ValueError(f"LaunchTable needs 1 <= lamport_lag <= 4, lamport_rows_min_tiles "
                             f">= 0 and lamport_rows_wide_tiles >= 0, got {self.lamport_lag}, "
                             f"{self.lamport_rows_min_tiles}, {self.lamport_rows_wide_tiles}")
        if not 1 <= self.lamport_max_programs <= 256:
            raise ValueError(f"LaunchTable.lamport_max_programs must be in [1, 256], got "
                             f"{self.lamport_max_programs}")
        for name in ("oneshot_max_programs", "twoshot_max_programs"):
            if not 1 <= getattr(self, name) <= MAX_PROGRAMS:
                raise ValueError(f"LaunchTable.{name} must be in [1, {MAX_PROGRAMS}] (flag "
                                 f"slots), got {getattr(self, name)}")

    def as_dict(self) -> dict[str, int]:
        """The knobs as a plain dict (fingerprints, result files)."""
        return dataclasses.asdict(self)


DEFAULT_TABLE = LaunchTable()


def launch_plan(strategy: str, norm: bool, tokens: int, hidden: int, itemsize: int,
                world_size: int, table: LaunchTable = DEFAULT_TABLE) -> dict[str, int]:
    """Launch parameters of one call: a pure function of its arguments (identical on all ranks).

    Returns ``{"grid", "block", "num_warps", "chunk", "rows", "lag"}``: ``chunk`` is the push
    chunk of ``lamport_kernel``; ``rows`` = 1 selects ``lamport_rows_kernel`` with ``lag``.
    """
    if norm:
        # never more threads than row elements: a polled element held by two threads is two
        # volatile loads that can disagree while a peer's write lands (docs/kernels.md)
        block = max(32, _next_pow2(hidden))
        num_warps = min(table.norm_max_warps, max(table.norm_min_warps, block // 512),
                        block // 32)
        tiles = tokens
    else:
        block = table.flat_block
        num_warps = table.flat_warps
        tiles = _cdiv(tokens * hidden, block)
    nt = 32 * num_warps
    vec = 8 if itemsize == 2 else 4  # elements per 16-byte vector
    chunk = vec * nt * table.lamport_chunk_vecs
    rows = 0
    if strategy == "lamport":
        cap = min(table.lamport_max_programs, LAMPORT_MAX_PROGRAMS * max(1, 16 // num_warps))
        rows = int(0 < table.lamport_rows_min_tiles <= tiles)
        if rows and tiles <= table.lamport_rows_wide_tiles:
            grid = min(256, LAMPORT_MAX_PROGRAMS * max(1, 16 // num_warps), tiles)
        elif rows:
            grid = min(cap, tiles)
        else:
            grid = min(cap, max(tiles, _cdiv(tokens * hidden, chunk)))
    elif strategy == "oneshot":
        grid = min(table.oneshot_max_programs, tiles)
    elif strategy == "twoshot":
        grid = min(table.twoshot_max_programs, _cdiv(tiles, world_size))
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    return {"grid": max(1, grid), "block": block, "num_warps": num_warps, "chunk": chunk,
            "rows": rows, "lag": table.lamport_lag}


class P2PAllReduceBackend:
    """Allreduce (+ residual + RMSNorm (+ FP8)) over NVLink peer memory for one TP group.

    Args:
        group: the TP process group (NCCL, all ranks on one node with peer access).
        hidden_size: H (multiple of 8; <= 16384 for the fused ops).
        dtype: bfloat16, float16 or float32.
        max_tokens: largest T of any call; sizes the workspace (2 stages of T*H + Lamport slots).
        device: this rank's CUDA device.
        table: launch knobs (:class:`LaunchTable`; default: the tuned table). Must be equal on
            every rank; part of :meth:`fingerprint`. Benchmarks may replace :attr:`table` between
            calls (on every rank alike, outside capture).
        lamport_max_bytes: size of one Lamport receive slot (bytes per rank); default: the
            policy's Lamport threshold for this world size. Benchmarks pass more to time forced
            Lamport calls above the threshold.

    Semantics: see :mod:`llmcomm.allreduce.base` (fp32 sum in rank order; bitwise identical on
    every rank).
    """

    name = "p2p"

    def __init__(self, group: Any, hidden_size: int, dtype: torch.dtype, max_tokens: int,
                 device: torch.device, table: LaunchTable | None = None,
                 lamport_max_bytes: int | None = None) -> None:
        import torch.distributed as dist

        from ..agree import exchange

        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise TypeError(f"p2p backend supports bfloat16, float16, float32; got {dtype}")
        if hidden_size % 8:
            raise ValueError(f"p2p backend needs hidden_size % 8 == 0, got {hidden_size}")
        if hidden_size > MAX_NORM_HIDDEN:
            raise ValueError(f"p2p backend supports hidden_size <= {MAX_NORM_HIDDEN}, got "
                             f"{hidden_size}; use backend='torch'")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if table is not None and not isinstance(table, LaunchTable):
            raise TypeError(f"table must be a LaunchTable, got {type(table).__name__}")
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"p2p backend needs a CUDA device, got {device}")
        if torch.cuda.is_current_stream_capturing():
            raise CaptureError("P2PAllReduceBackend is being created during CUDA-graph capture; "
                               "create the communicator before capturing (its workspace is "
                               "allocated and rendezvoused collectively at creation)")
        try:
            import triton  # noqa: F401
            import torch.distributed._symmetric_memory as symm_mem
        except ImportError as e:
            raise BackendUnavailableError(f"p2p backend needs triton and torch symmetric memory: "
                                          f"{e}; install triton or use backend='torch'") from e
        from ..kernels import allreduce as kernels

        self._k = kernels
        self.group = group
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.max_tokens = max_tokens
        self.device = device
        #: launch knobs (see :class:`LaunchTable`); equal on every rank
        self.table = table if table is not None else DEFAULT_TABLE
        self.ranks = list(dist.get_process_group_ranks(group))
        self.world_size = len(self.ranks)
        self.rank = dist.get_rank(group)
        if self.world_size > 32:
            raise ValueError(f"p2p backend supports at most 32 ranks, the group has "
                             f"{self.world_size}")
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        #: programmatic dependent launch (sm_90+): the launch overlaps the previous kernel's tail
        self.use_pdl = torch.cuda.get_device_capability(device) >= (9, 0)
        self.timeout_s = get_config().timeout_s
        self._timeout_ns = int(self.timeout_s * 1e9)

        # ---- workspace layout (bytes), identical on every rank
        W = self.world_size
        self.msg_elems = max_tokens * hidden_size
        if lamport_max_bytes is not None and lamport_max_bytes < 1:
            raise ValueError(f"lamport_max_bytes must be >= 1, got {lamport_max_bytes}")
        lamport_max = lamport_max_bytes or self._lamport_max_bytes()
        self.slot_elems = _align(min(self.msg_elems, _cdiv(lamport_max, self.itemsize)), 256)
        self.flag_off = 0
        self.stage_off = _align(MAX_PROGRAMS * W * 4)
        self.lamp_off = self.stage_off + _align(2 * self.msg_elems * self.itemsize)
        total = self.lamp_off + _align(3 * W * self.slot_elems * self.itemsize)
        self.workspace_bytes = total

        with torch.cuda.device(device):
            self._buf = symm_mem.empty(total, dtype=torch.uint8, device=device)
            self._buf[: self.stage_off].zero_()
            lam = self._buf[self.lamp_off:].view(torch.int16 if self.itemsize == 2 else
                                                 torch.int32)
            lam.fill_(-(2 ** 15) if self.itemsize == 2 else -(2 ** 31))
            torch.cuda.synchronize(device)
            group_name = group.group_name
            if tuple(int(v) for v in torch.__version__.split(".")[:2] if v.isdigit()) < (2, 11):
                try:
                    symm_mem.enable_symm_mem_for_group(group_name)
                except Exception:  # noqa: BLE001 - deprecated / already enabled
                    pass
            # every rank must arrive before torch's rendezvous, which has no deadline of ours
            exchange("ready", group, "p2p allreduce workspace")
            self._hdl = symm_mem.rendezvous(self._buf, group_name)
            off = self._buf.data_ptr() - self._hdl.buffer_ptrs[self._hdl.rank]
            offs = exchange(off, group, "p2p allreduce workspace offsets")
            if len(set(offs)) != 1:
                raise BackendUnavailableError(f"symmetric buffer offsets differ across ranks "
                                              f"({offs}); cannot address peers")
            self._peers = torch.tensor([p + off for p in self._hdl.buffer_ptrs],
                                       dtype=torch.int64, device=device)
            self._state = torch.zeros(16, dtype=torch.int32, device=device)
            self._host_err = torch.zeros(8, dtype=torch.int32, pin_memory=True)
            self._host_err_np = self._host_err.numpy()
            self._dummy_scale = torch.ones(1, dtype=torch.float32, device=device)
            self._dummy_fp8 = torch.empty(1, dtype=torch.float8_e4m3fn, device=device)
            torch.cuda.synchronize(device)
            # nobody writes into a peer before it is ready (host barrier with a deadline)
            exchange("initialised", group, "p2p allreduce workspace")
        self._warm: set[tuple] = set()
        #: tests/benchmarks only: force "lamport" | "oneshot" | "twoshot" (None = policy)
        self.force_strategy: str | None = None
        self._closed = False
        self._last_op = "all_reduce"
        self.last_launch: tuple[dict[str, int], Any] | None = None
        logger.info("p2p backend on ranks %s: workspace %.1f MiB (max_tokens=%d, hidden=%d, %s, "
                    "Lamport slot %d elems)", self.ranks, total / 2 ** 20, max_tokens,
                    hidden_size, dtype, self.slot_elems)

    # ------------------------------------------------------------------ facts
    def _lamport_max_bytes(self) -> int:
        table = policy.STRATEGY_THRESHOLDS
        key = next((s for s in sorted(table) if s >= self.world_size), max(table))
        return int(table[key][0])

    def fingerprint(self) -> dict[str, Any]:
        """Everything launches depend on; must be identical on every rank of the group."""
        return {"kernel_table": KERNEL_TABLE_VERSION, "llmcomm_version": __version__,
                "world_size": self.world_size, "hidden_size": self.hidden_size,
                "dtype": str(self.dtype), "max_tokens": self.max_tokens,
                "max_programs": MAX_PROGRAMS, "lamport_max_programs": LAMPORT_MAX_PROGRAMS,
                "launch_table": sorted(self.table.as_dict().items()),
                "slot_elems": self.slot_elems, "pdl": self.use_pdl,
                "workspace_bytes": self.workspace_bytes,
                "strategy_table": sorted(policy.STRATEGY_THRESHOLDS.items())}

    def strategy(self, tokens: int) -> str:
        """The strategy a call of ``tokens`` rows uses (pure function of size and W)."""
        if self.force_strategy is not None:
            if self.force_strategy == "lamport" and tokens * self.hidden_size > self.slot_elems:
                raise ValueError(f"forced lamport: {tokens} tokens exceed the Lamport slot")
            return self.force_strategy
        nbytes = tokens * self.hidden_size * self.itemsize
        choice = policy.allreduce_strategy(nbytes, self.world_size).choice
        if choice == "lamport" and tokens * self.hidden_size > self.slot_elems:
            choice = "oneshot"
        if self.world_size == 1:
            choice = "oneshot"
        return choice

    # ------------------------------------------------------------------ errors
    def check_errors(self, synchronize: bool = True) -> None:
        """Raise CollectiveTimeoutError if any kernel of this backend timed out.

        ``synchronize=True`` waits for the current stream first (so every launched call is
        checked); ``False`` reads the pinned host mirror as it is now (no synchronisation).
        """
        if synchronize and not torch.cuda.is_current_stream_capturing():
            torch.cuda.current_stream(self.device).synchronize()
        rec = self._host_err_np
        if rec[0] == 0:
            return
        bits = int(rec[1]) & 0xFFFFFFFF
        missing = [self.ranks[i] for i in range(self.world_size) if bits >> i & 1]
        phase, pid, epoch = int(rec[3]), int(rec[2]), int(rec[4])
        if phase in (1, 2, 3) and 0 <= pid < MAX_PROGRAMS and self._buf is not None:
            # flag barriers: read this rank's flags for that program on the host (the kernel
            # is done) and name every peer whose flag is behind the value it waited for
            want = epoch * 4 + (2 if phase == 3 else 1)
            try:
                flags = self._buf[: MAX_PROGRAMS * self.world_size * 4].view(torch.int32)
                row = flags.view(MAX_PROGRAMS, self.world_size)[pid].tolist()
                behind = [self.ranks[i] for i, v in enumerate(row)
                          if i != self.rank and ((v - want + 2 ** 31) % 2 ** 32) - 2 ** 31 < 0]
            except Exception:  # noqa: BLE001 - attribution is best effort; keep the kernel's
                behind = []
            if behind:
                missing = behind
        detail = (f"program {pid}, {_PHASES.get(phase, 'phase ' + str(phase))}, call #{epoch} "
                  f"of this communicator, kernel mask {bits:#x}; the p2p backend is unusable "
                  f"now, create a new communicator")
        raise CollectiveTimeoutError(self._last_op, f"ranks {self.ranks}", missing,
                                     self.timeout_s, detail)

    # ------------------------------------------------------------------ ops
    def _validate(self, x: torch.Tensor) -> int:
        if self._closed:
            raise ValueError("this p2p backend was closed")
        if x.dim() != 2 or x.shape[1] != self.hidden_size:
            raise ValueError(f"x must be [tokens, {self.hidden_size}], got {list(x.shape)}")
        tokens = int(x.shape[0])
        if tokens > self.max_tokens:
            raise ValueError(f"x has {tokens} tokens but the p2p workspace holds max_tokens="
                             f"{self.max_tokens}; create the communicator with max_tokens>="
                             f"{tokens}, or use backend='auto' to fall back to NCCL")
        return tokens

    def _key(self, strat: str, plan: dict[str, int], norm: bool, fp8: bool, aligned: bool,
             w_dtype: torch.dtype) -> tuple:
        """What tells apart the compiled kernels of this backend's calls (``T`` is not
        specialised): a call whose key is not in :attr:`_warm` compiles and loads one."""
        return (strat, norm, fp8, aligned, w_dtype, self.use_pdl, plan["block"],
                plan["num_warps"], plan["chunk"], plan["rows"], plan["lag"])

    def _kernel_call(self, strat: str, plan: dict[str, int], x, res, w, out, rout, q, scale,
                     eps, norm: bool, tokens: int) -> tuple[Any, tuple[int], tuple, dict]:
        """``(kernel, grid, args, kwargs)`` of one launch. The one place a call's launch and
        :meth:`warmup`'s compile are built, so their triton cache keys (the options as passed,
        order included) are the same."""
        k = self._k
        fp8 = q is not None
        common = (x, res, w, out, rout, q if fp8 else self._dummy_fp8,
                  scale if fp8 else self._dummy_scale, float(eps), tokens, self.hidden_size,
                  self._peers.data_ptr())
        meta = dict(RANK=self.rank, W=self.world_size, NORM=norm, FP8=fp8, BLOCK=plan["block"],
                    NT=32 * plan["num_warps"], num_warps=plan["num_warps"], num_stages=1,
                    PDL=self.use_pdl, launch_pdl=self.use_pdl, **LAUNCH_OPTIONS)
        state = (self._state, self._host_err.data_ptr(), self._timeout_ns)
        grid = (plan["grid"],)
        if strat == "lamport" and plan["rows"]:
            return (k.lamport_rows_kernel, grid, (*common, self.lamp_off, self.slot_elems, *state),
                    dict(LAG=plan["lag"], ELEM_BITS=8 * self.itemsize, **meta))
        if strat == "lamport":
            return (k.lamport_kernel, grid, (*common, self.lamp_off, self.slot_elems, *state),
                    dict(CHUNK=plan["chunk"], ELEM_BITS=8 * self.itemsize, **meta))
        fn = k.oneshot_kernel if strat == "oneshot" else k.twoshot_kernel
        return fn, grid, (*common, self.flag_off, self.stage_off, self.msg_elems, *state), meta

    def _launch(self, op: str, x, res, w, out, rout, q, scale, eps, norm: bool) -> None:
        tokens = self._validate(x)
        capturing = torch.cuda.is_current_stream_capturing()
        if not capturing:
            self.check_errors(synchronize=False)
        self._last_op = op
        if tokens == 0:
            return
        strat = self.strategy(tokens)
        plan = launch_plan(strat, norm, tokens, self.hidden_size, self.itemsize,
                           self.world_size, self.table)
        fp8 = q is not None
        aligned = all(t.data_ptr() % 16 == 0 for t in (x, res, out, rout))
        key = self._key(strat, plan, norm, fp8, aligned, w.dtype)
        if capturing and key not in self._warm:
            raise CaptureError(f"{op}: the {strat} kernel (fused={norm}, fp8={fp8}) would be "
                               f"compiled and loaded during CUDA-graph capture; call "
                               f"TPCommunicator.warmup() (or one eager call of every op/size "
                               f"class) on every rank before capturing")
        fn, grid, args, kwargs = self._kernel_call(strat, plan, x, res, w, out, rout, q, scale,
                                                   eps, norm, tokens)
        with torch.cuda.device(self.device):
            kern = fn[grid](*args, **kwargs)
        #: benchmarks only: (plan, compiled kernel or None) of the latest launch
        self.last_launch = (plan, kern)
        self._warm.add(key)

    def warm_classes(self, num_tokens: Sequence[int], weight_dtypes: Sequence[torch.dtype],
                     fp8: bool) -> dict[tuple, tuple]:
        """The kernel classes calls with these token counts would compile (16-byte aligned,
        contiguous inputs, as fresh allocations are): ``{key: (T, strategy, plan, norm, fp8,
        weight dtype)}``, one token count per class -- ``all_reduce`` (its weight argument is
        a float32 dummy), then ``all_reduce_add_rms_norm`` with each weight dtype, without and
        (``fp8``) with the FP8 output. Pure host arithmetic, no launch."""
        ops = [(False, False, torch.float32)]
        ops += [(True, q, wd) for wd in dict.fromkeys(weight_dtypes)
                for q in ((False, True) if fp8 else (False,))]
        out: dict[tuple, tuple] = {}
        for T in sorted(set(num_tokens)):
            if T == 0:
                continue   # launches nothing
            strat = self.strategy(T)
            for norm in (False, True):
                plan = launch_plan(strat, norm, T, self.hidden_size, self.itemsize,
                                   self.world_size, self.table)
                for n, q, wd in ops:
                    if n == norm:
                        out.setdefault(self._key(strat, plan, n, q, True, wd),
                                       (T, strat, plan, n, q, wd))
        return out

    def warmup(self, num_tokens: Sequence[int] | None = None,
               weight_dtypes: Sequence[torch.dtype] | None = None, fp8: bool = True) -> int:
        """Compile and load, ahead, the kernel of every class in :meth:`warm_classes` (default:
        every token count in ``[1, max_tokens]``, weights in the communicator's dtype and in
        float32); launch nothing, touch no peer. Returns the number of classes. After it, a
        call of a covered class neither compiles nor loads a module, so it may be the first
        call inside a CUDA-graph capture (:class:`CaptureError` otherwise)."""
        counts = range(1, self.max_tokens + 1) if num_tokens is None else num_tokens
        wds = (self.dtype, torch.float32) if weight_dtypes is None else tuple(weight_dtypes)
        classes = self.warm_classes(counts, wds, fp8)
        if not classes:
            return 0
        Tmax = max(c[0] for c in classes.values())
        dev, H = self.device, self.hidden_size
        with torch.cuda.device(dev):
            bufs = [torch.empty(Tmax, H, dtype=self.dtype, device=dev) for _ in range(4)]
            q = torch.empty(Tmax, H, dtype=torch.float8_e4m3fn, device=dev)
            weights = {wd: torch.empty(H, dtype=wd, device=dev) for wd in wds}
            for key, (T, strat, plan, norm, f, wd) in classes.items():
                x, res, out, rout = (b[:T] for b in bufs)
                w = weights[wd] if norm else self._dummy_scale
                if not norm:
                    res, rout = x, out
                fn, grid, args, kwargs = self._kernel_call(
                    strat, plan, x, res, w, out, rout, q[:T] if f else None,
                    self._dummy_scale if f else None, 1e-6 if norm else 0.0, norm, T)
                kern = fn.warmup(*args, grid=grid, **kwargs)
                if hasattr(kern, "result"):   # triton's asynchronous compile mode
                    kern = kern.result()
                kern._init_handles()
                self._warm.add(key)
        return len(classes)

    def all_reduce(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """``out[T, H] = (x_0.float() + ... + x_{W-1}.float()).to(dtype)`` (rank order)."""
        self._launch("all_reduce", x, x, self._dummy_scale, out, out, None, None, 0.0, False)

    def all_reduce_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor,
                                weight: torch.Tensor, eps: float, normed_out: torch.Tensor,
                                residual_out: torch.Tensor,
                                quant_scale: torch.Tensor | None = None,
                                fp8_out: torch.Tensor | None = None) -> None:
        """Fused allreduce + residual add + RMSNorm (+ FP8), semantics of ``allreduce.base``."""
        if (quant_scale is None) != (fp8_out is None):
            raise ValueError("quant_scale and fp8_out must be given together")
        op = "all_reduce_add_rms_norm" + ("_fp8" if fp8_out is not None else "")
        self._launch(op, x, residual, weight, normed_out, residual_out, fp8_out, quant_scale,
                     eps, True)

    def close(self) -> None:
        """Drop the workspace references. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._hdl = None
        self._buf = None
