"""Triton kernel of the FP8 dispatch's block quantisation (launcher: :mod:`llmcomm.moe.fp8`).

``@triton.jit`` code only. One program quantises ``BB`` blocks of 128 channels of one token::

    amax = max |x[t, b*128:(b+1)*128]|                 (float32)
    s    = smallest power of two with amax <= 448 * s  (2**-126 at least)
    q    = clamp(x / s, -448, 448) -> float8_e4m3fn, round to nearest even

The power of two is found from ``amax``'s bits (exponent, and whether the mantissa exceeds
1.75 = 448 / 256), and ``x / s`` is a multiply by ``2**-k``: both exact, so the GPU, the
torch path of the launcher and the float64 reference agree bit for bit (a ``amax / 448`` scale
would divide, and triton's fp32 division is not correctly rounded).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def fp8_block_quant_kernel(x_ptr, q_ptr, s_ptr, H: tl.constexpr, Q_STRIDE: tl.constexpr,
                           S_STRIDE: tl.constexpr, BB: tl.constexpr):
    """``x [T, H]`` (any float dtype, rows contiguous) -> ``q`` (float8_e4m3fn, row stride
    ``Q_STRIDE``) and ``s`` (float32, row stride ``S_STRIDE``, ``H // 128`` a row). Grid
    ``(T, cdiv(H // 128, BB))``."""
    t = tl.program_id(0).to(tl.int64)
    b0 = tl.program_id(1) * BB
    blk = b0 + tl.arange(0, BB)                                   # [BB]
    col = blk[:, None] * 128 + tl.arange(0, 128)[None, :]         # [BB, 128]
    ok = col < H
    x = tl.load(x_ptr + t * H + col, mask=ok, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)                              # [BB]
    bits = amax.to(tl.int32, bitcast=True)
    # amax = m * 2**e, m in [1, 2): 448 * 2**k >= amax for k = e - 8 when m <= 1.75, else e - 7
    kb = ((bits >> 23) & 0xFF) - 8 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)
    kb = tl.maximum(kb, 1)                                        # biased exponent of s
    s = (kb << 23).to(tl.float32, bitcast=True)
    inv = ((254 - kb) << 23).to(tl.float32, bitcast=True)         # 1 / s, exact
    q = tl.clamp(x * inv[:, None], -448.0, 448.0)
    tl.store(q_ptr + t * Q_STRIDE + col, q.to(tl.float8e4nv), mask=ok)
    tl.store(s_ptr + t * S_STRIDE + blk, s, mask=blk < H // 128)
