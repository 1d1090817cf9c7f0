"""The Lamport allreduce kernels on the CPU (Triton interpreter, simulated peers).

Checks, per case: outputs against a float64 reference, this rank's data pushed (with -0.0 sent
as +0.0) into every peer's slot of the current buffer, its own receive slots reset to the
sentinel, the device epoch advanced once, and no error recorded. Covers the chunked kernel and
the software-pipelined rows kernel (lag 1-3, programs owning several tiles, fused and flat), at
W = 2..6 (one and two polling groups of four ranks).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# T, H, norm, rows, lag, W, rank, grid cap, epoch
CASES = [
    [3, 64, True, False, 1, 2, 0, 8, 0],
    [5, 40, True, True, 1, 2, 1, 8, 1],
    [13, 64, True, True, 2, 2, 0, 4, 2],
    [20, 48, True, True, 3, 3, 1, 6, 4],
    [7, 96, False, True, 1, 2, 1, 3, 5],
    [9, 64, False, False, 1, 3, 2, 8, 3],
    # grouped polling (four ranks per group): one full group, two groups, a lone own rank
    [6, 64, True, False, 1, 4, 2, 8, 0],
    [11, 48, True, True, 2, 4, 3, 4, 1],
    [5, 64, False, False, 1, 6, 5, 8, 2],
    [4, 32, True, True, 1, 5, 4, 4, 7],
]


def test_lamport_kernels_in_the_interpreter():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "src"), ROOT]))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "unit", "_lamport_sim.py"),
                           json.dumps(CASES)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(got) == len(CASES), proc.stdout[-2000:]
    for r in got:
        c = r["case"]
        assert r["err"] < 1e-6, r
        assert r["pushed"], f"{c}: this rank's data did not land in every peer's slot"
        assert r["reset"], f"{c}: receive slots were not reset to the sentinel"
        assert r["epoch_after"] == c[-1] + 1, r
        assert r["error_record"] == 0, r
