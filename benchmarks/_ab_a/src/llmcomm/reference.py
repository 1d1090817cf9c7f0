"""Pure-torch implementations: the semantics of every fused op, the CPU path of the ``torch``
backend, and the oracle of the tests.

All arithmetic in float32 (or wider); results are rounded to the input dtype once, at the end.
FP8 semantics (static scale, e4m3fn, saturating)::

    fp8 = clamp(n / quant_scale, -448, 448).to(torch.float8_e4m3fn)

where ``n`` is the float32 normed value (before rounding to the input dtype) and ``quant_scale``
is the *dequantisation* scale (``fp8.float() * quant_scale ~= n``), as vLLM's static FP8 quant.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def sum_ranks(xs: Sequence[torch.Tensor], acc_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``xs[0] + xs[1] + ...`` accumulated in ``acc_dtype`` in list (rank) order."""
    if not xs:
        raise ValueError("sum_ranks needs at least one tensor")
    acc = xs[0].to(acc_dtype).clone()
    for x in xs[1:]:
        acc += x.to(acc_dtype)
    return acc


def rms_norm(r: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``r * rsqrt(mean(r*r, -1) + eps) * weight`` in the dtype of ``r`` (use fp32/fp64)."""
    return r * torch.rsqrt((r * r).mean(dim=-1, keepdim=True) + eps) * weight.to(r.dtype)


def quantize_fp8(n: torch.Tensor, quant_scale: torch.Tensor | float) -> torch.Tensor:
    """Saturating static-scale quantisation of ``n`` (float32) to float8_e4m3fn."""
    scale = quant_scale if isinstance(quant_scale, torch.Tensor) else torch.tensor(quant_scale)
    q = (n.float() / scale.float().to(n.device)).clamp(-FP8_MAX, FP8_MAX)
    return q.to(torch.float8_e4m3fn)


def add_rms_norm(summed: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 out_dtype: torch.dtype, quant_scale: torch.Tensor | float | None = None,
                 acc_dtype: torch.dtype = torch.float32):
    """Epilogue semantics on an already reduced ``summed`` (any float dtype).

    Returns ``(normed, residual_out)`` or ``(fp8, residual_out, normed)`` when ``quant_scale``.
    """
    residual_out = (summed.to(acc_dtype) + residual.to(acc_dtype)).to(out_dtype)
    n = rms_norm(residual_out.to(acc_dtype), weight, eps)
    normed = n.to(out_dtype)
    if quant_scale is None:
        return normed, residual_out
    return quantize_fp8(n.float(), quant_scale), residual_out, normed


def all_reduce(xs: Sequence[torch.Tensor], acc_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Allreduce semantics: ``sum_ranks(xs)`` rounded to the inputs' dtype."""
    return sum_ranks(xs, acc_dtype).to(xs[0].dtype)


def all_reduce_add_rms_norm(xs: Sequence[torch.Tensor], residual: torch.Tensor,
                            weight: torch.Tensor, eps: float,
                            quant_scale: torch.Tensor | float | None = None,
                            acc_dtype: torch.dtype = torch.float32):
    """Fused-op semantics over every rank's input ``xs`` (each ``[T, H]``)."""
    return add_rms_norm(sum_ranks(xs, acc_dtype), residual, weight, eps, xs[0].dtype,
                        quant_scale, acc_dtype)
