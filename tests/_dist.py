"""The tests' multi-process harness: :func:`llmcomm.launch.run_ranks` (one implementation,
shared with the demo and the benchmarks)."""

from llmcomm.launch import SAFE_GPU_ENV, RankFailure, run_ranks

__all__ = ["SAFE_GPU_ENV", "RankFailure", "run_ranks"]
