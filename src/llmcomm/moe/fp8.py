"""FP8 dispatch (``EPDispatcher(fp8=True)``): tokens cross the wire as float8_e4m3fn with one
float32 scale per 128 channels, half the bytes of bf16 (DeepSeek-V3's activation layout, as
DeepEP's fp8 dispatch). The combine stays in the dispatcher's dtype.

A token's *wire row* is its bytes ``[q (H float8_e4m3fn) | s (H / 128 float32)]``, viewed as
``wire_width(H, dtype)`` elements of the dispatcher's dtype, so every backend moves it as it
moves a ``dtype`` row of that width (bit copies only: no backend does arithmetic on a
dispatched row). ``expert_x`` and ``expert_x_scale`` are then views of the received wire rows
(:func:`split_wire`): ``q`` is ``[..., H]`` and ``s`` ``[..., H / 128]``, rows ``wire_width *
esize`` bytes apart (not contiguous; ``.contiguous()`` them for a GEMM that needs it).

Quantisation of a bf16 / fp16 / fp32 ``x`` (:func:`quantize_to_wire`), in reference code
(:func:`llmcomm.moe.reference.quantize_fp8_blocks` computes it in float64)::

    xb = x.float().view(T, H // 128, 128)
    amax = xb.abs().amax(-1)                                  # [T, H / 128]
    s = 2.0 ** ceil(log2(amax / 448)), at least 2.0 ** -126   # float32, a power of two
    q = (xb / s[..., None]).clamp(-448, 448).to(torch.float8_e4m3fn)   # round to nearest even
    # dequantised: q.float() * s[..., None] ~= xb (3 mantissa bits)

Power-of-two scales (DeepEP's ``round_scale`` / UE8M0 form) make the quantisation exact to
reproduce: the GPU kernel, the torch path and the reference agree bit for bit; they use at least
half of the fp8 range (``amax / s`` in (224, 448] for any block with ``amax > 448 * 2**-126``).
``x`` must be finite (a block with an inf or nan quantises to unspecified values). A caller that quantised already (its own
scales, any float32 values) passes ``(q, s)`` to ``dispatch`` instead of ``x``: the pair is
packed into wire rows unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from ..kernels import LAUNCH_OPTIONS

#: channels per scale
FP8_BLOCK = 128
FP8_DTYPE = torch.float8_e4m3fn


def wire_width(hidden_size: int, dtype: torch.dtype) -> int:
    """Elements of ``dtype`` in one wire row: ``(H + 4 * H / 128) / esize``."""
    esize = torch.empty(0, dtype=dtype).element_size()
    return (hidden_size + 4 * (hidden_size // FP8_BLOCK)) // esize


def check_fp8_config(hidden_size: int, dtype: torch.dtype) -> None:
    """``ValueError`` unless an fp8 dispatch of this hidden size and dtype can be laid out."""
    if hidden_size % FP8_BLOCK:
        raise ValueError(f"fp8=True needs hidden_size divisible by {FP8_BLOCK} (one scale per "
                         f"{FP8_BLOCK} channels), got {hidden_size}; use fp8=False")
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"fp8=True quantises a bf16 / fp16 / fp32 activation, got dtype={dtype}; "
                         f"use fp8=False for {dtype}")


def split_wire(wire: torch.Tensor, hidden_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of wire rows ``[..., wire_width]``: ``(q [..., H] float8_e4m3fn, s [..., H / 128]
    float32)``."""
    b = wire.view(torch.uint8)
    return (b[..., :hidden_size].view(FP8_DTYPE),
            b[..., hidden_size:].view(torch.float32))


def quantize_to_wire(x: torch.Tensor, wire: torch.Tensor) -> None:
    """Quantise ``x [T, H]`` into ``wire [T, wire_width]`` (see the module doc). On a CUDA
    device one triton kernel (:mod:`llmcomm.kernels.quant`); elsewhere torch ops, exact alike."""
    T, H = x.shape
    if T == 0:
        return
    q, s = split_wire(wire, H)
    if x.device.type != "cuda":
        xb = x.float().view(T, H // FP8_BLOCK, FP8_BLOCK)
        bits = xb.abs().amax(-1).view(torch.int32)
        kb = ((bits >> 23) & 0xFF) - 8 + ((bits & 0x7FFFFF) > 0x600000).to(torch.int32)
        kb = kb.clamp_min(1)
        inv = ((254 - kb) << 23).view(torch.float32)
        q.view(T, H // FP8_BLOCK, FP8_BLOCK).copy_(
            (xb * inv.unsqueeze(-1)).clamp(-448.0, 448.0).to(FP8_DTYPE))
        s.copy_((kb << 23).view(torch.float32))
        return
    kernel, grid, (args, kwargs) = _quant_launch(x, wire)
    with torch.cuda.device(x.device):
        kernel[grid](*args, **kwargs)


def _quant_launch(x: torch.Tensor, wire: torch.Tensor) -> tuple[Any, tuple, dict[str, Any]]:
    """The quantisation kernel, its arguments and its keyword arguments for ``x`` / ``wire``."""
    from ..kernels.quant import fp8_block_quant_kernel

    T, H = x.shape
    q, s = split_wire(wire, H)
    nb = H // FP8_BLOCK
    bb = min(8, 1 << (nb - 1).bit_length())
    return (fp8_block_quant_kernel, (T, -(-nb // bb)),
            ((x, q, s), dict(H=H, Q_STRIDE=q.stride(0), S_STRIDE=s.stride(0), BB=bb,
                             num_warps=4, **LAUNCH_OPTIONS)))


def warm_quantize(hidden_size: int, dtype: torch.dtype, device: torch.device) -> int:
    """Compile and load the quantisation kernel for this shape (launch nothing); returns 1."""
    x = torch.empty(1, hidden_size, dtype=dtype, device=device)
    wire = torch.empty(1, wire_width(hidden_size, dtype), dtype=dtype, device=device)
    kernel, grid, (args, kwargs) = _quant_launch(x, wire)
    with torch.cuda.device(device):
        k = kernel.warmup(*args, grid=grid, **kwargs)
    if hasattr(k, "result"):           # triton's asynchronous compile mode
        k = k.result()
    k._init_handles()
    return 1


def to_wire(x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """New wire rows ``[T, wire_width(H, dtype)]`` of ``dtype``: ``x [T, H]`` quantised
    (:func:`quantize_to_wire`; ``scale`` None), or the caller's quantised ``(x, scale)`` packed
    (:func:`pack_to_wire`)."""
    wire = torch.empty(x.shape[0], wire_width(x.shape[1], dtype), dtype=dtype, device=x.device)
    if scale is None:
        quantize_to_wire(x.contiguous(), wire)
    else:
        pack_to_wire(x, scale, wire)
    return wire


def pack_to_wire(q: torch.Tensor, s: torch.Tensor, wire: torch.Tensor) -> None:
    """Copy a caller's quantised ``(q [T, H] float8_e4m3fn, s [T, H / 128] float32)`` into wire
    rows (two strided copies, no arithmetic)."""
    if q.shape[0] == 0:
        return
    wq, ws = split_wire(wire, q.shape[1])
    wq.copy_(q)
    ws.copy_(s)
