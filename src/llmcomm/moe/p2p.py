"""The ``p2p`` EP backend: Triton kernels pushing rows over NVLink into symmetric memory.

One node only. At creation (never later) it allocates one symmetric-memory buffer on the EP
group and rendezvouses it once. Two protocols (``protocol=``, see :mod:`llmcomm.kernels.moe`):
``"flags"`` and ``"lamport"``, chosen by :func:`llmcomm.policy.ep_p2p_protocol` unless given.
Regions of that buffer, per rank (``W`` ranks, ``M`` max tokens per rank, ``K`` top-k, ``G``
programs), for ``protocol="flags"`` (zero-initialised)::

    recv_x  [W, M, R] dtype   rows pushed by each source rank (one per token and destination);
                              ``R = EPConfig.row_width``: ``H``, or an fp8 dispatch's wire rows
    recv_ids[W, M, K] int32   the source token's expert ids (written for every token)
    recv_w  [W, M, K] fp32    its weights
    recv_T  [W]       int32   the source's token count
    comb    [W, M, H] dtype   weighted partial sums pushed back by each expert rank
    flags_d [G, W], flags_c [G, W] int32   monotonic per-program epochs (dispatch / combine)
    ce_flag [R * W]   int32   with ``_ce_tokens`` only: per (round, source rank), the epoch of
                              the source's copied rows (``R``: rounds at capacity)
    hist    [2, W, L] int32   packed ``expert_x`` only: each source's token count per local
                              expert, two copies by call parity (``ep_packed_offsets_kernel``)
    hflag   [W]       int32   packed only: the source's call counter, releasing its ``hist``

and for ``protocol="lamport"`` (``NBUF = 3`` rotating copies, every element initialised to the
sentinel bit pattern, sign bit only; each receiver resets what it consumed)::

    lx    [NBUF, W, M, R]  dtype  rows pushed by each source rank (fp8 wire rows too: a sent
                                  element with the sentinel's bits is rewritten, see
                                  ``_no_sentinel`` in llmcomm.kernels.moe)
    lmeta [NBUF, W, M, 2K] int32  ids, then the fp32 weight bits, of every source token
    lcnt  [NBUF, W, G]     int32  the source's token count, one slot per receiving program
    lcomb [NBUF, W, M, H]  dtype  weighted partial sums pushed back by each expert rank

Local: ``expert_x [L, W*M, R]`` (packed: ``[EPConfig.rows, R]`` and ``offsets [L + 1]``),
counts, slot cursors, the slot map ``[W, M, K]``, per-program
epochs (``"flags"``) or buffer indices (``"lamport"``, plus the peers' weights ``wloc [W, M, K]``
and token counts ``peer_T [W]`` kept for the combine), and a 4-int error record (device, plus a
pinned host mirror the host reads without a sync). The grid ``G`` and every launch knob
(``protocol``, ``num_warps``, ``tile_tokens``, ``combine_tile_tokens``, ``pdl``, the ``"flags"``
knobs ``round_tokens``, ``posted_flags``, ``interleave``, the ``"lamport"`` knob ``shift``;
see :mod:`llmcomm.kernels.moe`) are pure functions of the creation
arguments and are part of the fingerprint; the defaults are the tested configuration. Kernels
take no host counter, so dispatch/combine capture into CUDA graphs; they never synchronise the
host. NVLink multicast is not used (plain peer loads/stores only).

``simulate_dir`` (tests only) replaces symmetric memory by files mapped by every process and runs
the same kernels under ``TRITON_INTERPRET=1`` on CPU; a :class:`~llmcomm.moe.loopback.LoopbackGroup`
as ``group`` (tests and benchmarks only) puts every rank's workspace on one GPU in one process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from .. import _cuda
from ..agree import exchange, group_ranks
from ..config import get_config
from ..errors import CollectiveTimeoutError
from ..kernels import LAUNCH_OPTIONS
from ..policy import Decision, ep_p2p_protocol
from .backends import EPConfig, MoEBackend
from .loopback import LoopbackGroup

log = logging.getLogger(__name__)

_ALIGN = 256
NBUF = 3   # "lamport": receive buffers rotated per call (per program), so a reset never races
LAMPORT_REGIONS = ("lx", "lmeta", "lcnt", "lcomb")   # "lamport": they start as the sentinel
_OPS = {1: "EPDispatcher.dispatch (p2p)", 2: "EPDispatcher.combine (p2p)"}


def _timeout_error(code: int, ranks: list[int], rank: int, timeout_s: float, G: int,
                   ce_tokens: int | None, zp: tuple[int, int]) -> CollectiveTimeoutError:
    """The error for a kernel's deadline record ``code`` (``op << 16 | missing group rank +
    1``) on group rank ``rank`` of ``ranks`` (global ranks).

    A dispatch that names this rank itself waited for its own zeroing program (``DIRECT``:
    program ``ZP`` zeroes ``counts`` and releases a flag every program waits for before its
    first claim), not for a peer: that program never ran beside the waiting ones."""
    op, missing = code >> 16, (code & 0xFFFF) - 1
    group = "[" + ",".join(map(str, ranks)) + "]"
    what = _OPS.get(op, f"op {op}")
    after = ("the p2p workspace is now unusable, create a new EPDispatcher after fixing the "
             "cause")
    if op == 1 and missing == rank:
        return CollectiveTimeoutError(
            what, group, [], timeout_s, detail=f"group rank {rank}'s own dispatch waited for "
            f"its program {zp[0]} (launches at <= 8 warps a program) or {zp[1]} (16 warps) to "
            f"zero `counts`, and that program did not run meanwhile: every program of the "
            f"{G}-program grid must be resident at once -- pass a smaller num_programs if "
            f"other kernels hold SMs beside the dispatch; {after}")
    glob = ranks[missing] if 0 <= missing < len(ranks) else missing
    return CollectiveTimeoutError(
        what, group, [glob], timeout_s, detail=f"group rank {missing} did not signal; {after} "
        f"(if it was that rank's first call at a new token count, it may have been compiling "
        f"its kernels meanwhile: call EPDispatcher.warmup() on every rank before serving)" + (
            f"; with _ce_tokens={ce_tokens} a dispatch's rows come by copy_ on a side stream, "
            f"which the driver may run on SMs: if the grid ({G} programs) holds every SM, pass "
            f"a smaller num_programs" if op == 1 and ce_tokens else ""))


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _round_tokens(M: int, programs: int) -> int:
    """The default tokens a round of a program whose share at capacity is ``ceil(M /
    programs)``: 4 rounds, but at least half a share up to 8 tokens -- 2 rounds for 8 and 16
    tokens a program (session 9: 145 vs 157-161 us at 1024 tokens per rank, 252-254 vs 255-256
    at 2048; 4 rounds of 8 stay best at 4096) -- and one round for 2 (52 vs 58 us at 256). The
    kernels' ``_chunk`` applies the same rule to each call's share (``RT``)."""
    share = -(-M // programs)
    return max(-(-share // 4), min(-(-share // 2), 8), min(share, 2))


def _lamport_warps(T: int, tile: int, programs: int, split: int, num_warps: int,
                   small: int | None) -> int:
    """Warps a program of a ``"lamport"`` call with ``T`` own tokens runs: ``small`` when set
    and the call's tiles times ``split`` fit the grid (the combine's small-batch path of
    ``split`` column chunks a tile), else ``num_warps``.

    Session 14 (loopback, one H200, hidden 7168): 8 warps instead of 16 took the combine from
    6.92-6.94 to 5.97-5.99 us at one token (7.17-7.20 to 6.23-6.24 at 8) and the dispatch from
    9.70-9.75 to 9.32-9.33 at one token, but the combine 1-3 us longer at 64-128 tokens (whole
    rows a program): fewer threads make each cross-warp reduction and barrier cheaper, which
    is what a small batch's chain is made of."""
    if small is not None and -(-T // tile) * split <= programs:
        return small
    return num_warps


def _at_warps(kwargs: dict[str, Any], warps: int, sim: bool = False) -> dict[str, Any]:
    """A lamport launch's variant constexprs (and options) at ``warps`` a program: ``MSPIN``
    (the dispatch's count and meta spun per thread) only at <= 8 warps, where session 20
    measured it faster (at 16 the dispatch was 1 us slower: 512 threads spinning on the same
    few words, and the meta re-read after the reduction); ``GATE`` (claims and placements
    branched around where there is no token) only at <= 8 warps too, the small batches, where
    session 26 measured it faster (loopback pair -0.4..-1.3 us at 1-16 tokens) -- at 16 warps
    (64-128 tokens, a token in nearly every program) it only added 0.2-0.7 us; ``ZP`` given as
    a pair (at <= 8 warps, above): the direct counts' zeroing program, ``G // 4`` for the small
    batches (idle there) and 0 for the 16-warp launches (session 27: 0.3-0.4 us faster at 64
    tokens than ``G // 4``, which has a token there too); ``SPREAD`` with triton's
    ``maxnreg=128`` on a GPU (``sim`` False)."""
    if kwargs.get("MSPIN") and warps > 8:
        kwargs = {**kwargs, "MSPIN": False}
    if kwargs.get("GATE") and warps > 8:
        kwargs = {**kwargs, "GATE": False}
    if isinstance(kwargs.get("ZP"), tuple):
        kwargs = {**kwargs, "ZP": kwargs["ZP"][0 if warps <= 8 else 1]}
    if kwargs.get("SPREAD") and not sim:
        # at most 128 registers a thread: ptxas gives the SPREAD dispatch 192-200 at 8 warps
        # (triton 3.6, sm_90a; the other dispatch 128), one program an SM instead of two.
        # With the cap: no spills at EP=4, 20 bytes at EP=8, timing unchanged at EP=4 (at 16
        # warps 128 is the limit anyway)
        kwargs = {**kwargs, "maxnreg": 128}
    return kwargs


def _spread_by_default(world_size: int, sim: bool) -> bool:
    """Whether a lamport dispatcher of ``world_size`` ranks uses ``SPREAD`` unless told: at
    EP > 2 (loopback, session 21: the pair at one token 16.6 vs 22.0 us peer by peer at EP=4,
    25.4-26.1 vs 45.1-46.3 at EP=8; slower at EP=2), never in the sequential simulation, whose
    programs run one after another, while a spread program waits for tokens another program
    of the peer sent."""
    return world_size > 2 and not sim


def _ce_warm_tokens(ce_tokens: int | None, max_tokens: int) -> list[int]:
    """Token counts whose dispatch takes ``_ce_tokens``' copy path (``T >= ce_tokens``), one
    of each class triton compiles apart (``T == 1``, a multiple of 16, any other) where there
    is one up to ``max_tokens``: :meth:`P2PBackend.warmup` adds them, as the copy path is a
    kernel variant of its own (``CE``) that the default counts may miss (a 2049-token call of
    a 4096 dispatcher with ``_ce_tokens=2048``)."""
    if ce_tokens is None or ce_tokens > max_tokens:
        return []
    other = next((t for t in (ce_tokens, ce_tokens + 1) if t != 1 and t % 16), None)
    return sorted(t for t in {ce_tokens, -(-ce_tokens // 16) * 16, other}
                  if t is not None and t <= max_tokens)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _arrive(group: Any, what: str) -> None:
    """Every rank of ``group`` has reached this point (a Loopback's ranks are built one after
    the other in one process and launch nothing before all of them exist: nothing to wait for)."""
    if not isinstance(group, LoopbackGroup):
        exchange("ready", group, what)


def _ranks(group: Any) -> list[int]:
    return group.ranks() if isinstance(group, LoopbackGroup) else group_ranks(group)


class _Workspace:
    """One byte buffer per rank, addressable by every rank of the group."""

    def __init__(self, nbytes: int, group: Any, cfg: EPConfig, simulate_dir: str | None):
        self.nbytes = nbytes
        W, rank = cfg.world_size, cfg.rank
        if isinstance(group, LoopbackGroup):     # every rank in this process, one GPU
            self.bufs = group.buffers(nbytes)
            self.handle = None
        elif simulate_dir is not None:
            import torch.distributed as dist

            path = os.path.join(simulate_dir, f"ep_ws_{rank}")
            with open(path, "wb") as f:
                f.truncate(nbytes)
            dist.barrier(group=group)
            self.bufs = [torch.from_file(os.path.join(simulate_dir, f"ep_ws_{r}"), shared=True,
                                         size=nbytes, dtype=torch.uint8) for r in range(W)]
            self.handle = None
        else:
            import torch.distributed._symmetric_memory as symm_mem

            local = symm_mem.empty(nbytes, dtype=torch.uint8, device=cfg.device)
            # every rank must arrive before torch's rendezvous, which has no deadline of ours
            _arrive(group, "p2p EP workspace")
            hdl = symm_mem.rendezvous(local, group.group_name)
            if hdl.world_size != W:
                raise ValueError(
                    f"p2p EP workspace was rendezvoused over {hdl.world_size} ranks but the EP "
                    f"group has {W}; the workspace must be sized to the EP group")
            self.bufs = [local if r == rank else hdl.get_buffer(r, [nbytes], torch.uint8)
                         for r in range(W)]
            self.handle = hdl
        self.bufs[rank].zero_()
        if simulate_dir is None:
            torch.cuda.synchronize(cfg.device)  # zeroed before any peer may write into it


    def region(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype
               ) -> tuple[torch.Tensor, ...]:
        n = 1
        for s in shape:
            n *= s
        nbytes = n * torch.empty(0, dtype=dtype).element_size()
        return tuple(b[offset:offset + nbytes].view(dtype).view(shape) for b in self.bufs)


class P2PBackend(MoEBackend):
    """Single-node NVLink backend (Triton over torch symmetric memory). Graph-safe."""

    name = "p2p"
    graph_safe = True

    def __init__(self, group: Any, cfg: EPConfig, num_programs: int | None = None,
                 simulate_dir: str | None = None, num_warps: int | None = None,
                 tile_tokens: int = 1, combine_tile_tokens: int = 1,
                 round_tokens: int | None = None, posted_flags: bool | None = None,
                 pdl: bool | None = None, protocol: str = "auto", shift: int | None = None,
                 combine_split: int | None = None, interleave: bool | None = None,
                 _fuse: bool = True, _combine_fuse: bool | None = None,
                 _runtime_rounds: bool = False,
                 _combine_roles: bool = False, _roles_warps: int = 16,
                 _roles_pair: int = 1, _roles_programs: int | None = None,
                 _ce_tokens: int | None = None,
                 _thread_spin: bool | None = None, _meta_spin: bool | None = None,
                 _peer_spread: bool | None = None, _early_own: bool | None = None,
                 _claim_first: bool = False, _gate: bool | None = None,
                 _trace: bool = False, _direct_counts: bool | None = None,
                 _zero_program: int | None = None) -> None:
        """Allocate and rendezvous the workspace (collective over ``group``).

        Args:
            num_programs: grid ``G`` of both kernels (default ``min(128, SMs, M)``); must be
                equal on every rank.
            simulate_dir: tests only, see the module docstring.
            num_warps: warps per program (default 16 for H >= 4096, 8 for H >= 2048, else 4;
                power of 2, <= 16). With ``"lamport"`` and the default at H >= 4096, a call
                whose token tiles times ``combine_split`` fit the grid runs 8
                (:func:`_lamport_warps`).
            round_tokens: tokens of one program per round (``CHUNK`` in
                :mod:`llmcomm.kernels.moe`): every round of sends is signalled on its own, so
                a peer expands (dispatch) or sums (combine) round r - 1 while round r is on
                the wire. Default: of a program's share ``n`` at ``max_tokens_per_rank``,
                ``max(ceil(n / 4), min(ceil(n / 2), 8), min(n, 2))`` (one round for 1 or 2
                tokens, 2 rounds of up to 8, then 4). A round costs ~5 us at 4096 tokens per
                rank (docs/moe_sessions.md, session 9). ``_runtime_rounds=True`` (A/B knob, default
                off until timed on 2 GPUs) applies the same rule per call, in the kernel, to
                each batch's share instead (at most the rule at capacity; ``RT`` in
                :mod:`llmcomm.kernels.moe`).
            tile_tokens, combine_tile_tokens: tokens one program handles per loop step in
                dispatch / combine (``TB``; powers of 2, <= 8; default 1): their loads and slot
                atomics are in flight together. More need more registers (the combine's fp32
                sums most); the session-3 sweep found no gain (docs/moe_sessions.md). Both
                protocols.
            posted_flags: signal with a posted ``st.release.sys`` and poll with
                ``ld.acquire.sys`` (``POSTED``) instead of system-scope atomics. Default on on a
                GPU (fastest in the session-3 sweep at every size), off in the simulation
                (inline PTX).
            pdl: programmatic dependent launch (``PDL``, sm_90+): each kernel's programs may be
                scheduled while the previous kernel in the stream finishes, and wait for it
                (``griddepcontrol.wait``) before their first memory access. Both protocols.
                Default: on for ``"lamport"`` on an sm_90+ GPU, off for ``"flags"`` and in the
                simulation. Session 24 (2 x H200, CUDA-graph replays, both orders): the
                lamport pair 10.1-10.5 vs 11.2-11.9 us at one token, 11.7-11.9 vs 12.0-12.9 at
                8, 15.8-16.1 vs 16.9-17.6 at 64, 23.4-25.1 vs 24.1-25.4 at 128. Sessions 2-3
                (2 GPUs, the flags kernels of then): mixed at one token, slower at 8-4096, so
                flags keeps it off (docs/moe_sessions.md).
            protocol: ``"auto"`` (default: :func:`llmcomm.policy.ep_p2p_protocol` -- lamport
                for small dispatchers at EP=2, flags otherwise; a flags-only knob given picks
                flags, ``shift`` picks lamport), ``"flags"`` (per-program monotonic flags,
                system-scope release/acquire) or ``"lamport"`` (sentinel-initialised receive
                buffers, the data signals its own arrival; see :mod:`llmcomm.kernels.moe`).
                ``round_tokens`` and ``posted_flags`` belong to ``"flags"``: leave them unset
                with ``"lamport"``. ``self.protocol_decision`` says what was chosen and why.
            shift: ``"lamport"`` only: program ``p`` receives (dispatch) and finishes its own
                tokens (combine) of tile ``(p + shift) mod G``, so that with fewer tokens than
                programs, sending and receiving run on different SMs. Default 0. A non-zero
                shift is 0.3-1.7 us faster at small batches (docs/moe.md) but needs every program
                of the grid resident at once (``G`` <= free SMs, nothing else occupying them,
                e.g. no compute overlapped on another stream), else the programs can wait on
                each other until the deadline; it must be 0 in the simulation (its programs
                run one after another).
            combine_split: ``"lamport"`` only: when every rank's token tiles times this fit the
                grid (a small batch), the combine splits each token's hidden dimension into this
                many column chunks on as many programs (SMs), so a token's K weighted expert rows
                are not summed on one SM alone; when they do not fit but half as many chunks
                do, half as many. Power of 2 <= 16; default 4 for hidden >= 2048, else 1 (no
                split).
            interleave: ``"flags"`` only: each round handles its tokens one tile at a time,
                the own tile sent to the peers and copied into the local experts from the same
                registers and, in the same step, a tile of the peers' previous round expanded
                (combine: the peers' partials pushed and an own tile finished), so NVLink and
                local HBM traffic are in flight together (``INTERLEAVE`` in
                :mod:`llmcomm.kernels.moe`). Default on; off restores the phased rounds (send
                the round, signal, copy own, then receive), which a data-movement ladder
                measured at +80 us per kernel at 4096 tokens (docs/moe_sessions.md, session 7).
            _thread_spin: ``"lamport"`` only (default on on a GPU, off in the simulation): the
                combine waits for a peer's partial sums, and the dispatch for a received row
                (after its count and meta), with every thread spinning on its own elements in
                inline PTX (:func:`llmcomm.kernels.sync.spin_landed`) instead of a loop that
                reduces a pending count over the program every spin (``TSPIN`` in
                :mod:`llmcomm.kernels.moe`). Session 20, free-running loopback on one H200:
                the pair -0.2..-0.7 us at 1-8 tokens, -1.3..-2.1 at 64, -4.6..-5.6 at 128 (the
                combine alone 21 -> 15 us at 128), the dispatch's part at par; untimed on 2
                GPUs (docs/moe_sessions.md).
            _meta_spin: with ``_thread_spin`` (default: on with it): a dispatch call that runs
                at most 8 warps a program (the small batches, :func:`_lamport_warps`) waits in
                its one-token receive for the peer's count and the token's meta with
                per-thread spins too (:func:`llmcomm.kernels.sync.spin_meta`), then one
                reduction, instead of a loop with three reductions a spin (``MSPIN``).
                Session 20, free-running loopback on one H100: the pair -0.35..-0.5 us at one
                token, -0.1..-0.3 at 8; at 16 warps (64 tokens) the dispatch was 1 us slower,
                hence not there.
            _peer_spread: ``"lamport"`` with one-token tiles and ``shift`` 0 (default: on
                at EP > 2, off at EP=2): every
                program first polls every peer's count, then receives the peers' tokens
                spread over the programs, one a program and iteration (``SPREAD`` in
                :mod:`llmcomm.kernels.moe`), instead of each program receiving token ``p``
                of every peer one peer after another. One receive instead of ``W - 1`` on a
                one-token program's chain, and one inlined receive in the kernel instead of
                ``W - 1`` (session 21, loopback: the EP=4 pair 16.6 vs 22.0 us at one token;
                slower at EP=2, where the default polls count and meta in one spin). Program
                ``p`` then waits for tokens that other programs of the peer send, so every
                program must be resident, as with ``shift``: not in the sequential
                simulation.
            _early_own: ``"lamport"`` with one-token tiles (default: on there, session 25):
                where a program places its own token and receives one too (more own tokens
                than half the grid), the own rows go into the local experts before the
                receive instead of after it (``EARLY`` in :mod:`llmcomm.kernels.moe`), so
                their HBM writes overlap the peers' rows in flight. Free-running loopback
                on one H100: the pair -0.7..-1.5 us at 64 tokens and -1.3..-2.0 at 128 (66
                programs a rank), par at 1-8 where it does not apply; 2 GPUs untimed
                (``bench_moe.py`` ``lam_noearly`` is the A/B).
            _claim_first: ``"lamport"`` with one-token tiles (A/B knob, session 25, off): a
                received token's slots are claimed as soon as its meta has landed, before
                the per-thread wait for its row (``CLAIM1`` in :mod:`llmcomm.kernels.moe`).
            _gate: ``"lamport"`` with one-token tiles (default on there, session 26): a
                token's slot claim and row placement run under a branch on the token being
                there, not masked off (``GATE`` in :mod:`llmcomm.kernels.moe`), in the
                launches at <= 8 warps a program (the small batches; :func:`_at_warps`).
                ``False`` is the A/B against the masked form.
            _trace: ``"lamport"`` (a diagnostic, off): the dispatch stamps its stages
                (``TRACE`` in :mod:`llmcomm.kernels.moe`) into ``self.trace``; read them
                with :meth:`trace_summary`, zero them with ``self.trace.zero_()``. Not for
                timing runs: each stage adds two atomics.
            _direct_counts: ``"lamport"`` (default on there, session 27): the dispatch's
                slot claims increment ``counts`` itself and no "last program out" publishes
                it; one program (``_zero_program``) zeroes ``counts`` at entry and the others
                wait for that before their first claim (``DIRECT`` in
                :mod:`llmcomm.kernels.moe`). Free-running loopback on one H100: the pair
                -0.5..-0.9 us at 1-16 tokens, -0.4..-0.8 at 128. ``False`` is the A/B.
            _zero_program: with ``_direct_counts``, the dispatch program that zeroes
                ``counts`` (``ZP``; A/B knob): by default ``G // 4`` in the launches at <= 8
                warps (idle at those small batches, dispatched early) and 0 at 16 warps
                (:func:`_at_warps`); 0 in the simulation.
            _ce_tokens: ``"flags"`` at EP=2, interleaved, default rounds (A/B knob, off: on
                2 x H200 it was slower, 228.6 vs 217 us for the 4096-token dispatch, although
                the peer copy ran on a copy engine; docs/moe_sessions.md, session 17): a
                dispatch of at least this many own tokens
                sends its rows by ``Tensor.copy_`` instead of the kernel's stores -- round
                ``r`` of every program (``round_tokens * G`` contiguous tokens) in one
                ``copy_`` into the peer's receive buffer, then a flag, on a side stream beside
                the kernel, which still sends the ids and weights and expands every row
                (``CE`` in :mod:`llmcomm.kernels.moe`; :meth:`_ce_send`). Every own row goes
                to the peer, also those without an expert there (at EP=2 and top-8 of 256
                experts, 0.4 % of them). Meant for a copy engine: session 7 timed such a copy
                at 154 us for the 4096-token dispatch's bytes against 164 us for SM stores
                alone and 217 us for the dispatch; but where the driver runs the copy as a
                kernel (a same-device copy on one H200 did, session 17), it needs SMs the grid
                leaves free (docs/moe_sessions.md, session 17).
        """
        super().__init__(group, cfg)
        self._sim = simulate_dir is not None
        if cfg.world_size < 2:
            raise ValueError(f"the p2p EP backend needs an EP group of at least 2 ranks (its "
                             f"kernels pair each rank with its peers), got {cfg.world_size}; "
                             f"use backend='torch' (or 'auto', which picks it)")
        if protocol not in ("auto", "flags", "lamport"):
            raise ValueError(f"protocol must be 'auto', 'flags' or 'lamport', got {protocol!r}")
        esize = torch.empty(0, dtype=cfg.dtype).element_size()
        # lamport: an fp8 wire row's leading elements of fp8 bytes (the scales after them)
        self._qw = cfg.hidden_size // esize if cfg.fp8 else 0
        if cfg.packed and (protocol == "lamport" or shift is not None):
            raise ValueError("a packed expert_x (EPDispatcher(packed=True)) needs the p2p "
                             "protocol 'flags' (only its dispatch places rows into per-expert "
                             "segments): leave protocol and shift unset, or pass "
                             "protocol='flags'")
        if protocol != "auto":
            self.protocol_decision = Decision(protocol, ("requested explicitly",))
        elif cfg.packed:
            self.protocol_decision = Decision("flags", (
                "packed expert_x: only the flags dispatch places rows into per-expert segments",))
        elif (round_tokens, posted_flags, interleave, _ce_tokens) != (None,) * 4 \
                or _runtime_rounds or _combine_roles:
            self.protocol_decision = Decision("flags", ("a flags-only knob given",))
        elif shift is not None:
            self.protocol_decision = Decision("lamport", ("a lamport-only knob given",))
        else:
            self.protocol_decision = ep_p2p_protocol(cfg.world_size, cfg.max_tokens_per_rank,
                                                     esize)
        protocol = self.protocol_decision.choice
        lamport = protocol == "lamport"
        if lamport and (round_tokens is not None or posted_flags is not None):
            raise ValueError("round_tokens and posted_flags apply to protocol='flags' only "
                             "(protocol='lamport' has no rounds and no flags): leave them unset")
        if not lamport and shift is not None:
            raise ValueError("shift applies to protocol='lamport' only (the 'flags' kernels pair "
                             "program p with program p of every peer): leave it unset")
        if self._sim and shift:
            raise ValueError("shift must be 0 in the TRITON_INTERPRET simulation (its programs "
                             "run one after another): pass shift=0 or leave it unset")
        if not self._sim and cfg.device.type != "cuda":
            raise ValueError(f"p2p EP backend needs a CUDA device, got {cfg.device}")
        # lamport with the default warps: 8 for a small batch (_lamport_warps), both compiled
        # and loaded at the first call of each kernel (_launch_lamport)
        self._small_warps = 8 if lamport and num_warps is None and cfg.hidden_size >= 4096 \
            else None
        if num_warps is None:
            num_warps = 16 if cfg.hidden_size >= 4096 else 8 if cfg.hidden_size >= 2048 else 4
        if num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be a power of 2 <= 16, got {num_warps}")
        for name, v in (("tile_tokens", tile_tokens), ("combine_tile_tokens", combine_tile_tokens)):
            if not isinstance(v, int) or v < 1 or v > 8 or v & (v - 1):
                raise ValueError(f"{name} must be a power of 2 in [1, 8], got {v!r}")
        self.tiles = (tile_tokens, combine_tile_tokens)
        if lamport and esize not in (2, 4, 8):
            raise ValueError(f"protocol='lamport' needs a 16, 32 or 64-bit dtype, got {cfg.dtype}")
        if posted_flags is None:
            posted_flags = not self._sim and not lamport
        if _thread_spin is None:
            _thread_spin = lamport and not self._sim
        if pdl is None:
            pdl = (lamport and not self._sim
                   and torch.cuda.get_device_capability(cfg.device) >= (9, 0))
        if self._sim and (posted_flags or pdl or _thread_spin):
            raise ValueError("posted_flags, pdl and _thread_spin use inline PTX: not available "
                             "in the TRITON_INTERPRET simulation")
        if pdl and torch.cuda.get_device_capability(cfg.device) < (9, 0):
            raise ValueError("pdl needs sm_90 or newer")
        W, M, K, H, L = (cfg.world_size, cfg.max_tokens_per_rank, cfg.top_k, cfg.hidden_size,
                         cfg.local_experts)
        if num_programs is not None and num_programs < 1:
            raise ValueError(f"num_programs must be >= 1, got {num_programs}")
        if _roles_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"_roles_warps must be a power of 2 <= 16, got {_roles_warps!r}")
        sms = 132 if self._sim else torch.cuda.get_device_properties(
            cfg.device).multi_processor_count
        if num_programs is None:
            num_programs = min(128, sms, M)
        self.G = int(num_programs)
        # the combine with roles runs 2 Gc programs of _roles_warps warps at <= 128 registers:
        # 16 // warps of them fit an SM, and all must be resident (finishers spin), so its
        # grid may be smaller than the dispatch's (token t is program t % Gc's there)
        fit = sms * max(1, 16 // _roles_warps) // 2
        if _roles_programs is not None and not 1 <= _roles_programs <= fit:
            raise ValueError(f"_roles_programs must be in [1, {fit}] (2 x that many programs "
                             f"of {_roles_warps} warps fit {sms} SMs), got {_roles_programs!r}")
        self._Gc = min(self.G, fit) if _roles_programs is None else int(_roles_programs)
        self.protocol = protocol
        rounds_given = round_tokens is not None
        if lamport:
            if shift is None:
                shift = 0
            if not isinstance(shift, int) or not 0 <= shift < self.G:
                raise ValueError(f"shift must be an int in [0, num_programs={self.G}), "
                                 f"got {shift!r}")
        else:
            if round_tokens is None:
                round_tokens = _round_tokens(M, self.G)
            if not isinstance(round_tokens, int) or round_tokens < 1:
                raise ValueError(f"round_tokens must be an int >= 1, got {round_tokens!r}")
        if lamport:
            if combine_split is None:
                combine_split = 4 if cfg.hidden_size >= 2048 else 1
            if not isinstance(combine_split, int) or combine_split < 1 or combine_split > 16 \
                    or combine_split & (combine_split - 1):
                raise ValueError(f"combine_split must be a power of 2 in [1, 16], got "
                                 f"{combine_split!r}")
        elif combine_split is not None:
            raise ValueError("combine_split applies to protocol='lamport' only: leave it unset")
        if lamport and interleave is not None:
            raise ValueError("interleave applies to protocol='flags' only (the 'lamport' "
                             "kernels have no rounds): leave it unset")
        self.interleave = None if lamport else (True if interleave is None else bool(interleave))
        self.combine_split = combine_split   # None for "flags"
        # A/B only: FUSE in llmcomm.kernels.moe (flags, interleaved, EP=2). With one-token
        # combine tiles (the default) the fused step runs on 1-D rows and wins at every
        # hidden size (session 8: 234 vs 264 us unfused at 7168, 4096 tokens); the [TB, H]
        # pair step of larger tiles holds two fp32 row accumulators and lost at hidden 7168
        # (session 7; in column chunks too, session 8), so with combine_tile_tokens > 1 the
        # combine fuses up to hidden 4096
        self._fuse = bool(_fuse) and not lamport
        if _combine_fuse is None:
            _combine_fuse = self._fuse and (combine_tile_tokens == 1
                                            or _next_pow2(cfg.hidden_size) <= 4096)
        self._fuse_combine = bool(_combine_fuse) and not lamport
        # CLAIM_RB in llmcomm.kernels.moe: a round's slots taken at its start, in one vector
        # atomic, for the fused one-token dispatch steps, in rounds of <= 16 tokens (session 8:
        # dispatch 229-243 vs 254-266 us at 4096 tokens, hidden 7168)
        rb = _next_pow2(round_tokens) if not lamport else 0
        self._claim_rb = rb if rb <= 16 else 0
        self.round_tokens = round_tokens     # None for "lamport"; the upper bound with RT
        # A/B only: RT in llmcomm.kernels.moe (default rounds sized per call from the batch,
        # interleaved). Off by default: on one GPU (loopback, session
        # 11) it is slower (1024 tokens 232 vs 226.5 us, 256 tokens 95 vs 81), where rounds
        # have no NVLink transfer to overlap; its 2-GPU timing is still to do.
        self._rt = bool(_runtime_rounds)
        if self._rt and (lamport or not self.interleave or rounds_given):
            raise ValueError("_runtime_rounds needs protocol='flags' with interleave and the "
                             "default rounds: leave round_tokens unset")
        # A/B only: the combine's push and finish in separate programs, a grid of 2 Gc at
        # _roles_warps warps (128 registers at most), _roles_pair tokens a step
        # (ep_combine_roles_kernel in llmcomm.kernels.moe; sessions 11-12: at par with the
        # default in loopback at 16 warps and one token a step, with the register cap only --
        # see _roles_consts; untimed on 2 GPUs; its grid is 2 Gc, Gc <= G so that all of it
        # fits the SMs, above). The dispatch's counterpart (slower in loopback) is on branch
        # wip/s11-roles.
        self._roles = bool(_combine_roles)
        if self._roles and (lamport or W != 2):
            raise ValueError(f"_combine_roles needs protocol='flags' at EP=2, got protocol "
                             f"{protocol!r} at EP={W}")
        self._roles_warps = int(_roles_warps)
        if _roles_pair not in (1, 2):
            raise ValueError(f"_roles_pair (tokens a step) must be 1 or 2, got {_roles_pair!r}")
        self._roles_pair = int(_roles_pair)
        # its rounds: round_tokens if given, else the default rule at its own share
        self._chunk_c = self.round_tokens if rounds_given or lamport else _round_tokens(
            M, self._Gc)
        self.shift = shift                   # None for "flags"
        if _ce_tokens is not None and (not isinstance(_ce_tokens, int) or _ce_tokens < 1):
            raise ValueError(f"_ce_tokens must be an int >= 1 (or None: off), got "
                             f"{_ce_tokens!r}")
        if _ce_tokens is not None and (lamport or W != 2 or not self.interleave or self._rt):
            raise ValueError(f"_ce_tokens needs protocol='flags' at EP=2 with interleave and "
                             f"the default rounds; got protocol {protocol!r} at EP={W}, "
                             f"interleave {self.interleave}, _runtime_rounds {self._rt}")
        self._ce_tokens = _ce_tokens
        if _thread_spin and not lamport:
            raise ValueError(f"_thread_spin needs protocol='lamport', got protocol {protocol!r} "
                             f"(it resolved to flags); pass protocol='lamport' or drop it")
        self._tspin = bool(_thread_spin)
        if _meta_spin is None:
            _meta_spin = self._tspin
        if _meta_spin and not self._tspin:
            raise ValueError("_meta_spin needs _thread_spin (the per-thread spins of the "
                             "lamport protocol, on by default on a GPU): leave _thread_spin "
                             "unset or pass True")
        self._mspin = bool(_meta_spin)
        spread_ok = lamport and self.tiles[0] == 1 and not shift
        if _peer_spread is None:
            _peer_spread = spread_ok and _spread_by_default(W, self._sim)
        if _peer_spread and not spread_ok:
            raise ValueError(f"_peer_spread needs protocol='lamport' with tile_tokens=1 and "
                             f"shift 0; got protocol {protocol!r}, tile_tokens {self.tiles[0]}, "
                             f"shift {shift}")
        if _peer_spread and self._sim:
            raise ValueError("_peer_spread needs every program of a grid running at once (a "
                             "program receives tokens another program of the peer sent): not "
                             "in the TRITON_INTERPRET simulation; leave it unset")
        self._spread = bool(_peer_spread)
        one_tiles = lamport and self.tiles[0] == 1

        def one_token_knob(name: str, value: bool | None) -> bool:
            """A knob of the lamport one-token dispatch: on there unless told (None), refused
            elsewhere."""
            if value is None:
                return one_tiles
            if value and not one_tiles:
                raise ValueError(f"{name} needs protocol='lamport' with tile_tokens=1; got "
                                 f"protocol {protocol!r}, tile_tokens {self.tiles[0]}")
            return bool(value)

        self._early = one_token_knob("_early_own", _early_own)
        self._claim1 = one_token_knob("_claim_first", _claim_first)
        self._gate = one_token_knob("_gate", _gate)
        if _trace and not lamport:
            raise ValueError(f"_trace needs protocol='lamport' (the flags kernels have no "
                             f"stamps); got protocol {protocol!r}")
        # its flags: one per (round, source rank), monotonic (the call's epoch)
        rounds = 1 + -(-max(-(-M // self.G) - (self.round_tokens or 1), 0)
                       // (self.round_tokens or 1))
        self._nce = rounds * W if _ce_tokens is not None else 0
        if _direct_counts is None:
            _direct_counts = lamport
        if _direct_counts and not lamport:
            raise ValueError(f"_direct_counts needs protocol='lamport'; got protocol "
                             f"{protocol!r}")
        self._direct = bool(_direct_counts)
        zp = _zero_program
        if zp is not None and (not isinstance(zp, int) or not 0 <= zp < self.G
                               or (self._sim and zp)):
            raise ValueError(f"_zero_program must be an int in [0, {self.G}) (0 in the "
                             f"simulation), got {_zero_program!r}")
        # (at <= 8 warps, at 16): resolved per launch by _at_warps
        self._zp = (zp, zp) if zp is not None else (0, 0) if self._sim else (self.G // 4, 0)
        dev = cfg.device if not self._sim else torch.device("cpu")
        # _direct_counts: the call's buffer index once counts are zeroed (-1: none yet)
        self.zflag = torch.full((1,), -1, dtype=torch.int32, device=dev)
        off = 0
        layout = {}
        if lamport:
            regions = (("lx", (NBUF, W, M, cfg.row_width), cfg.dtype),
                       ("lmeta", (NBUF, W, M, 2 * K), torch.int32),
                       ("lcnt", (NBUF, W, self.G), torch.int32),
                       ("lcomb", (NBUF, W, M, H), cfg.dtype))
        else:
            regions = (("recv_x", (W, M, cfg.row_width), cfg.dtype),
                       ("recv_ids", (W, M, K), torch.int32),
                       ("recv_w", (W, M, K), torch.float32),
                       ("recv_T", (W,), torch.int32),
                       ("comb", (W, M, H), cfg.dtype),
                       ("flags_d", (self.G, W), torch.int32),
                       ("flags_c", (self.G, W), torch.int32))
            if self._nce:
                regions += (("ce_flag", (self._nce,), torch.int32),)
            if cfg.packed:
                regions += (("hist", (2, W, L), torch.int32), ("hflag", (W,), torch.int32))
        for name, shape, dt in regions:
            n = 1
            for s in shape:
                n *= s
            layout[name] = (off, shape, dt)
            off += _align(n * (esize if dt == cfg.dtype else 4))
        self.ws = _Workspace(off, group, cfg, simulate_dir)
        for name, (o, shape, dt) in layout.items():
            setattr(self, name, self.ws.region(o, shape, dt))
        if lamport:   # every receive slot starts as the sentinel (sign bit only)
            for name in LAMPORT_REGIONS:
                region = getattr(self, name)[cfg.rank]
                ibits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[region.element_size()]
                region.view(ibits).fill_(torch.iinfo(ibits).min)
            if not self._sim:
                torch.cuda.synchronize(cfg.device)
            # no peer may write into this rank's buffer before the fill (the backend must be
            # safe on its own, not only behind EPDispatcher's agree())
            _arrive(group, "p2p EP lamport workspace")
        self.expert_x = torch.empty(cfg.wire_shape, dtype=cfg.dtype, device=dev)
        self.counts = torch.zeros(L, dtype=torch.int32, device=dev)
        if cfg.packed:   # ep_packed_offsets_kernel's outputs and state (the programs'
            # summed histogram, last-out counter, call counter); the dispatch's biased counts
            self.offsets_d = torch.zeros(L + 1, dtype=torch.int32, device=dev)
            self.hsum = torch.zeros(_next_pow2(cfg.num_experts), dtype=torch.int32, device=dev)
            self.hdone = torch.zeros(1, dtype=torch.int32, device=dev)
            self.hepoch = torch.zeros(1, dtype=torch.int32, device=dev)
            self._biased = torch.zeros(L, dtype=torch.int32, device=dev)
        self.cursor = torch.zeros(L, dtype=torch.int32, device=dev)
        self.done = torch.zeros(1, dtype=torch.int32, device=dev)
        self.slot_map = torch.full((W, M, K), -1, dtype=torch.int32, device=dev)
        if lamport:
            self.wloc = torch.zeros(W, M, K, dtype=torch.float32, device=dev)
            self.peer_T = torch.zeros(W, dtype=torch.int32, device=dev)
            self.buf_d = torch.zeros(self.G, dtype=torch.int32, device=dev)
            self.buf_c = torch.zeros(self.G, dtype=torch.int32, device=dev)
        else:
            self.epoch_d = torch.zeros(self.G, dtype=torch.int32, device=dev)
            # 2 G: one per program of the combine with roles (its grid is 2 Gc <= 2 G)
            self.epoch_c = torch.zeros(2 * self.G, dtype=torch.int32, device=dev)
        self.trace = None   # _trace: the lamport dispatch's stage stamps, int64 [G, NS, 2]
        if _trace:
            from ..kernels.moe import TRACE_STAGES
            self.trace = torch.zeros(self.G, len(TRACE_STAGES), 2, dtype=torch.int64, device=dev)
        self.err_dev = torch.zeros(4, dtype=torch.int32, device=dev)
        self.err_host = torch.zeros(4, dtype=torch.int32, pin_memory=not self._sim)
        self._dummy_x = torch.zeros(1, cfg.row_width, dtype=cfg.dtype, device=dev)
        self._dummy_ids = torch.full((1, K), -1, dtype=torch.int32, device=dev)
        self._dummy_w = torch.zeros(1, K, dtype=torch.float32, device=dev)
        if self._nce:
            self._ce_next = torch.ones(1, dtype=torch.int32, device=dev)   # the next epoch
            self._ce_stream = None if self._sim else torch.cuda.Stream(cfg.device)
        self.num_warps = int(num_warps)
        self.variants = {"POSTED": bool(posted_flags), "PDL": bool(pdl)}
        self.timeout_ns = int(get_config().timeout_s * 1e9)
        self._failed: CollectiveTimeoutError | None = None
        self._compile_only = False   # Loopback and warmup, see _launch
        self._warmed: set[int] | None = None   # in warmup: ids of the kernels _load loaded
        self._loaded: set[Any] = set()   # lamport (kernel, T class, dtypes) at both warp counts
        if not self._sim:
            torch.cuda.synchronize(cfg.device)   # zeroed flags visible before any peer signals

    def fingerprint(self) -> dict[str, Any]:
        return {"num_programs": self.G, "workspace_bytes": self.ws.nbytes,
                "protocol": self.protocol, "shift": self.shift,
                "num_warps": self.num_warps, "small_batch_warps": self._small_warps,
                "round_tokens": self.round_tokens,
                "tile_tokens": self.tiles[0], "combine_tile_tokens": self.tiles[1],
                "combine_split": self.combine_split, "interleave": self.interleave,
                "runtime_rounds": self._rt,
                "fuse": self._fuse,
                "fuse_combine": self._fuse_combine, "combine_roles": self._roles,
                "combine_roles_programs": self._Gc if self._roles else None,
                "ce_tokens": self._ce_tokens,
                "thread_spin": self._tspin, "meta_spin": self._mspin,
                "peer_spread": self._spread, "early_own": self._early,
                "claim_first": self._claim1, "gate": self._gate,
                "direct_counts": self._direct, "zero_program": self._zp,
                "packed": self.cfg.packed,
                **{k.lower(): v for k, v in self.variants.items()}}

    def _shape_consts(self, width: int | None) -> dict[str, Any]:
        """Both protocols' shape constants (and PDL's launch option); ``width``: the rows'
        (``H``), the hidden size by default (the dispatches pass ``cfg.row_width``: an fp8
        dispatch moves wire rows)."""
        c = self.cfg
        width = c.hidden_size if width is None else width
        extra = {"launch_pdl": True} if self.variants["PDL"] else {}
        return dict(RANK=c.rank, W=c.world_size, G=self.G, M=c.max_tokens_per_rank,
                    H=width, K=c.top_k, L=c.local_experts, E=c.num_experts,
                    BLOCK_H=_next_pow2(width), BLOCK_K=_next_pow2(c.top_k),
                    BLOCK_W=_next_pow2(c.world_size), USE_TIMER=not self._sim, **extra)

    def _consts(self, width: int | None = None) -> dict[str, Any]:
        """The flags kernels' constants (``width``: :meth:`_shape_consts`)."""
        return dict(self._shape_consts(width), CHUNK=self.round_tokens,
                    num_warps=self.num_warps, NT=32 * self.num_warps, **self.variants)

    def _roles_consts(self) -> dict[str, Any]:
        """:meth:`_consts` for the combine with roles: its warps, at most 128 registers. Keep
        the cap at 16 warps too: without it ptxas takes 117 registers and spills nothing
        (with it 128 and 12 bytes of spills; triton 3.6, sm_90a), yet the combine is slower:
        469-501 vs 387-390 us at 4096 tokens in loopback (session 12, docs/moe_sessions.md)."""
        extra = {} if self._sim else {"maxnreg": 128}
        return {**self._consts(), "G": self._Gc, "CHUNK": self._chunk_c,
                "num_warps": self._roles_warps, "NT": 32 * self._roles_warps,
                "PAIR": self._roles_pair, **extra}

    def _lamport_consts(self, tb: int, warps: int, width: int | None = None) -> dict[str, Any]:
        """The lamport kernels' constants at ``warps`` a program (``width``:
        :meth:`_shape_consts`)."""
        return dict(self._shape_consts(width), TB=tb,
                    BITS=8 * torch.empty(0, dtype=self.cfg.dtype).element_size(), NBUF=NBUF,
                    SHIFT=self.shift, PDL=self.variants["PDL"], num_warps=warps, NT=32 * warps)

    def _launch_lamport(self, kernel: Any, T: int, tb: int, ids: torch.Tensor,
                        w: torch.Tensor, *args: Any, width: int | None = None,
                        **kwargs: Any) -> None:
        """:meth:`_launch` of a lamport kernel for ``T`` own tokens in tiles of ``tb``, at the
        warps :func:`_lamport_warps` picks. Where it can pick two, the first call of each class
        of arguments that triton compiles apart (``T == 1``, ``T`` a multiple of 16, any other;
        the dtypes of the routing ``ids`` and weights ``w``, which are also in ``args``)
        compiles and loads both before it launches, so the warp switch adds no compile to a
        later call (one that would run while the peers spin, or inside a CUDA-graph capture
        that follows eager calls of the same sizes)."""
        warps = _lamport_warps(T, tb, self.G, self.combine_split, self.num_warps,
                               self._small_warps)
        key = (kernel, T == 1, T % 16 == 0, ids.dtype, w.dtype)
        if self._small_warps is not None and not self._sim and key not in self._loaded:
            for nw in (self.num_warps, self._small_warps):
                self._load(kernel, args, (self.G,), {**_at_warps(kwargs, nw, self._sim),
                                                     **self._lamport_consts(tb, nw, width)})
            self._loaded.add(key)
        self._launch(kernel, *args, **_at_warps(kwargs, warps, self._sim),
                     **self._lamport_consts(tb, warps, width))

    def _load(self, kernel: Any, args: tuple, grid: tuple, kwargs: dict[str, Any]) -> None:
        """Compile ``kernel`` for these arguments and load its module; launch nothing. Then make
        the context's stack limit hold the kernel's local memory (its register spills), so that
        its launch does not resize it: that resize waits for the running kernels, which in a
        :class:`~llmcomm.moe.loopback.Loopback` spin on ranks the host has yet to launch
        (:mod:`llmcomm._cuda`; session 22's EP=8 hang). Not while a CUDA graph is captured
        (the resize is no capturable call): run the same call eagerly first, or ``warmup()``.

        ``kwargs`` get :data:`~llmcomm.kernels.LAUNCH_OPTIONS` first, as :meth:`_launch` gives
        its launches: triton keys its in-memory cache on the options exactly as passed
        (``str(options)``, order included), so a load without them is a different entry from
        the launch it prepares, and that launch compiles (a disk-cache hit) and loads its
        module again -- while the peers' kernels spin. Session 24: the lamport warp count that
        only :meth:`_launch_lamport`'s both-warps pre-load had covered (16 warps for 33-127
        tokens, none a multiple of 16) did that at its first call after ``warmup()``; in a
        loopback launched rank after rank the load waited for rank 0's first dispatch, which
        waited for rank 1's, which the host had not launched yet, until the deadline."""
        kwargs = {**LAUNCH_OPTIONS, **kwargs}
        with torch.cuda.device(self.cfg.device):   # triton compiles for the current device
            k = kernel.warmup(*args, grid=grid, **kwargs)
        if hasattr(k, "result"):           # triton's asynchronous compile mode
            k = k.result()
        k._init_handles()
        if self._warmed is not None:
            self._warmed.add(id(k))
        local = 4 * int(getattr(k, "n_spills", 0) or 0)   # triton: local bytes / 4
        if local:
            with torch.cuda.device(self.cfg.device):
                if torch.cuda.is_current_stream_capturing():
                    if local > _cuda.stack_limit():
                        log.warning("%s needs %d bytes of local memory a thread, above the "
                                    "stack limit, and is first loaded inside a CUDA-graph "
                                    "capture; call warmup() (or the same call eagerly) before "
                                    "capturing", getattr(k, "name", kernel), local)
                else:
                    _cuda.ensure_stack_limit(local)

    def warmup(self, num_tokens: Sequence[int], ids_dtypes: Sequence[torch.dtype],
               weights_dtype: torch.dtype) -> int:
        """Compile and load both kernels for each token count and ids dtype (every warp count
        :meth:`_launch_lamport` may pick), through :meth:`dispatch` and :meth:`combine` with
        ``_compile_only`` set: exactly the arguments a real call passes, so triton's keys
        match), and with ``_ce_tokens`` the counts of :func:`_ce_warm_tokens` too. Local: no
        launch, no peer. The simulation compiles nothing ahead (returns 0).

        In turn, on this thread: threads would not help, triton 3.6 keeps the GIL while it
        compiles (session 15, the 2-core CPU machine: two lamport kernels for sm_90 took 9.2 s
        on two threads against 8.1 s one after the other)."""
        if self._sim:
            return 0
        c = self.cfg
        self._warmed, self._compile_only = set(), True
        try:
            counts = sorted({*num_tokens,
                             *_ce_warm_tokens(self._ce_tokens, c.max_tokens_per_rank)})
            with torch.cuda.device(c.device):
                for T in counts:
                    for ids_dtype in ids_dtypes:
                        x = torch.empty(T, c.row_width, dtype=c.dtype, device=c.device)
                        ids = torch.empty(T, c.top_k, dtype=ids_dtype, device=c.device)
                        w = torch.empty(T, c.top_k, dtype=weights_dtype, device=c.device)
                        _, _, state = self.dispatch(x, ids, w)
                        self.combine(self.expert_x, state, T)
            return len(self._warmed)
        finally:
            self._warmed, self._compile_only = None, False

    def _launch(self, kernel: Any, *args: Any, grid: int | None = None, **kwargs: Any) -> None:
        """``kernel[(grid or G,)](*args, **kwargs)``; with ``_compile_only`` set (by
        :class:`~llmcomm.moe.loopback.Loopback`), compile and load it for exactly these
        arguments instead and launch nothing. A loopback compiles and loads every rank's kernel
        before it launches any, so no rank's programs spin while a later rank's kernel is
        compiled or its module loaded (a module load may wait for running work; session 10's
        first loopback run, which compiled rank by rank between launches, hung every call until
        its deadline).

        On the dispatcher's device whatever the current one is: triton launches on the current
        device's stream (as the TP p2p backend, which guards every launch the same way)."""
        g = (grid or self.G,)
        kwargs = {**LAUNCH_OPTIONS, **kwargs}
        dev = self.cfg.device
        if not self._sim and torch.cuda.current_device() != dev.index:
            with torch.cuda.device(dev):
                self._launch(kernel, *args, grid=grid, **kwargs)
            return
        if self._compile_only:
            self._load(kernel, args, g, kwargs)
        else:
            kernel[g](*args, **kwargs)

    def offsets(self, counts: torch.Tensor) -> torch.Tensor:
        return self.offsets_d   # written by ep_packed_offsets_kernel

    def dispatch(self, x, topk_ids, topk_weights):
        from ..kernels.moe import (ep_dispatch_kernel, ep_dispatch_lamport_kernel,
                                   ep_packed_offsets_kernel)

        if self._failed is not None:
            raise self._failed
        T = x.shape[0]
        if T == 0:
            x, topk_ids, topk_weights = self._dummy_x, self._dummy_ids, self._dummy_w
        c = self.cfg
        if self.protocol == "lamport":
            # _direct_counts: the claims count into `counts` (zeroed by program ZP first)
            cursor = self.counts if self._direct else self.cursor
            direct = {"DIRECT": True, "ZP": self._zp, "zflag": self.zflag} if self._direct \
                else {}
            self._launch_lamport(ep_dispatch_lamport_kernel, T, self.tiles[0], topk_ids,
                topk_weights, x, topk_ids, topk_weights, T, self.lx, self.lmeta, self.lcnt,
                self.expert_x, self.counts, cursor, self.done, self.slot_map, self.wloc,
                self.peer_T, self.buf_d, self.err_dev, self.err_host.data_ptr(),
                self.timeout_ns, CAP=c.capacity, BLOCK_L=_next_pow2(c.local_experts),
                TSPIN=self._tspin, MSPIN=self._mspin, SPREAD=self._spread, EARLY=self._early,
                CLAIM1=self._claim1, GATE=self._gate, **direct, **self._trace_args(),
                QW=self._qw, width=c.row_width)
            return self.expert_x, self.counts, (topk_ids, topk_weights)
        if c.packed:   # offsets + cursors from every rank's per-expert counts
            nw = 4
            self._launch(ep_packed_offsets_kernel,
                topk_ids, T, self.hist, self.hflag, self.hepoch, self.hsum, self.hdone,
                self.cursor, self.counts, self.offsets_d, self.err_dev,
                self.err_host.data_ptr(), self.timeout_ns,
                RANK=c.rank, W=c.world_size, G=self.G, K=c.top_k, L=c.local_experts,
                E=c.num_experts, CAP=c.slot_cap, ALIGN=c.packed_align, BT=32,
                BLOCK_K=_next_pow2(c.top_k),
                BLOCK_E=_next_pow2(c.num_experts), BLOCK_L=_next_pow2(c.local_experts),
                BLOCK_W=_next_pow2(c.world_size), USE_TIMER=not self._sim,
                POSTED=self.variants["POSTED"], PDL=self.variants["PDL"], num_warps=nw,
                NT=32 * nw, **({"launch_pdl": True} if self.variants["PDL"] else {}))
        ce = self._ce_tokens is not None and T >= self._ce_tokens
        side = self._ce_send(x, T) if ce and not self._compile_only else None
        self._launch(ep_dispatch_kernel,
            x, topk_ids, topk_weights, T,
            self.recv_x, self.recv_ids, self.recv_w, self.recv_T, self.flags_d,
            self.ce_flag if self._nce else self.flags_d,
            self._ce_next if self._nce else self.epoch_d,
            self.expert_x, self._biased if c.packed else self.counts, self.cursor, self.done,
            self.slot_map, self.epoch_d,
            self.err_dev, self.err_host.data_ptr(), self.timeout_ns,
            CAP=c.slot_cap, BLOCK_L=_next_pow2(c.local_experts), TB=self.tiles[0],
            INTERLEAVE=self.interleave, FUSE=self._fuse, CLAIM_RB=self._claim_rb, RT=self._rt,
            CE=ce, CE_MIN=self._ce_tokens or 0, **self._consts(c.row_width))
        if side is not None:   # the copies joined after the kernel's launch: they overlap it
            torch.cuda.current_stream(c.device).wait_stream(side)
        return self.expert_x, self.counts, (topk_ids, topk_weights)

    def _trace_args(self) -> dict[str, Any]:
        """The lamport dispatch's ``TRACE`` arguments: none by default (its PTX is then the same
        as a kernel without stamps), the stage buffer with ``_trace``."""
        return {} if self.trace is None else {"TRACE": True, "trace": self.trace}

    def trace_summary(self) -> dict[str, dict[str, float | None]]:
        """``_trace``: the dispatch's stages since ``self.trace`` was last zeroed, as mean
        microseconds after a program's entry: ``{stage: {"p0": program 0, "pH": program G // 2,
        "max": the largest program mean, "n": passes over every program}}`` (None where a
        program never passed the stage). Program 0 sends and receives token 0; at batches of
        at most ``G // 2`` tokens program ``G // 2`` places own token 0's rows."""
        from ..kernels.moe import TRACE_STAGES

        if self.trace is None:
            raise ValueError("trace_summary needs a backend created with _trace=True")
        t = self.trace.double().cpu()
        n = t[:, :, 1]
        mean = torch.where(n > 0, t[:, :, 0] / n.clamp_min(1) / 1000.0,
                           torch.full_like(n, float("nan")))
        out = {}
        for s, name in enumerate(TRACE_STAGES):
            col = mean[:, s]

            def at(p, col=col):
                v = float(col[p])
                return None if v != v else round(v, 3)

            seen = col[~col.isnan()]
            out[name] = {"p0": at(0), "pH": at(self.G // 2),
                         "max": round(float(seen.max()), 3) if seen.numel() else None,
                         "n": int(n[:, s].sum())}
        return out

    def _ce_send(self, x: torch.Tensor, T: int) -> Any:
        """``_ce_tokens``: this rank's rows into the peer's ``recv_x``, round by round (``CE``
        in :mod:`llmcomm.kernels.moe`), each followed by its flag (this call's epoch, which the
        previous dispatch kernel left in ``_ce_next``), by ``Tensor.copy_`` on the side stream
        (forked from the current one, after that kernel; returned for the join) -- in the
        simulation at once, before the kernel. Stream order puts a round's flag after its rows
        (a copy starts after the previous one on its stream completed).

        ``copy_`` is a ``cudaMemcpyAsync``, which the driver may run as a kernel on the SMs
        rather than on a copy engine: on one H200 a same-device copy did (session 17,
        ``benchmarks/probe_copy_engine.py``: it waited for spinning kernels on every SM). Such a
        copy needs SMs the dispatch grid leaves free, or the grid spins until its deadline.
        Whether a copy into a peer's buffer over NVLink runs on a copy engine is to be probed on
        two GPUs. (``cuMemcpyBatchAsync`` with ``PREFER_OVERLAP_WITH_COMPUTE`` is not an
        alternative: it cannot be captured into a CUDA graph, CUresult 900, and did not
        progress beside the spinners either.)"""
        c = self.cfg
        peer, span = 1 - c.rank, self.round_tokens * self.G
        x = x.contiguous()

        def send():
            for r, a in enumerate(range(0, T, span)):
                b = min(T, a + span)
                self.recv_x[peer][c.rank, a:b].copy_(x[a:b])
                self.ce_flag[peer][r * 2 + c.rank:r * 2 + c.rank + 1].copy_(self._ce_next)

        if self._sim:
            send()
            return None
        with torch.cuda.device(c.device):
            side = self._ce_stream
            side.wait_stream(torch.cuda.current_stream(c.device))
            with torch.cuda.stream(side):
                send()
        return side

    def combine(self, expert_out, state, num_tokens):
        from ..kernels.moe import (ep_combine_kernel, ep_combine_lamport_kernel,
                                   ep_combine_roles_kernel)

        if self._failed is not None:
            raise self._failed
        ids, w = state
        c = self.cfg
        y = torch.empty(num_tokens, c.hidden_size, dtype=c.dtype, device=expert_out.device)
        y_arg = y if num_tokens else self._dummy_x
        if self.protocol == "lamport":
            self._launch_lamport(ep_combine_lamport_kernel, num_tokens, self.tiles[1], ids, w,
                expert_out, ids, w, y_arg, num_tokens, self.lcomb, self.slot_map, self.wloc,
                self.peer_T, self.buf_c, self.err_dev, self.err_host.data_ptr(),
                self.timeout_ns, SPLIT=min(self.combine_split, _next_pow2(c.hidden_size)),
                TSPIN=self._tspin)
            return y
        if self._roles:
            self._launch(ep_combine_roles_kernel,
                expert_out, ids, w, y_arg, num_tokens,
                self.recv_w, self.recv_T, self.comb, self.flags_c, self.slot_map, self.epoch_c,
                self.err_dev, self.err_host.data_ptr(), self.timeout_ns, grid=2 * self._Gc,
                **self._roles_consts())
            return y
        self._launch(ep_combine_kernel,
            expert_out, ids, w, y_arg, num_tokens,
            self.recv_w, self.recv_T, self.comb, self.flags_c, self.slot_map, self.epoch_c,
            self.err_dev, self.err_host.data_ptr(), self.timeout_ns, TB=self.tiles[1],
            INTERLEAVE=self.interleave, FUSE=self._fuse_combine, RT=self._rt,
            **self._consts())
        return y

    def check_errors(self, sync: bool = True) -> None:
        if self._failed is not None:
            raise self._failed
        if sync and not self._sim:
            torch.cuda.synchronize(self.cfg.device)
        code = int(self.err_host[0])
        if code == 0:
            return
        self._failed = _timeout_error(code, _ranks(self.group), self.cfg.rank, self.timeout_s,
                                      self.G, self._ce_tokens, self._zp)
        raise self._failed

    @property
    def timeout_s(self) -> float:
        return self.timeout_ns / 1e9

    def close(self) -> None:
        self.ws = None  # type: ignore[assignment]
