"""Host side of llmcomm's add + RMSNorm (+FP8) epilogue on an already reduced sum.

Used wherever the allreduce itself runs elsewhere (NCCL/gloo in the torch backend, FlashInfer's
allreduce when its fusion is off): one Triton kernel on CUDA (:mod:`llmcomm.kernels.epilogue`),
:func:`llmcomm.reference.add_rms_norm` (the documented semantics) on the CPU.
"""

from __future__ import annotations

import torch

from .. import reference


def run_epilogue(summed: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 normed_out: torch.Tensor, residual_out: torch.Tensor,
                 quant_scale: torch.Tensor | None, fp8_out: torch.Tensor | None,
                 dtype: torch.dtype) -> None:
    """Fill ``residual_out = summed + residual``, ``normed_out`` (and ``fp8_out``); see base.py."""
    if summed.device.type == "cuda":
        from ..kernels.epilogue import add_rms_norm_epilogue

        add_rms_norm_epilogue(summed, residual, weight, eps, normed_out, residual_out,
                              quant_scale=quant_scale, fp8_out=fp8_out)
        return
    res = reference.add_rms_norm(summed, residual, weight, eps, dtype, quant_scale)
    if quant_scale is None:
        normed, r_out = res
    else:
        q, r_out, normed = res
        fp8_out.copy_(q)
    residual_out.copy_(r_out)
    normed_out.copy_(normed)
