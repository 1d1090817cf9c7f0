"""Cross-rank agreement with deadlines: exchange small Python objects through the c10d store.

Every rank of a group calls :func:`exchange` with the same ``what`` in the same order. Each rank
writes its object under a key of its own and waits for the keys of the other ranks, polling
until ``get_config().timeout_s``. A rank that never arrives ends the wait with
:class:`~llmcomm.errors.CollectiveTimeoutError` that names it, instead of a hang.

Used at creation (topology facts, capability probes, launch fingerprints) and, with
``LLMCOMM_CHECK=1``, per call. It needs no device and works for gloo and NCCL groups alike.
"""

from __future__ import annotations

import itertools
import pickle
import time
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from .config import get_config
from .errors import CollectiveTimeoutError, ConfigMismatchError

_seq: dict[tuple[str, str], itertools.count] = defaultdict(itertools.count)
_POLL_S = 0.002


def group_ranks(group: Any) -> list[int]:
    """Global ranks of ``group`` in group-rank order."""
    import torch.distributed as dist

    return list(dist.get_process_group_ranks(group))


def group_label(group: Any) -> str:
    ranks = group_ranks(group)
    return "[" + ",".join(str(r) for r in ranks) + "]"


def _store() -> Any:
    from torch.distributed import distributed_c10d as c10d

    return c10d._get_default_store()


def exchange(obj: Any, group: Any, what: str, timeout_s: float | None = None) -> list[Any]:
    """All-gather ``obj`` over ``group``; returns the objects in group-rank order.

    Raises CollectiveTimeoutError naming the ranks (global numbering) that did not arrive.
    """
    import torch.distributed as dist

    ranks = group_ranks(group)
    me = dist.get_rank()
    if len(ranks) == 1:
        return [obj]
    timeout_s = get_config().timeout_s if timeout_s is None else timeout_s
    label = group_label(group)
    seq = next(_seq[(label, what)])
    prefix = f"llmcomm/{label}/{what}/{seq}/"
    store = _store()
    store.set(prefix + str(me), pickle.dumps(obj))
    keys = {r: prefix + str(r) for r in ranks}
    pending = set(ranks)
    deadline = time.monotonic() + timeout_s
    while pending:
        pending = {r for r in pending if not store.check([keys[r]])}
        if not pending:
            break
        if time.monotonic() > deadline:
            raise CollectiveTimeoutError(what, label, sorted(pending), timeout_s,
                                         detail=f"rank {me} waited in llmcomm.agree.exchange")
        time.sleep(_POLL_S)
    return [pickle.loads(store.get(keys[r])) for r in ranks]


def agree(fingerprint: Mapping[str, Any], group: Any, what: str) -> list[dict[str, Any]]:
    """Exchange ``fingerprint`` and raise ConfigMismatchError listing every differing field."""
    fps = [dict(fp) for fp in exchange(dict(fingerprint), group, what)]
    fields = sorted(set().union(*fps))
    diffs = {f: [fp.get(f, "<missing>") for fp in fps] for f in fields
             if any(fp.get(f, "<missing>") != fps[0].get(f, "<missing>") for fp in fps)}
    if diffs:
        raise ConfigMismatchError(f"{what} on group {group_label(group)}", diffs)
    return fps


class ArrivalLog:
    """Per-rank "I reached call #seq of <what>" markers in the store (one key per rank,
    overwritten), so a timed-out collective can name the ranks that never arrived."""

    def __init__(self, group: Any, what: str) -> None:
        import torch.distributed as dist

        self.ranks = group_ranks(group)
        self.label = group_label(group)
        self.me = dist.get_rank()
        self.prefix = f"llmcomm/arrive/{self.label}/{what}/"
        self.seq = 0

    def arrive(self) -> int:
        self.seq += 1
        _store().set(self.prefix + str(self.me), str(self.seq))
        return self.seq

    def missing(self, seq: int) -> list[int]:
        """Ranks whose latest marker is below ``seq`` (they never reached that call)."""
        store = _store()
        out = []
        for r in self.ranks:
            key = self.prefix + str(r)
            if not store.check([key]) or int(store.get(key)) < seq:
                out.append(r)
        return out


class CallChecker:
    """``LLMCOMM_CHECK=1``: every rank must make the same calls, in the same order, with the
    same agreed fields (e.g. the token count of an allreduce). Each checked call exchanges
    ``{"op", "seq", **fields}`` with a deadline; a difference is a ConfigMismatchError listing
    each rank's value, raised before any kernel runs. Off (free) unless the variable is set;
    skipped during CUDA-graph capture, where no host exchange can run."""

    def __init__(self, group: Any, what: str) -> None:
        self.group = group
        self.what = what
        self.seq = 0
        self.world_size = len(group_ranks(group))

    def __call__(self, op: str, **fields: Any) -> None:
        self.seq += 1
        if not get_config().check or self.world_size == 1:
            return
        import torch

        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return
        mine = {"op": op, "seq": self.seq, **fields}
        seen = exchange(mine, self.group, f"{self.what} call")
        diffs = {k: [s.get(k) for s in seen] for k in sorted(set().union(*seen))
                 if any(s.get(k) != mine.get(k) for s in seen)}
        if diffs:
            raise ConfigMismatchError(f"LLMCOMM_CHECK: {self.what} call #{self.seq} on "
                                      f"{group_label(self.group)}", diffs)


class TimedCollectives:
    """Deadlines for ``torch.distributed`` collectives on host (gloo) groups.

    ``run(op, launch)`` calls ``launch(async_op)``: on a CPU group with ``async_op=True`` and
    waits at most ``LLMCOMM_TIMEOUT_S`` for the returned work, turning an expiry or a dead peer
    into :class:`CollectiveTimeoutError` that names the ranks which never reached this call
    (from :class:`ArrivalLog`). On a CUDA (NCCL) group it calls ``launch(False)`` and adds nothing:
    the call must stay capturable in CUDA graphs, and NCCL's own watchdog timeout applies.
    """

    def __init__(self, group: Any, what: str, device_type: str) -> None:
        self.arrivals = ArrivalLog(group, what) if device_type == "cpu" else None

    def run(self, op: str, launch: Any) -> None:
        if self.arrivals is None:
            launch(False)
            return
        import datetime

        seq = self.arrivals.arrive()
        timeout = get_config().timeout_s
        try:
            work = launch(True)
            work.wait(timeout=datetime.timedelta(seconds=timeout))
        except RuntimeError as e:
            raise CollectiveTimeoutError(op, self.arrivals.label, self.arrivals.missing(seq),
                                         timeout, detail=f"{type(e).__name__}: {e}") from e
