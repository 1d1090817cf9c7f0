"""``llmcomm bench allreduce|moe [ARGS...]``: run a benchmark sweep of ``benchmarks/`` across
ranks. The sweep prints its table and writes CSV/JSON and a PNG plot to ``--out``.

The sweeps live in the source tree (``benchmarks/bench_<name>.py``) so they can be run on a
machine without installing llmcomm (``PYTHONPATH=src python3 benchmarks/...``); this command
finds them next to the package of an editable install or in the current directory.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path
from typing import Any

SWEEPS = ("allreduce", "moe")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="benchmark sweeps (GPU): allreduce | moe",
                       description=__doc__)
    p.add_argument("sweep", choices=SWEEPS)
    p.add_argument("args", nargs=__import__("argparse").REMAINDER,
                   help="passed to the sweep, e.g. --hidden 4096 --check --out DIR")
    p.set_defaults(func=run)


def find_sweep(name: str) -> Path:
    here = Path(__file__).resolve()
    candidates = [here.parents[3] / "benchmarks" / f"bench_{name}.py",
                  Path.cwd() / "benchmarks" / f"bench_{name}.py"]
    for c in candidates:
        if c.is_file():
            return c
    raise SystemExit(f"llmcomm bench: benchmarks/bench_{name}.py not found (looked in "
                     f"{', '.join(str(c.parent) for c in candidates)}); run from a source checkout "
                     f"of llmcomm (pip install -e .)")


def run(args: Any) -> int:
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        raise SystemExit("llmcomm bench: the sweeps need 2 or more CUDA GPUs on one node; "
                         f"found {torch.cuda.device_count() if torch.cuda.is_available() else 0}")
    path = find_sweep(args.sweep)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    sys.argv = [str(path), *args.args]
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0)
    return 0
