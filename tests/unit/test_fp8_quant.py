"""The fp8 dispatch's quantisation (:mod:`llmcomm.moe.fp8`) against the float64 reference
(:func:`llmcomm.moe.reference.quantize_fp8_blocks`), bit for bit: the torch path on the CPU,
the triton kernel on a GPU (``gpu``). Fresh random rows over 24 decades, with the cases a
power-of-two scale is decided by: an all-zero block, ``amax`` exactly ``448 * 2**k`` and one
ulp above it, tiny (subnormal-scale) and large blocks, rows not a multiple of 8 blocks."""

from __future__ import annotations

import pytest
import torch

from llmcomm.moe.fp8 import (FP8_BLOCK, check_fp8_config, pack_to_wire, quantize_to_wire,
                             split_wire, wire_width)
from llmcomm.moe.reference import dequantize_fp8_blocks, quantize_fp8_blocks

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _rows(T: int, H: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    top = 4.0 if dtype == torch.float16 else 12.0       # fp16 overflows past 6.5e4
    mag = torch.logspace(-12.0, top, T, dtype=torch.float64).unsqueeze(1)
    x = (torch.randn(T, H, generator=g, dtype=torch.float64) * mag).to(dtype)
    x[0, :FP8_BLOCK] = 0.0                                # amax 0
    x[1, :FP8_BLOCK] = 448.0 * 2.0 ** -3                  # amax = 448 * 2**k: s = 2**k
    x[1, 5] = -x[1, 5]
    up = torch.nextafter(torch.tensor(56.0, dtype=dtype), torch.tensor(1e9, dtype=dtype))
    x[2, :FP8_BLOCK] = 1.0
    x[2, 7] = up                                          # one ulp above: s = 2**-2
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("H", [128, 384, 7168])
def test_quantize_matches_float64_reference(device, dtype, H):
    T = 37
    x = _rows(T, H, dtype, seed=H + T)
    wire = torch.full((T, wire_width(H, dtype)), float("nan"), dtype=dtype, device=device)
    quantize_to_wire(x.to(device), wire)
    q, s = split_wire(wire, H)
    rq, rs = quantize_fp8_blocks(x)
    assert q.dtype == torch.float8_e4m3fn and tuple(q.shape) == (T, H)
    assert s.dtype == torch.float32 and tuple(s.shape) == (T, H // FP8_BLOCK)
    assert torch.equal(s.cpu(), rs), (s.cpu() - rs).abs().max()
    same = q.cpu().view(torch.uint8) == rq.view(torch.uint8)
    assert bool(same.all()), f"{int((~same).sum())} fp8 bytes differ, first at " \
                             f"{(~same).nonzero()[0].tolist()}"
    assert float(s[1, 0]) == 2.0 ** -3 and float(s[2, 0]) == 2.0 ** -2
    # what the format promises: every value within half an fp8 step of x, the block max kept
    deq = dequantize_fp8_blocks(q.cpu(), s.cpu())
    xd = x.double()
    step = torch.maximum(xd.abs() * 2.0 ** -3, s.cpu().double().repeat_interleave(
        FP8_BLOCK, dim=1) * 2.0 ** -9)
    assert bool(((deq - xd).abs() <= step / 2 + 1e-300).all())


@pytest.mark.parametrize("device", DEVICES)
def test_pack_to_wire_keeps_callers_bytes(device):
    T, H = 5, 256
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 256, (T, H), generator=g, dtype=torch.uint8)
    q[q == 0x7F] = 0   # float8_e4m3fn NaN patterns: bytes are bytes, but keep the check plain
    q = q.view(torch.float8_e4m3fn)
    s = torch.rand(T, H // FP8_BLOCK, generator=g) * 3.0 + 0.1
    wire = torch.zeros(T, wire_width(H, torch.bfloat16), dtype=torch.bfloat16, device=device)
    pack_to_wire(q.to(device), s.to(device), wire)
    wq, ws = split_wire(wire, H)
    assert torch.equal(wq.cpu().view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(ws.cpu(), s)


def test_wire_layout_and_config_errors():
    assert wire_width(7168, torch.bfloat16) == (7168 + 4 * 56) // 2 == 3696
    assert wire_width(128, torch.float32) == 33
    with pytest.raises(ValueError, match="divisible by 128"):
        check_fp8_config(7000, torch.bfloat16)
    with pytest.raises(ValueError, match="bf16 / fp16 / fp32"):
        check_fp8_config(256, torch.float64)
