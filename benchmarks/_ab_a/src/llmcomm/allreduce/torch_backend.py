"""The ``torch`` allreduce backend: ``torch.distributed.all_reduce`` + llmcomm's epilogue.

Spans nodes (NCCL on GPU, gloo on CPU). On a GPU the add + RMSNorm (+FP8) after the allreduce
is one Triton kernel (:mod:`llmcomm.kernels.epilogue`); on the CPU it is
:func:`llmcomm.reference.add_rms_norm`.

Deadlines: on gloo (CPU) every collective waits at most ``LLMCOMM_TIMEOUT_S``; on expiry it
raises CollectiveTimeoutError naming the ranks that never reached the call (per-rank arrival
markers in the c10d store). A peer that exited raises the same error type. On NCCL the
collective is left to NCCL's own watchdog timeout (the call must stay CUDA-graph capturable).

Numerics: on the CPU the sum is taken in float32 (exactly the semantics of ``base.py``). NCCL
reduces in the input dtype in its own order, so on a GPU bf16/fp16 results may differ from the
float32 semantics by one rounding of the dtype; every rank still gets identical values.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..agree import TimedCollectives
from .epilogue import run_epilogue

logger = logging.getLogger(__name__)


class TorchAllReduceBackend:
    name = "torch"

    def __init__(self, group: Any, hidden_size: int, dtype: torch.dtype, max_tokens: int,
                 device: torch.device) -> None:
        self.group = group
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.max_tokens = max_tokens
        self.device = device
        self._gpu_epilogue = device.type == "cuda"
        self._timed = TimedCollectives(group, "torch.all_reduce", device.type)

    def fingerprint(self) -> dict[str, Any]:
        return {"backend": self.name, "epilogue": "triton" if self._gpu_epilogue else "torch"}

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            acc = x.float()  # a copy for low precision dtypes; sum in fp32
            if acc.data_ptr() == x.data_ptr():
                acc = acc.clone()
        else:
            acc = x.clone()
        self._collective(acc)
        return acc

    def _collective(self, t: torch.Tensor) -> None:
        """In-place sum over the group, with a deadline on gloo."""
        import torch.distributed as dist

        self._timed.run("all_reduce (torch backend)",
                        lambda async_op: dist.all_reduce(t, group=self.group, async_op=async_op))

    def all_reduce(self, x: torch.Tensor, out: torch.Tensor) -> None:
        if self.device.type == "cpu":
            out.copy_(self._reduce(x))
        else:
            out.copy_(x)
            self._collective(out)

    def all_reduce_add_rms_norm(self, x, residual, weight, eps, normed_out, residual_out,
                                quant_scale=None, fp8_out=None) -> None:
        summed = self._reduce(x)
        self.epilogue(summed, residual, weight, eps, normed_out, residual_out, quant_scale,
                      fp8_out)

    def epilogue(self, summed, residual, weight, eps, normed_out, residual_out,
                 quant_scale=None, fp8_out=None) -> None:
        """add + RMSNorm (+FP8) of an already reduced ``summed`` into the given outputs."""
        run_epilogue(summed, residual, weight, eps, normed_out, residual_out, quant_scale,
                     fp8_out, self.dtype)

    def close(self) -> None:
        pass
