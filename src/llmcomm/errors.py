"""Exceptions raised by llmcomm.

Caller mistakes (wrong dtype, shape, sizes) raise the built-in ``ValueError`` / ``TypeError``.
Problems of the environment or of the distributed job raise a subclass of :class:`LlmcommError`.
Every message says what was expected, what came, and how to fix it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class LlmcommError(RuntimeError):
    """Base class of every environment / distributed-job error raised by llmcomm."""


class BackendUnavailableError(LlmcommError):
    """An explicitly requested backend cannot run here (missing library, wrong topology, ...)."""


class CaptureError(LlmcommError):
    """Something that must happen before CUDA-graph capture was attempted during capture."""


class CollectiveTimeoutError(LlmcommError):
    """A cross-rank wait exceeded its deadline (``LLMCOMM_TIMEOUT_S``).

    Attributes:
        op: the operation that was waiting (e.g. ``"all_reduce_add_rms_norm"``).
        group: a description of the process group (its rank list).
        missing_ranks: group ranks that did not arrive, when known.
        timeout_s: the deadline that expired.
    """

    def __init__(self, op: str, group: Any, missing_ranks: Sequence[int], timeout_s: float,
                 detail: str = "") -> None:
        self.op = op
        self.group = group
        self.missing_ranks = list(missing_ranks)
        self.timeout_s = timeout_s
        missing = ", ".join(str(r) for r in self.missing_ranks) or "unknown"
        msg = (f"{op} on group {group} timed out after {timeout_s:g} s waiting for rank(s) "
               f"[{missing}]. Every rank of the group must make the same calls in the same order; "
               f"check that no rank skipped this call or exited, or raise LLMCOMM_TIMEOUT_S if "
               f"the peers are just slow.")
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


class ConfigMismatchError(LlmcommError):
    """Ranks of one group disagree on something that must be identical (launch fingerprint).

    ``diffs`` maps each differing field to the value seen on every rank.
    """

    def __init__(self, what: str, diffs: Mapping[str, Sequence[Any]]) -> None:
        self.diffs = {k: list(v) for k, v in diffs.items()}
        lines = [f"  {field}: " + ", ".join(f"rank {r}={v!r}" for r, v in enumerate(vals))
                 for field, vals in self.diffs.items()]
        super().__init__(
            f"{what}: ranks disagree on {len(self.diffs)} field(s); every rank must create it "
            f"with the same arguments, llmcomm version and environment:\n" + "\n".join(lines))
