"""llmcomm: communication for tensor- and expert-parallel LLM inference.

Fused allreduce + residual + RMSNorm (+FP8) over a TP group, MoE dispatch/combine over an EP
group, and the policy that picks a backend the same way on every rank, with reasons.

``import llmcomm`` imports neither triton nor any optional library; heavy pieces load on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from .errors import (BackendUnavailableError, CaptureError, CollectiveTimeoutError,  # noqa: E402
                     ConfigMismatchError, LlmcommError)
from .layout import Groups, ParallelLayout  # noqa: E402
from .policy import Decision  # noqa: E402

__all__ = [
    "__version__", "ParallelLayout", "Groups", "TPCommunicator", "EPDispatcher", "Decision",
    "LlmcommError", "BackendUnavailableError", "CaptureError", "CollectiveTimeoutError",
    "ConfigMismatchError",
]


def __getattr__(name: str) -> Any:
    if name == "TPCommunicator":
        from .allreduce.communicator import TPCommunicator

        return TPCommunicator
    if name == "EPDispatcher":
        from .moe import EPDispatcher

        return EPDispatcher
    raise AttributeError(f"module 'llmcomm' has no attribute {name!r}")
