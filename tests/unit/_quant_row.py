"""Test kernels around :func:`llmcomm.kernels.quant.quant_wire_row` and :func:`e4m3_bits` (the
lamport dispatch's fused fp8 quantisation), and their check against the float64 reference.
``python tests/unit/_quant_row.py`` runs the check in triton's interpreter (the caller sets
``TRITON_INTERPRET=1``: :mod:`tests.unit.test_fp8_quant`) and prints one JSON line."""

from __future__ import annotations

import json
import sys

import torch
import triton
import triton.language as tl

from llmcomm.kernels.quant import e4m3_bits, quant_wire_row
from llmcomm.moe.fp8 import split_wire, wire_width
from llmcomm.moe.reference import quantize_fp8_blocks


@triton.jit
def _rows_kernel(x_ptr, out_ptr, T, XH: tl.constexpr, QW: tl.constexpr, RW: tl.constexpr,
                 BLOCK_H: tl.constexpr, EPB: tl.constexpr, HW: tl.constexpr):
    t = tl.program_id(0)
    w = quant_wire_row(x_ptr + t * XH, t < T, XH, QW, BLOCK_H, EPB, HW)
    offs = tl.arange(0, BLOCK_H)
    tl.store(out_ptr + t * RW + offs, w, mask=offs < RW)


@triton.jit
def _bits_kernel(y_ptr, out_ptr, N: tl.constexpr, HW: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, e4m3_bits(tl.load(y_ptr + offs), HW))


def _values() -> torch.Tensor:
    """Every finite float8_e4m3fn value, the midpoints between neighbours (ties), and random
    values over the whole range and the subnormal one, as float32 in [-448, 448]."""
    g = torch.Generator().manual_seed(7)
    allv = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    fin = allv[torch.isfinite(allv)].sort().values
    return torch.cat([fin, (fin[:-1] + fin[1:]) / 2, torch.randn(3000, generator=g) * 40,
                      torch.randn(1000, generator=g) * 2.0 ** -8]).clamp(-448.0, 448.0)


def check(device: str, hw: bool) -> dict:
    """Mismatches against torch's conversion / the float64 reference: ``bits`` (e4m3_bits),
    and per (dtype, hidden) the wire rows' fp8 bytes and scales."""
    out = {}
    y = _values()
    n = 1 << (y.numel() - 1).bit_length()
    y = torch.cat([y, torch.zeros(n - y.numel())]).to(device)
    got = torch.empty(n, dtype=torch.int32, device=device)
    _bits_kernel[(1,)](y, got, N=n, HW=hw)
    want = y.cpu().to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int32)
    out["bits"] = int((got.cpu() != want).sum())
    g = torch.Generator().manual_seed(11)
    for dtype, H in ((torch.bfloat16, 256), (torch.float32, 256), (torch.float16, 384),
                     (torch.bfloat16, 7168)):
        esize = torch.empty(0, dtype=dtype).element_size()
        rw = wire_width(H, dtype)
        T = 6
        top = 4.0 if dtype == torch.float16 else 12.0
        x = (torch.randn(T, H, generator=g, dtype=torch.float64)
             * torch.logspace(-12.0, top, T, dtype=torch.float64)[:, None]).to(dtype)
        x[0, :128] = 0.0                                       # an all-zero block
        x[1, 8:14] = torch.tensor([0.0, 0.0, 0.0, -0.0, 1.0, 0.0], dtype=dtype)
        words = torch.full((T + 1, rw), -7, dtype=torch.int32, device=device)
        # T + 1 programs: the last one has no row (masked load) and stores don't-care words
        _rows_kernel[(T + 1,)](x.to(device), words, T, XH=H, QW=H // esize, RW=rw,
                               BLOCK_H=1 << (rw - 1).bit_length(), EPB=esize, HW=hw)
        wire = words[:T].cpu().to({2: torch.int16, 4: torch.int32}[esize]).view(dtype)
        q, s = split_wire(wire, H)
        rq, rs = quantize_fp8_blocks(x)
        out[f"{dtype}-{H}"] = [int((q.view(torch.uint8) != rq.view(torch.uint8)).sum()),
                               int((s != rs).sum())]
    return out


if __name__ == "__main__":
    print(json.dumps(check("cpu", hw=False)))
    sys.stdout.flush()
