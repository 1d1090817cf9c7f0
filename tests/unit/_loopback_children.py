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
    """Write the ranks and token counts this child got to ``$LOOPBACK_TEST_DIR``."""
    spec, device_index, ranks, tokens, ids_dtypes, weights_dtype = _task()
    with open(os.path.join(os.environ["LOOPBACK_TEST_DIR"], f"ranks_{ranks[0]}"), "w") as f:
        f.write(repr((ranks, tokens, device_index, [str(d) for d in ids_dtypes],
                      str(weights_dtype), spec[0][0])))


def fail_on_rank_one() -> None:
    """Exit 3 with a message in the child that holds rank 1; the others succeed."""
    ranks = _task()[2]
    if 1 in ranks:
        print(f"compile error in ranks {ranks}", flush=True)
        sys.exit(3)


def hang() -> None:
    _task()
    time.sleep(120)
