"""Dense single-process reference for MoE expert-parallel dispatch and combine.

This module is the oracle every EP backend is checked against. It knows nothing about process
groups: it takes the inputs of *all* ranks (as lists indexed by rank) and computes, in float64,
what each rank must receive from ``dispatch`` and what ``combine`` must return.

Semantics (``E`` experts over ``W`` ranks, ``L = E // W`` local experts, contiguous blocks):

* expert ``e`` lives on rank ``e // L`` as local expert ``e % L``;
* ``dispatch`` delivers token ``t`` of rank ``s`` to local expert ``l`` of rank ``r`` exactly once
  when ``r * L + l`` is among the token's top-k ids (a repeated id counts once); over the wire the
  token travels once per destination *rank*, whatever number of its experts live there;
* ``combine`` returns ``y[t] = sum_k w[t, k] * f_{ids[t, k]}(x[t])``: every weight applied once,
  the sum over top-k taken once. A repeated id contributes once per occurrence (its weights add).

``check_combine_output`` is the contract check: it rejects outputs that are double-reduced,
unreduced, unweighted or otherwise off, with a message that names the likely mistake.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

ExpertFn = Callable[[int, torch.Tensor], torch.Tensor]

#: relative tolerance (max abs error / max abs reference) per output dtype. bf16 allows for the
#: rounding of the per-rank partial sums on the wire plus the final rounding.
RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}


def affine_expert(e: int, rows: torch.Tensor) -> torch.Tensor:
    """A cheap, exactly representable test expert: ``f_e(x) = x * (1 + e/8) + e / 16``."""
    return rows * (1.0 + e / 8.0) + e / 16.0


def quantize_fp8_blocks(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP8 dispatch's quantisation, computed in float64 (see :mod:`llmcomm.moe.fp8`):
    ``x [T, H]`` -> ``(q [T, H] float8_e4m3fn, s [T, H / block] float32)``, ``s`` the smallest
    power of two with ``amax <= 448 * s`` over each block (at least ``2**-126``)."""
    T, H = x.shape
    xb = x.detach().to("cpu", torch.float64).view(T, H // block, block)
    amax = xb.abs().amax(-1)
    k = torch.ceil(torch.log2(amax / 448.0)).clamp_min(-126.0)     # log2(0) = -inf: clamped
    s = torch.pow(2.0, k)
    q = (xb / s.unsqueeze(-1)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q.view(T, H), s.to(torch.float32)


def dequantize_fp8_blocks(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``q.double() * s`` with each scale over its block of channels: ``[..., H]`` float64."""
    block = q.shape[-1] // s.shape[-1]
    return (q.to(torch.float64) * s.to(torch.float64).repeat_interleave(block, dim=-1))


def expert_owner(topk_ids: torch.Tensor, num_experts: int, world_size: int) -> torch.Tensor:
    """Rank owning each routed expert (same shape as ``topk_ids``)."""
    return topk_ids.long() // (num_experts // world_size)


def reference_combine(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                      expert_fn: ExpertFn = affine_expert) -> torch.Tensor:
    """``y[t] = sum_k w[t,k] * expert_fn(ids[t,k], x[t])`` in float64 (one rank's tokens)."""
    xd = x.detach().to("cpu", torch.float64)
    ids = topk_ids.detach().to("cpu", torch.long)
    w = topk_weights.detach().to("cpu", torch.float64)
    y = torch.zeros_like(xd)
    for e in torch.unique(ids).tolist():
        hit = ids == e                                  # [T, K]
        rows = hit.any(dim=1).nonzero().flatten()
        if rows.numel() == 0:
            continue
        out = expert_fn(int(e), xd[rows])               # [n, H]
        weight = (w[rows] * hit[rows]).sum(dim=1, keepdim=True)
        y[rows] += weight * out
    return y


def reference_dispatch(topk_ids_by_rank: Sequence[torch.Tensor], num_experts: int,
                       rank: int) -> dict[int, list[tuple[int, int]]]:
    """For destination ``rank``: local expert -> sorted list of ``(source rank, token)`` pairs."""
    world = len(topk_ids_by_rank)
    local = num_experts // world
    out: dict[int, list[tuple[int, int]]] = {le: [] for le in range(local)}
    for src, ids in enumerate(topk_ids_by_rank):
        ids = ids.detach().cpu().long()
        for t in range(ids.shape[0]):
            for e in sorted(set(ids[t].tolist())):
                if rank * local <= e < (rank + 1) * local:
                    out[e - rank * local].append((src, t))
    return out


def tokens_sent(topk_ids: torch.Tensor, num_experts: int, world_size: int) -> int:
    """Rows a rank sends over the wire with per-rank dedup (self included)."""
    owner = expert_owner(topk_ids, num_experts, world_size)
    hit = torch.zeros(topk_ids.shape[0], world_size, dtype=torch.bool)
    if topk_ids.numel():
        hit.scatter_(1, owner.cpu(), True)
    return int(hit.sum())


def check_combine_output(y: torch.Tensor, y_ref: torch.Tensor, dtype: torch.dtype,
                         what: str = "combine") -> float:
    """Contract check of a combine output against the dense reference; returns the rel. error.

    Raises ``AssertionError`` naming the likely mistake when ``y`` is not the reduced output.
    """
    if tuple(y.shape) != tuple(y_ref.shape):
        raise AssertionError(
            f"{what}: output shape {tuple(y.shape)} != reference {tuple(y_ref.shape)}; combine must "
            f"return the reduced [T, hidden] output (an unreduced [T, top_k, hidden] or per-rank "
            f"partial output breaks the contract output_is_reduced=True)")
    yd = y.detach().to("cpu", torch.float64)
    rd = y_ref.detach().to("cpu", torch.float64)
    if yd.numel() == 0:
        return 0.0
    if not torch.isfinite(yd).all():
        raise AssertionError(f"{what}: output has non-finite values (unwritten rows?)")
    scale = rd.abs().max().clamp_min(1e-30)
    err = float((yd - rd).abs().max() / scale)
    tol = RTOL.get(dtype, 2.5e-2)
    if err <= tol:
        return err
    hint = ""
    denom = float((rd * rd).sum())
    if denom > 0:
        ratio = float((yd * rd).sum()) / denom          # least-squares scale of y onto y_ref
        if abs(ratio - round(ratio)) < 0.05 and round(ratio) >= 2:
            hint = (f" The output is about {round(ratio)}x the reference: it looks reduced more "
                    f"than once (e.g. a caller summed over top-k/ranks again).")
        elif 0 < ratio < 0.95:
            hint = (f" The output is about {ratio:.2f}x the reference: contributions are missing "
                    f"(unreduced or partially reduced output, e.g. only one rank's partial).")
    raise AssertionError(f"{what}: max relative error {err:.3g} > tolerance {tol:g} for {dtype}."
                         + hint)
