"""Stand-ins for :func:`llmcomm.moe.loopback._warm_child` in the CPU tests of
:meth:`Loopback.warmup`'s parallel compile (``tests/unit/test_loopback.py``): each reads the
pickled task from stdin as the real child does."""

from __future__ import annotations

import os
import pickle
import sys
import time


def _task():
    return pickle.loads(sys.stdin.buffer.read())


def record() -> None:
    """Write the (rank, token counts) pairs this child got to ``$LOOPBACK_TEST_DIR``."""
    spec, device_index, tasks, ids_dtypes, weights_dtype = _task()
    name = "child_%d_%s" % tasks[0]
    with open(os.path.join(os.environ["LOOPBACK_TEST_DIR"], name), "w") as f:
        f.write(repr((tasks, device_index, [str(d) for d in ids_dtypes], str(weights_dtype),
                      spec[0][0])))


def fail_on_rank_one() -> None:
    """Exit 3 with a message in a child that holds rank 1; the others succeed."""
    tasks = _task()[2]
    if any(r == 1 for r, _ in tasks):
        print(f"compile error in {tasks}", flush=True)
        sys.exit(3)


def hang() -> None:
    _task()
    time.sleep(120)
