"""The contract every allreduce backend implements.

The :class:`~llmcomm.allreduce.communicator.TPCommunicator` validates every call (dtype, device,
shape, contiguity, capacity) and allocates the outputs; a backend only computes. Semantics, as
reference code over the ``W`` ranks' inputs ``x_0 .. x_{W-1}`` (each ``[T, H]``)::

    s = x_0.float() + x_1.float() + ... + x_{W-1}.float()        # fp32, fixed rank order
    all_reduce:                out = s.to(dtype)
    all_reduce_add_rms_norm:   residual_out = (s + residual.float()).to(dtype)
                               r = residual_out.float()
                               n = r * rsqrt(mean(r * r, dim=-1) + eps) * weight.float()
                               normed = n.to(dtype)
                               fp8 = clamp(n / quant_scale, -448, 448).to(float8_e4m3fn)  # optional

:mod:`llmcomm.reference` holds exactly this as runnable code.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class AllReduceBackend(Protocol):
    """What a TP allreduce backend provides. Instances belong to one communicator."""

    name: str
    #: largest token count one call may carry (the workspace capacity)
    max_tokens: int

    def fingerprint(self) -> dict[str, Any]:
        """Launch-relevant facts that must be identical on every rank (kernel table, sizes)."""
        ...

    def all_reduce(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """``out[T, H] = sum over ranks of x[T, H]``; ``out`` may alias nothing."""
        ...

    def all_reduce_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor,
                                weight: torch.Tensor, eps: float, normed_out: torch.Tensor,
                                residual_out: torch.Tensor,
                                quant_scale: torch.Tensor | None = None,
                                fp8_out: torch.Tensor | None = None) -> None:
        """Fill ``residual_out``, ``normed_out`` (and ``fp8_out`` when ``quant_scale`` is given).

        ``quant_scale`` is a float32 tensor of one element on the input's device.
        """
        ...

    def close(self) -> None:
        """Release workspaces. Safe to call twice."""
        ...
