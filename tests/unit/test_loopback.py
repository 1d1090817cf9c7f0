"""CPU checks of :mod:`llmcomm.moe.loopback` (its kernels run in tests/gpu/test_moe_loopback.py)."""

from __future__ import annotations

import pytest
import torch

from llmcomm.moe.loopback import Loopback, LoopbackGroup


def test_group_hands_every_rank_the_same_zeroed_buffers():
    g = LoopbackGroup(3, torch.device("cpu"))
    assert g.ranks() == [0, 1, 2]
    a = g.buffers(64)
    assert len(a) == 3 and all(b.numel() == 64 and int(b.abs().sum()) == 0 for b in a)
    a[1][5] = 7
    b = g.buffers(64)
    assert all(x is y for x, y in zip(a, b)) and int(b[1][5]) == 7


def test_group_refuses_a_rank_with_other_sizes():
    g = LoopbackGroup(2, torch.device("cpu"))
    g.buffers(64)
    with pytest.raises(ValueError, match="rank 0 asked for 64 bytes, this rank for 128"):
        g.buffers(128)


@pytest.mark.parametrize("world, experts, match", [(1, 8, "world_size must be an int >= 2"),
                                                    (3, 8, r"num_experts \(8\) must be divisible")])
def test_loopback_argument_errors(world, experts, match):
    with pytest.raises(ValueError, match=match):
        Loopback(world, experts, 2, 64, 16, torch.bfloat16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_loopback_without_gpu_says_so():
    with pytest.raises(ValueError, match="CUDA GPU; none is visible"):
        Loopback(2, 8, 2, 64, 16, torch.bfloat16)
