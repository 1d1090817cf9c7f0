"""The checks every ``warmup()`` makes before compiling (``llmcomm._warmup``), through the two
public classes: not while torch.compile traces, not inside a CUDA-graph capture, token counts
an int sequence within the object's limit."""

from __future__ import annotations

import pytest
import torch

from llmcomm.allreduce.communicator import TPCommunicator
from llmcomm.errors import CaptureError
from llmcomm.moe.dispatcher import EPDispatcher


def _objects():
    """(owner, object, its token limit): the two classes with only what the checks read."""
    tp = object.__new__(TPCommunicator)
    tp.device, tp.max_tokens = torch.device("cuda", 0), 64
    ep = object.__new__(EPDispatcher)
    ep.device, ep.max_tokens_per_rank = torch.device("cuda", 0), 32
    return (("TPCommunicator", tp, 64), ("EPDispatcher", ep, 32))


@pytest.mark.parametrize("i", [0, 1])
@pytest.mark.parametrize("where, exc, says", [
    ((torch.compiler, "is_compiling"), RuntimeError, r"\.warmup\(\).*before torch.compile"),
    ((torch.cuda, "is_current_stream_capturing"), CaptureError,
     r"\.warmup\(\) must run before CUDA-graph")], ids=["compiling", "capturing"])
def test_warmup_refuses_to_run_inside_tracing_or_capture(monkeypatch, i, where, exc, says):
    owner, obj, _ = _objects()[i]
    monkeypatch.setattr(*where, lambda: True)
    with pytest.raises(exc, match=owner + says):
        obj.warmup([1])


@pytest.mark.parametrize("i", [0, 1])
@pytest.mark.parametrize("bad", [[], [-1], ["8"], [True], [1.0], "over"])
def test_warmup_rejects_bad_token_counts(monkeypatch, i, bad):
    owner, obj, limit = _objects()[i]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    if bad == "over":
        bad = [1, limit + 1]
    with pytest.raises(ValueError, match=rf"num_tokens must be a non-empty sequence of ints in "
                                         rf"\[0, max_tokens\w*={limit}\], got"):
        obj.warmup(bad)
