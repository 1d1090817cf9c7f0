"""Every rank of a p2p EP group in one process, on one GPU (tests and benchmarks only).

The ``p2p`` kernels need a peer to exchange with. :class:`Loopback` builds one
:class:`~llmcomm.moe.p2p.P2PBackend` per rank of a ``world_size``-rank group *on the same GPU*,
over workspace buffers that all of them address directly (instead of torch symmetric memory over
NVLink), and launches rank ``r``'s kernels on stream ``r`` so that the ranks' kernels run at the
same time, as they do on ``world_size`` GPUs. The kernels, their constants and the protocol are
exactly those of a real group; only the transport differs::

    lb = Loopback(2, num_experts=256, top_k=8, hidden_size=7168, max_tokens_per_rank=128,
                  dtype=torch.bfloat16)
    outs = lb.dispatch(xs, ids, ws)       # per rank: (expert_x [L, W*M, H], counts [L], state)
    ys = lb.combine([run_experts(o) for o in outs], outs, [x.shape[0] for x in xs])

What it is for: checking the kernels on a GPU (real code generation, real concurrency between a
rank's programs and its "peer's", CUDA-graph capture, deadlines) on a machine with one GPU, and
timing a kernel change against the same kernels before it (A/B). What it is not: a measurement
of NVLink, nor a bound on it in either direction. Every "peer" write is a local store, but both
ranks share one GPU's SMs (half the programs each) and HBM, and every call forks and joins the
rank streams: measured on one H200 (session 10), the decode pair at one token took 21.0 us in
loopback against 15.5 us on 2 x H200 over NVLink, and 789 us at 4096 tokens against 449. Compare
loopback figures only with loopback figures (A/B of a kernel change). Most of the small-batch
difference is the fork and join around every call: with the rank streams forked once before 50
pairs and joined once after (``benchmarks/bench_moe_loopback.py``'s ``pair_free_us``, session
19) one H200 takes 11.9-12.0 us for the one-token pair, against 12.33 on 2 x H200 (session 15;
session 16 changed the kernels since, on one GPU only).

Residency: a program of rank ``r`` waits for programs of its peers, so every program of every
rank must be resident at once; the grid defaults to ``min(128, M, SMs // world_size)`` programs
per rank and ``world_size * num_programs > SMs`` is refused. Every call first compiles and
loads every rank's kernels for its arguments (a cache lookup after the first time), then
launches them: no rank's programs wait while another rank's kernel is still being built. That
load also raises the context's stack limit to the kernel's local memory (its register spills;
``P2PBackend._load``, :mod:`llmcomm._cuda`): a launch that has to raise it waits for the kernels
running on the GPU, which here spin for ranks not launched yet (session 22: the EP=8 lamport
combine of rank 6 needs 1072 bytes a thread against the default 1024, and every EP=8 loopback
hung at its first call until the deadline).

PDL (programmatic dependent launch, the lamport default on sm_90+): a kernel's programs call
``griddepcontrol.launch_dependents`` at their start, so the next kernel of the same stream can
become resident (and wait) while the current one runs. On its own GPU a rank then holds two
grids, both its own, and nothing deadlocks. Here one rank's next grid can take the SMs that a
peer's current grid still needs, and the current grid waits for that peer: session 19's
free-running PDL pairs at 64 tokens (66 programs a rank, 16 warps) ran into the deadline. So a
:class:`Loopback` leaves PDL on only where two grids of every rank fit the SMs at one program
an SM (``2 * world_size * num_programs <= SMs``, :func:`loopback_pdl`), and refuses
``pdl=True`` otherwise. (Its own calls fork and join the rank streams around every
call, which keeps a rank's kernels from overlapping at all; the hazard is in free-running use.)
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .fp8 import to_wire, warm_quantize

log = logging.getLogger(__name__)


class LoopbackGroup:
    """Stand-in for the EP process group of :class:`Loopback`: ranks ``0..W-1`` of one process,
    whose workspaces are ``W`` byte buffers on one device, allocated by the first backend."""

    def __init__(self, world_size: int, device: torch.device) -> None:
        self.world_size = world_size
        self.device = device
        self._bufs: list[torch.Tensor] | None = None

    def ranks(self) -> list[int]:
        return list(range(self.world_size))

    def buffers(self, nbytes: int) -> list[torch.Tensor]:
        """The ``W`` workspace buffers (zeroed), the same list for every rank's backend."""
        if self._bufs is None:
            self._bufs = [torch.zeros(nbytes, dtype=torch.uint8, device=self.device)
                          for _ in range(self.world_size)]
        elif self._bufs[0].numel() != nbytes:
            raise ValueError(
                f"loopback workspace: rank 0 asked for {self._bufs[0].numel()} bytes, this rank "
                f"for {nbytes}; every rank of a Loopback must be created with the same arguments")
        return self._bufs


