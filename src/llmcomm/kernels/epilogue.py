"""Add + RMSNorm (+FP8) epilogue after an NCCL allreduce: one Triton kernel, one row per program.

Semantics (``summed`` is the already reduced ``[T, H]`` tensor in the communicator dtype)::

    residual_out = (summed.float() + residual.float()).to(dtype)
    r = residual_out.float()
    n = r * rsqrt(mean(r * r, -1) + eps) * weight.float()
    normed_out = n.to(dtype)
    fp8_out = clamp(n / quant_scale, -448, 448).to(float8_e4m3fn)     # when quant_scale is given
"""

from __future__ import annotations

import logging

import triton
import triton.language as tl

from . import LAUNCH_OPTIONS
from .allreduce import _epilogue

logger = logging.getLogger(__name__)

MAX_HIDDEN = 65536


@triton.jit(do_not_specialize=["T"])
def add_rms_norm_kernel(s_ptr, res_ptr, w_ptr, out_ptr, rout_ptr, q_ptr, scale_ptr, eps, T, H,
                        FP8: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    NP = tl.num_programs(0)
    k = tl.arange(0, BLOCK)
    for t in range(pid, T, NP):
        offs = tl.multiple_of(t * H, 8) + k
        m = k < H
        acc = tl.load(s_ptr + offs, mask=m, other=0.0).to(tl.float32)
        _epilogue(acc, offs, m, k, res_ptr, w_ptr, out_ptr, rout_ptr, q_ptr, scale_ptr, eps, H,
                  True, FP8)


def _num_warps(block: int) -> int:
    return min(32 if block > 16384 else 16, max(4, block // 512))


def add_rms_norm_epilogue(summed, residual, weight, eps, normed_out, residual_out,
                          quant_scale=None, fp8_out=None) -> None:
    """Fill ``residual_out``, ``normed_out`` (and ``fp8_out``) from ``summed`` (see module doc).

    Shapes: summed, residual, normed_out, residual_out ``[T, H]`` contiguous, one dtype
    (bf16/fp16/fp32) on one CUDA device; weight ``[H]`` (that dtype or fp32); quant_scale a
    float32 tensor of one element and fp8_out ``[T, H]`` float8_e4m3fn, both or neither.
    """
    import torch

    if summed.dim() != 2:
        raise ValueError(f"summed must be 2-D [tokens, hidden], got shape {list(summed.shape)}")
    T, H = summed.shape
    if H > MAX_HIDDEN:
        raise ValueError(f"add_rms_norm_epilogue supports hidden <= {MAX_HIDDEN}, got {H}")
    if H % 8:
        raise ValueError(f"hidden must be a multiple of 8, got {H}")
    for name, t in (("residual", residual), ("normed_out", normed_out),
                    ("residual_out", residual_out)):
        if t.shape != summed.shape or t.dtype != summed.dtype or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {summed.dtype} tensor of shape "
                             f"{list(summed.shape)}, got {t.dtype} {list(t.shape)}")
    if not summed.is_contiguous():
        raise ValueError("summed must be contiguous; call .contiguous() first")
    if weight.shape != (H,):
        raise ValueError(f"weight must have shape [{H}], got {list(weight.shape)}")
    if (quant_scale is None) != (fp8_out is None):
        raise ValueError("quant_scale and fp8_out must be given together")
    if fp8_out is not None:
        if fp8_out.dtype != torch.float8_e4m3fn or fp8_out.shape != summed.shape:
            raise ValueError(f"fp8_out must be float8_e4m3fn of shape {list(summed.shape)}")
        if quant_scale.dtype != torch.float32 or quant_scale.numel() != 1:
            raise TypeError("quant_scale must be a float32 tensor of one element")
    if T == 0:
        return
    block = triton.next_power_of_2(H)
    grid = (min(T, 1024),)
    fp8 = fp8_out is not None
    add_rms_norm_kernel[grid](
        summed, residual, weight, normed_out, residual_out,
        fp8_out if fp8 else normed_out, quant_scale if fp8 else weight, float(eps), T, H,
        FP8=fp8, BLOCK=block, num_warps=_num_warps(block), num_stages=1, **LAUNCH_OPTIONS)
