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

    ep = _Obj()
    ep.local_experts, ep.hidden_size = 4, 16
    ep.expert_x_shape = (4, 26, 16)   # EPDispatcher's: (L, capacity, H), or (rows, H) packed
    key = ops.register(ep)
    with FakeTensorMode():
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
