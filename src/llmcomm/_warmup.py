"""Checks shared by the ``warmup()`` methods (``TPCommunicator``, ``EPDispatcher``).

``warmup()`` compiles triton kernels on the host, so it must run eagerly: not while
torch.compile traces (the compile would be traced too) and not inside a CUDA-graph capture
(a compile there is the very failure warmup exists to prevent).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .errors import CaptureError


def check_warmup_context(owner: str, device: torch.device) -> None:
    """Raise unless ``owner.warmup()`` (e.g. ``"EPDispatcher"``) may compile now.

    Raises:
        RuntimeError: inside torch.compile tracing.
        CaptureError: on a CUDA device whose current stream is capturing a graph.
    """
    if torch.compiler.is_compiling():
        raise RuntimeError(f"{owner}.warmup() compiles kernels on the host: call it once "
                           f"before torch.compile tracing, not inside it")
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise CaptureError(f"{owner}.warmup() must run before CUDA-graph capture, not inside it")


def is_int(v: Any) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(v, int) and not isinstance(v, bool)


def warm_counts(num_tokens: Iterable[int] | None, default: list[int], limit: int,
                limit_name: str) -> list[int]:
    """The token counts a ``warmup()`` covers: ``default`` when ``num_tokens`` is None, else
    ``list(num_tokens)``, each an int in ``[0, limit]``.

    Raises:
        ValueError: an empty sequence, or an entry that is not such an int (the message names
            ``limit_name``, the caller's argument that sets ``limit``).
    """
    counts = default if num_tokens is None else list(num_tokens)
    if not counts or not all(is_int(t) and 0 <= t <= limit for t in counts):
        raise ValueError(f"warmup: num_tokens must be a non-empty sequence of ints in "
                         f"[0, {limit_name}={limit}], got {num_tokens!r}")
    return counts
