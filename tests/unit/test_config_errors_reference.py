import pytest
import torch

from llmcomm import reference
from llmcomm.config import get_config
from llmcomm.errors import CollectiveTimeoutError, ConfigMismatchError


def test_config_defaults_and_multicast_switches():
    c = get_config({})
    assert c.timeout_s == 30.0 and not c.check and not c.multicast_disabled
    c = get_config({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                    "LLMCOMM_TIMEOUT_S": "2.5", "LLMCOMM_CHECK": "1", "LLMCOMM_NODE_ID": "n7"})
    assert c.multicast_disabled and len(c.multicast_disabled_by) == 2
    assert c.timeout_s == 2.5 and c.check and c.node_id == "n7"


@pytest.mark.parametrize("bad", ["abc", "0", "-1"])
def test_bad_timeout(bad):
    with pytest.raises(ValueError, match="LLMCOMM_TIMEOUT_S"):
        get_config({"LLMCOMM_TIMEOUT_S": bad})


def test_error_messages_name_everything():
    e = CollectiveTimeoutError("all_reduce", "[0,1]", [1], 5.0)
    assert "all_reduce" in str(e) and "[0,1]" in str(e) and "[1]" in str(e) and "5 s" in str(e)
    m = ConfigMismatchError("fp", {"hidden_size": [4096, 8192]})
    assert "rank 0=4096" in str(m) and "rank 1=8192" in str(m)


def test_reference_fused_semantics_fp64():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(5, 16, generator=g).bfloat16() for _ in range(3)]
    res = torch.randn(5, 16, generator=g).bfloat16()
    w = torch.rand(16, generator=g) + 0.5
    normed, r_out = reference.all_reduce_add_rms_norm(xs, res, w, 1e-6)
    s = sum(x.double() for x in xs) + res.double()
    assert torch.equal(r_out, s.bfloat16())
    r = r_out.double()
    expect = r / torch.sqrt((r * r).mean(-1, keepdim=True) + 1e-6) * w.double()
    assert (normed.double() - expect).abs().max() <= 1e-2 * expect.abs().max()


def test_reference_fp8_saturates_and_uses_dequant_scale():
    n = torch.tensor([[1.0, -1000.0, 1000.0, 0.5]])
    q = reference.quantize_fp8(n, torch.tensor(0.5))
    assert q.dtype == torch.float8_e4m3fn
    assert q.float().tolist() == [[2.0, -448.0, 448.0, 1.0]]
