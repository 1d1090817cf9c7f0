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
def test_warmup_refuses_torch_compile_tracing(monkeypatch, i):
    owner, obj, _ = _objects()[i]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(RuntimeError, match=rf"{owner}\.warmup\(\).*before torch.compile"):
        obj.warmup([1])


@pytest.mark.parametrize("i", [0, 1])
def test_warmup_refuses_a_capture(monkeypatch, i):
    owner, obj, _ = _objects()[i]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(CaptureError, match=rf"{owner}\.warmup\(\) must run before CUDA-graph"):
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
