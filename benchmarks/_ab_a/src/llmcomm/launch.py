"""Spawn a small multi-process job: the one harness behind the tests, the demo and the benchmarks.

``run_ranks(fn, world_size, *args)`` spawns ``world_size`` processes (``spawn`` start method),
initialises ``torch.distributed`` in each (gloo on loopback by default, a file store, so no
ports are needed), calls ``fn(rank, world_size, *args)`` and returns the per-rank return values.

A rank that raises makes the run fail with that rank's traceback; a run that exceeds ``timeout``
seconds is killed and fails, so a hang ends as a test failure. Exit codes are checked.

``fn`` must be a module-level function (it is pickled by name). Extra environment variables for
the children go in ``env``; ``backend="nccl"`` puts rank r on ``cuda:r``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

from .errors import LlmcommError

SAFE_GPU_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


class RankFailure(LlmcommError):
    """A rank failed, died or hung; the message holds every failing rank's traceback."""


def _child(fn, rank, world_size, init_file, backend, env, args, results):
    os.environ.update(SAFE_GPU_ENV)
    os.environ.update(env)
    try:
        import torch
        import torch.distributed as dist

        kwargs = {}
        if backend == "nccl":
            torch.cuda.set_device(rank)
            kwargs["device_id"] = torch.device("cuda", rank)
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                                world_size=world_size, **kwargs)
        out = fn(rank, world_size, *args)
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - the result is in hand
            pass
        # plain pickle copies tensors by value: shared-memory handles would die with the child
        _report(results, (rank, True, pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        # first, and without tearing the group down: a peer may be blocked in a collective with
        # this rank, and NCCL's destroy can wait for it -- the error was then never reported and
        # the run read as a hang (session 15, 2 x H200). os._exit frees what the group held.
        _report(results, (rank, False, traceback.format_exc()))
        os._exit(1)
    os._exit(0)


def _report(results, item) -> None:
    results.put(item)
    results.close()
    results.join_thread()  # flush before os._exit


#: after a rank reports a failure (and none was expected): how long the others may still take
_GRACE_S = 15.0


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0,
              backend: str = "gloo", env: dict[str, str] | None = None,
              expect_failure: bool = False) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` fresh processes.

    Returns the list of return values indexed by rank. With ``expect_failure=True`` returns a
    list whose entry is ``("error", traceback)`` for ranks that raised, and the value otherwise;
    a rank still running at the deadline is always a failure (a hang). A rank that raises
    reports at once (before any teardown); without ``expect_failure`` the others then get
    ``_GRACE_S`` more seconds, and the :class:`RankFailure` carries the traceback.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_child, daemon=True,
                             args=(fn, r, world_size, init_file, backend, env or {}, args, results))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        got: dict[int, tuple[bool, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(got) < world_size and time.monotonic() < deadline:
            try:
                rank, ok, out = results.get(timeout=0.2)
                got[rank] = (ok, out)
                if not ok and not expect_failure:   # peers blocked on this rank will not finish
                    deadline = min(deadline, time.monotonic() + _GRACE_S)
                continue
            except queue.Empty:
                pass
            # a process that died without reporting (segfault, os._exit) ends the wait early
            dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in got]
            if dead:
                time.sleep(0.5)  # let a queued report arrive
                while True:
                    try:
                        rank, ok, out = results.get_nowait()
                        got[rank] = (ok, out)
                    except queue.Empty:
                        break
                for r in dead:
                    got.setdefault(r, (False, f"rank {r} died with exit code {procs[r].exitcode} "
                                              f"without reporting"))
                if not expect_failure:
                    break
        hung = [r for r in range(world_size) if r not in got]
        for p in procs:
            p.join(timeout=5 if not hung else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if hung and not expect_failure:
        raise RankFailure(f"ranks {hung} did not finish within {timeout:g} s (hang?); "
                          + _describe(got))
    if hung:
        raise RankFailure(f"ranks {hung} hung past {timeout:g} s even though a failure was "
                          f"expected: an error must end every rank, not hang it")
    failed = {r: v for r, (ok, v) in got.items() if not ok}
    if failed and not expect_failure:
        raise RankFailure(_describe(got))
    return [pickle.loads(got[r][1]) if got[r][0] else ("error", got[r][1])
            for r in range(world_size)]


def _describe(got: dict[int, tuple[bool, Any]]) -> str:
    parts = [f"--- rank {r} failed:\n{v}" for r, (ok, v) in sorted(got.items()) if not ok]
    return "\n".join(parts) or "no rank reported an error"