class Loopback:
    """``world_size`` p2p backends on one GPU, one stream each. See the module docstring.

    Args:
        world_size: ranks of the simulated EP group (2, 4, ...).
        num_experts, top_k, hidden_size, max_tokens_per_rank, dtype: as for
            :class:`~llmcomm.moe.EPDispatcher`.
        device: the GPU (default the current one).
        num_programs: grid of every kernel, per rank (default ``min(128, M, SMs // W)``,
            ``(SMs - 16) // W`` with ``_ce_tokens``: a same-device ``copy_`` runs on SMs);
            with ``_combine_roles`` the combine's is ``2 * _roles_programs`` (default
            ``SMs // (2 W)``).
        timeout_s: device deadline of every wait (default ``LLMCOMM_TIMEOUT_S``, as for a
            real group).
        packed, packed_align: the packed ``expert_x`` (``EPDispatcher(packed=True,
            packed_align=...)``); a rank's ``offsets`` are ``backends[r].offsets(counts)``.
        fp8: the fp8 dispatch (``EPDispatcher(fp8=True)``): :meth:`dispatch` quantises each
            rank's ``x`` into wire rows on that rank's stream (timed with the dispatch, as the
            dispatcher runs it), and a rank's ``expert_x`` is wire rows
            (:func:`llmcomm.moe.fp8.split_wire` views them).
        **backend_kwargs: passed to every :class:`~llmcomm.moe.p2p.P2PBackend`.
    """

    def __init__(self, world_size: int, num_experts: int, top_k: int, hidden_size: int,
                 max_tokens_per_rank: int, dtype: torch.dtype, device: Any = None,
                 num_programs: int | None = None, timeout_s: float | None = None,
                 packed: bool = False, packed_align: int = 1, fp8: bool = False,
                 **backend_kwargs: Any) -> None:
        if not isinstance(world_size, int) or world_size < 2:
            raise ValueError(f"world_size must be an int >= 2, got {world_size!r}")
        if num_experts % world_size:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by world_size "
                             f"({world_size})")
        if not torch.cuda.is_available():
            raise ValueError("Loopback runs the p2p kernels on a CUDA GPU; none is visible "
                             "(use the TRITON_INTERPRET simulation of tests/distributed on CPU)")
        device = torch.device("cuda", torch.cuda.current_device()) if device is None \
            else torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"Loopback needs a CUDA device, got {device}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        if num_programs is None:
            # _ce_tokens: the copies run as kernels on one GPU (session 17), so leave them SMs
            free = 16 if backend_kwargs.get("_ce_tokens") is not None else 0
            num_programs = max(1, min(128, max_tokens_per_rank, (sms - free) // world_size))
        if backend_kwargs.get("_combine_roles"):
            backend_kwargs.setdefault("_roles_programs",
                                      max(1, min(num_programs, sms // (2 * world_size))))
        for what, grid, most in (
                ("num_programs", num_programs, sms // world_size),
                ("_roles_programs (x 2)", 2 * backend_kwargs.get("_roles_programs", 0),
                 sms // world_size)):
            if grid > most:
                raise ValueError(
                    f"Loopback: {world_size} ranks x {grid} programs ({what}) = "
                    f"{world_size * grid} programs, but this GPU has {sms} SMs; every program "
                    f"of every rank must be resident at once (programs wait for their peers'), "
                    f"so give at most {most} programs a rank")
        pdl = loopback_pdl(world_size, num_programs, sms, backend_kwargs.get("pdl"))
        if pdl is False:
            backend_kwargs["pdl"] = False
        #: what a child process of :meth:`warmup` needs to build one of these ranks
        self._spec = ((world_size, num_experts, top_k, hidden_size, max_tokens_per_rank, dtype,
                       packed, packed_align, fp8), dict(num_programs=num_programs,
                                                        **backend_kwargs))
        self.packed, self.packed_align, self.fp8 = packed, packed_align, fp8
        self.group = LoopbackGroup(world_size, device)
        self.world_size = world_size
        self.device = device
        self.backends = [_rank_backend(self.group, r, self._spec) for r in range(world_size)]
        if timeout_s is not None:
            for be in self.backends:
                be.timeout_ns = int(timeout_s * 1e9)
        # High priority: torch hands out streams round-robin from a pool of 32 a priority, so a
        # default-priority stream a caller takes later (a benchmark's capture stream, say) can
        # be a rank's stream again. If the caller's current stream were rank r's, rank r's
        # kernel would be enqueued before the ranks after it wait on that stream: they would
        # wait for it while it spins for them (session 26: the 4th Loopback of a benchmark
        # process hung in its first CUDA-graph timing). _each_rank refuses that case.
        self.streams = [torch.cuda.Stream(device, priority=-1) for _ in range(world_size)]
        torch.cuda.synchronize(device)   # every workspace filled before any kernel runs

    def warmup(self, num_tokens: Sequence[int],
               ids_dtypes: Sequence[torch.dtype] = (torch.int64,),
               weights_dtype: torch.dtype = torch.float32, processes: int = 0,
               timeout_s: float = 900.0) -> int:
        """Compile and load every rank's kernels for calls of ``num_tokens`` tokens a rank
        (:meth:`~llmcomm.moe.p2p.P2PBackend.warmup` of each rank, which launches nothing);
        returns how many kernels were loaded.

        The kernels are compiled per rank (``RANK`` is a constant) and per class of token
        counts that triton specialises apart (``T == 1``, ``T`` a multiple of 16, any other),
        one after another in this process: triton keeps the GIL while it compiles. At EP=8 one
        class is 32 kernels of ~25 s (session 22), over a 10-minute device call. With
        ``processes > 0`` the (rank, class) pairs are first compiled into triton's on-disk
        cache (``TRITON_CACHE_DIR``) by up to that many child processes, pair ``i`` in child
        ``i % processes``, each building the same :class:`Loopback` on this GPU; this process
        then only loads them (cache hits). The children are ``subprocess`` runs of this
        interpreter, so this works inside a daemonic process too (``run_ranks``); each must
        finish within ``timeout_s`` or it is killed and :class:`RuntimeError` names it."""
        if not isinstance(processes, int) or processes < 0:
            raise ValueError(f"processes must be an int >= 0, got {processes!r}")
        tokens = [int(t) for t in num_tokens]
        if processes:
            tasks = _warm_tasks(self.world_size, tokens)
            n = min(processes, len(tasks))
            t0 = time.monotonic()
            _compile_in_children(self._spec, self.device.index, tasks, tuple(ids_dtypes),
                                 weights_dtype, n, timeout_s)
            log.info("loopback warmup: %d (rank, token class) pairs compiled in %d processes "
                     "in %.0f s", len(tasks), n, time.monotonic() - t0)
        n = sum(be.warmup(tokens, ids_dtypes, weights_dtype) for be in self.backends)
        if self.fp8:
            c = self.backends[0].cfg
            n += warm_quantize(c.hidden_size, c.dtype, self.device)
        return n

    def _each_rank(self, call) -> list[Any]:
        """``call(r)`` for every rank on stream ``r``, concurrently; joined into the current
        stream (capturable: a fork and a join of streams in a CUDA graph). Every rank's kernel
        is compiled and loaded for these arguments first (``P2PBackend._launch``), so no
        launched program waits for a peer whose kernel is still being compiled or loaded."""
        for r, be in enumerate(self.backends):
            be._compile_only = True
            try:
                call(r)
            finally:
                be._compile_only = False
        cur = torch.cuda.current_stream(self.device)
        if any(s.cuda_stream == cur.cuda_stream for s in self.streams):
            raise ValueError(
                "Loopback: the current stream is one of the ranks' streams (torch's stream pool "
                "handed it out twice); a rank launched on it would be waited on by the ranks "
                "after it while it waits for them. Run the calls on a stream that is none of "
                "Loopback.streams")
        out = []
        for r, s in enumerate(self.streams):
            s.wait_stream(cur)
            with torch.cuda.stream(s):
                out.append(call(r))
        for s in self.streams:
            cur.wait_stream(s)
        return out

    def dispatch(self, xs: Sequence[torch.Tensor], topk_ids: Sequence[torch.Tensor],
                 topk_weights: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
        """Every rank's dispatch; per rank ``(expert_x, counts, state)`` (its backend's; with
        ``fp8`` ``xs`` are quantised first and ``expert_x`` is wire rows)."""
        def one(r: int) -> tuple[torch.Tensor, ...]:
            x = to_wire(xs[r], None, self.backends[r].cfg.dtype) if self.fp8 else xs[r]
            return self.backends[r].dispatch(x, topk_ids[r], topk_weights[r])

        return self._each_rank(one)

    def combine(self, expert_outs: Sequence[torch.Tensor], dispatched: Sequence[tuple],
                num_tokens: Sequence[int]) -> list[torch.Tensor]:
        """Every rank's combine of its ``dispatch`` output; per rank ``y [T_r, H]``."""
        return self._each_rank(lambda r: self.backends[r].combine(
            expert_outs[r], dispatched[r][2], num_tokens[r]))

    def check_errors(self) -> None:
        """Synchronise and raise the first rank's recorded deadline error, if any."""
        torch.cuda.synchronize(self.device)
        for be in self.backends:
            be.check_errors(sync=False)


def loopback_pdl(world_size: int, num_programs: int, sms: int,
                 requested: bool | None) -> bool | None:
    """The ``pdl`` a :class:`Loopback` passes to its backends (see the module docstring):
    ``requested`` as given when every rank's current and next grid fit the ``sms`` SMs at one
    program an SM (``None``: the backend's default), else ``False``; ``requested=True`` where
    they do not fit is a :class:`ValueError`.

    >>> loopback_pdl(2, 33, 132, None), loopback_pdl(2, 66, 132, None)
    (None, False)
    """
    if 2 * world_size * num_programs <= sms:
        return requested
    if requested:
        raise ValueError(
            f"Loopback: pdl=True needs room for every rank's next kernel beside the current "
            f"kernels of all ranks (a rank's next grid may take SMs its peers' current grids "
            f"still need): 2 x {world_size} ranks x {num_programs} programs = "
            f"{2 * world_size * num_programs} > {sms} SMs. Pass num_programs <= "
            f"{sms // (2 * world_size)}, or leave pdl unset (off here)")
    return False


def _rank_backend(group: LoopbackGroup, rank: int, spec: tuple) -> Any:
    """Rank ``rank``'s :class:`~llmcomm.moe.p2p.P2PBackend` of a :class:`Loopback` over
    ``group``, from its ``_spec`` (the constructor's resolved arguments)."""
    from .backends import EPConfig
    from .p2p import P2PBackend

    (world_size, num_experts, top_k, hidden_size, max_tokens_per_rank, dtype, packed, align,
     fp8), kwargs = spec
    return P2PBackend(group, EPConfig(rank, world_size, num_experts, top_k, hidden_size,
                                      max_tokens_per_rank, dtype, group.device, packed, align,
                                      fp8), **kwargs)


def _warm_tasks(world_size: int, tokens: Sequence[int]) -> list[tuple[int, list[int]]]:
    """The ``(rank, token counts)`` pairs of a parallel :meth:`Loopback.warmup`: ``tokens``
    split by the classes triton compiles apart (``T == 1``, a multiple of 16, any other; the
    order of first appearance), times every rank; class by class, rank by rank."""
    classes: dict[tuple[bool, bool], list[int]] = {}
    for t in tokens:
        classes.setdefault((t == 1, t % 16 == 0), []).append(t)
    return [(r, ts) for ts in classes.values() for r in range(world_size)]


def _compile_in_children(spec: tuple, device_index: int, tasks: list[tuple[int, list[int]]],
                         ids_dtypes: tuple, weights_dtype: torch.dtype, processes: int,
                         timeout_s: float,
                         target: str = "llmcomm.moe.loopback:_warm_child") -> None:
    """:meth:`Loopback.warmup`'s parallel compile: ``processes`` children, child ``c`` running
    ``target`` (``module:function``, :func:`_warm_child`; tests give another) on the
    ``(rank, token counts)`` pairs ``tasks[c::processes]``, pickled on its stdin; raises
    :class:`RuntimeError` with a child's output if it fails or outlives ``timeout_s``, after
    every child has ended."""
    module, func = target.split(":")
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])      # the folder that holds llmcomm/
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    # the children launch nothing concurrent: one hardware queue each. At 32 (the loopback
    # benchmark's setting) contexts run out before memory does: session 23, one H100, 24
    # processes creating a context at once: 3 succeeded at 32 connections ("CUDA error: out
    # of memory" for the rest, with 0.5 of 80 GB in use), all 24 at 1
    env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    children = []
    failed = []
    try:
        for c in range(processes):
            log_file = tempfile.TemporaryFile()      # not a pipe: a full pipe would block it
            p = subprocess.Popen([sys.executable, "-c",
                                  f"from {module} import {func}; {func}()"],
                                 stdin=subprocess.PIPE, stdout=log_file,
                                 stderr=subprocess.STDOUT, env=env)
            children.append((p, log_file))
            p.stdin.write(pickle.dumps((spec, device_index, tasks[c::processes], ids_dtypes,
                                        weights_dtype)))
            p.stdin.close()
        deadline = time.monotonic() + timeout_s
        for c, (p, log_file) in enumerate(children):
            what = f"child {c} (" + ", ".join(f"rank {r} at {ts}"
                                              for r, ts in tasks[c::processes]) + ")"
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                what += f" still compiling after {timeout_s:g} s"
            else:
                if not p.returncode:
                    continue
                what += f" exited with {p.returncode}"
            log_file.seek(0)
            failed.append(f"{what}:\n{log_file.read().decode(errors='replace')[-4000:]}")
    finally:
        for p, log_file in children:
            if p.poll() is None:
                p.kill()
                p.wait()
            log_file.close()
    if failed:
        raise RuntimeError("Loopback.warmup(processes=...): " + "\n".join(failed))


def _warm_child() -> None:
    """Body of a :func:`_compile_in_children` process: compile its (rank, token counts) pairs
    (the task pickled on stdin), each through that rank's backend alone, built over the
    group's shared workspaces and dropped after it. Not a whole :class:`Loopback`: at EP=8
    (hidden 7168, 128 tokens) every rank's ``expert_x`` is 470 MB, and 16 children that each
    held all eight ran one H100 out of memory (session 23, call 7)."""
    spec, device_index, tasks, ids_dtypes, weights_dtype = pickle.loads(sys.stdin.buffer.read())
    device = torch.device("cuda", device_index)
    torch.cuda.set_device(device)
    group = LoopbackGroup(spec[0][0], device)
    for r, tokens in tasks:
        be = _rank_backend(group, r, spec)
        n = be.warmup(tokens, ids_dtypes, weights_dtype)
        del be
        torch.cuda.empty_cache()
        log.info("rank %d at %s: %d kernels compiled", r, tokens, n)
