"""llmcomm.ops: the registry behind the torch.compile custom ops, and the fake shapes."""

import gc

import pytest
import torch

from llmcomm import ops


class _Obj:
    pass


def test_registry_holds_objects_weakly_and_names_a_dead_one():
    obj = _Obj()
    key = ops.register(obj)
    assert key.startswith("_Obj#") and ops._lookup(key) is obj
    assert ops.register(_Obj()) != key               # keys are unique in the process
    del obj
    gc.collect()
    assert key not in ops._OBJECTS                   # the entry goes with the object
    with pytest.raises(RuntimeError, match="keep it alive as long as the compiled model"):
        ops._lookup(key)


def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from llmcomm.moe.backends import EPConfig

    ep = _Obj()
    ep.local_experts, ep.hidden_size, ep.dtype = 4, 16, torch.bfloat16
    # EPDispatcher's: expert_x (L, capacity, H), or (rows, H) packed
    ep._cfg = EPConfig(0, 2, 8, 2, 16, 13, torch.bfloat16, torch.device("cpu"))
    key = ops.register(ep)
    # fp8: the op returns wire rows, (L, capacity, (H + 4 H / 128) / 2) bf16 elements
    ep8 = _Obj()
    ep8.local_experts, ep8.hidden_size, ep8.dtype = 4, 256, torch.bfloat16
    ep8._cfg = EPConfig(0, 2, 8, 2, 256, 13, torch.bfloat16, torch.device("cpu"), fp8=True)
    key8 = ops.register(ep8)
    with FakeTensorMode():
        wire, _ = torch.ops.llmcomm.moe_dispatch(torch.empty(13, 256, dtype=torch.bfloat16),
                                                 torch.empty(13, 2, dtype=torch.int64),
                                                 torch.empty(13, 2), key8)
        assert wire.shape == (4, 26, 132) and wire.dtype == torch.bfloat16
        x = torch.empty(13, 16, dtype=torch.bfloat16)
        ids = torch.empty(13, 2, dtype=torch.int64)
        w = torch.empty(13, 2)
        expert_x, counts = torch.ops.llmcomm.moe_dispatch(x, ids, w, key)
        assert expert_x.shape == (4, 26, 16) and expert_x.dtype == torch.bfloat16
        assert counts.shape == (4,) and counts.dtype == torch.int32
        y = torch.ops.llmcomm.moe_combine(expert_x, 13, key)
        assert y.shape == (13, 16) and y.dtype == torch.bfloat16
        q, r, n = torch.ops.llmcomm.all_reduce_add_rms_norm_fp8(x, x, w[0], 1e-6, w[0, :1], key)
        assert q.dtype == torch.float8_e4m3fn and q.shape == r.shape == n.shape == x.shape
