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
    s, inv = _scale_bits(tl.max(tl.abs(x), axis=1))               # [BB]
    q = tl.clamp(x * inv[:, None], -448.0, 448.0)
    tl.store(q_ptr + t * Q_STRIDE + col, q.to(tl.float8e4nv), mask=ok)
    tl.store(s_ptr + t * S_STRIDE + blk, s, mask=blk < H // 128)


@triton.jit
def _scale_bits(amax):
    """The block scales of ``amax`` (float32 [N], the blocks' max |x|): ``(s, 1 / s)``, both
    float32 powers of two, exact."""
    bits = amax.to(tl.int32, bitcast=True)
    # amax = m * 2**e, m in [1, 2): 448 * 2**k >= amax for k = e - 8 when m <= 1.75, else e - 7
    kb = ((bits >> 23) & 0xFF) - 8 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)
    kb = tl.maximum(kb, 1)                                        # biased exponent of s
    return (kb << 23).to(tl.float32, bitcast=True), \
        ((254 - kb) << 23).to(tl.float32, bitcast=True)


@triton.jit
def e4m3_bits(y, HW: tl.constexpr):
    """float32 ``y`` (|y| <= 448) -> its float8_e4m3fn bits as int32 (0..255), round to nearest
    even. ``HW``: the GPU's conversion; else integer ops (triton's interpreter converts to fp8
    wrongly, session 32: 7.94 became 4): the fp32 exponent rebiased and the mantissa rounded
    to 3 bits (normal, ``|y| >= 2**-6``), or ``|y| * 512`` rounded (subnormal, 0..8; 8 is the
    smallest normal's code)."""
    if HW:
        out = y.to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.int32)
    else:
        b = y.to(tl.int32, bitcast=True)
        sign = (b >> 24) & 0x80
        a = b & 0x7FFFFFFF
        e = a >> 23
        keep = (a & 0x7FFFFF) >> 20
        rem = a & 0xFFFFF
        up = (rem > 0x80000) | ((rem == 0x80000) & ((keep & 1) == 1))
        normal = ((e - 120) << 3) + keep + up.to(tl.int32)
        t = a.to(tl.float32, bitcast=True) * 512.0
        r = tl.floor(t)
        ri = r.to(tl.int32)
        sub = ri + (((t - r) > 0.5) | (((t - r) == 0.5) & ((ri & 1) == 1))).to(tl.int32)
        out = sign | tl.where(e >= 121, normal, sub)
    return out


@triton.jit
def quant_wire_row(row_ptr, mask_row, XH: tl.constexpr, QW: tl.constexpr,
                   BLOCK_H: tl.constexpr, EPB: tl.constexpr, HW: tl.constexpr):
    """One token's fp8 wire row (:mod:`llmcomm.moe.fp8`) built in registers from its
    ``XH``-channel row at ``row_ptr`` (``mask_row``: load it at all): ``[BLOCK_H]`` int32
    words, word ``i`` the bits of wire element ``i`` (``EPB`` bytes, little-endian):

        i <  QW (= XH / EPB):   fp8 bytes of channels i*EPB .. i*EPB+EPB-1, quantised with
                                their block's power-of-two scale (fp8_block_quant_kernel's)
        i >= QW:                the float32 scales' bytes, EPB at a time (beyond the row:
                                don't-care)

    The caller casts the words to the wire dtype (``EPB`` bytes a word). Channels are loaded
    as ``[BLOCK_H, EPB]`` (word, byte), reshaped to ``[blocks, 128]`` for the blocks' max, and
    the scale words take their block's scale by a gather (``tl.gather``). (Loading them as
    ``[blocks, 128 / EPB, EPB]`` instead, no reshape, compiled to more barriers: 18 against
    14 a row at 8 warps, triton 3.6, sm_90.)"""
    NBB: tl.constexpr = BLOCK_H * EPB // 128
    offs = tl.arange(0, BLOCK_H)
    offs_e = tl.arange(0, EPB)
    col = offs[:, None] * EPB + offs_e[None, :]                       # [BLOCK_H, EPB]
    xv = tl.load(row_ptr + col, mask=col < tl.where(mask_row, XH, 0), other=0.0).to(tl.float32)
    s, inv = _scale_bits(tl.max(tl.reshape(tl.abs(xv), [NBB, 128]), axis=1))   # [NBB]
    invx = tl.reshape(tl.broadcast_to(inv[:, None], [NBB, 128]), [BLOCK_H, EPB])
    y = tl.clamp(xv * invx, -448.0, 448.0)
    word = tl.sum(e4m3_bits(y, HW) << (8 * offs_e)[None, :], axis=1)  # [BLOCK_H]
    j = tl.maximum(offs - QW, 0) * EPB                                # scale byte offset
    sb = tl.gather(s.to(tl.int32, bitcast=True), tl.minimum(j // 4, NBB - 1), 0)
    if EPB == 4:
        sword = sb
    else:
        sword = (sb >> ((j % 4) * 8)) & ((1 << (8 * EPB)) - 1)
    return tl.where(offs < QW, word, sword)
