"""Shared data generation and checks for the MoE EP tests (CPU gloo and GPU NCCL)."""

from __future__ import annotations

from typing import Any

import torch

from llmcomm.moe.reference import (affine_expert, check_combine_output, dequantize_fp8_blocks,
                                   quantize_fp8_blocks, reference_combine, reference_dispatch)


def make_inputs(seed: int, world: int, tokens: list[int], num_experts: int, top_k: int,
                hidden: int, dtype: torch.dtype, routing: str = "random"
                ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every rank's (x, topk_ids, topk_weights) from one seed, so each rank knows them all.

    x rows are rank-tagged: x[t, 0] = source rank, x[t, 1:4] = t in base 16 (t % 16,
    t // 16 % 16, t // 256): integers of at most 4 significant bits, exact in bf16 and, as
    power-of-two multiples of a block scale, in the fp8 dispatch's float8_e4m3fn too. At
    ``hidden >= 16``, x[t, 8:14] = (0, 0, 0, -0.0, 1, 0): in an fp8 dispatch's wire rows
    (:mod:`llmcomm.moe.fp8`, fp8 bytes packed into ``dtype`` elements) bytes 8-11 then hold
    lamport's empty-slot sentinel (the sign bit alone) both as a 16-bit element (10, 11) and
    as a 32-bit one, and bytes 12-13 a bf16/fp16 denormal (a nonzero low byte); rows that a
    float compare to zero would flush or a sentinel test would wait on forever. The rest is
    random.
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in range(world):
        T = tokens[r]
        x = torch.randn(T, hidden, generator=g)
        x[:, 0] = r
        x[:, 1] = torch.arange(T) % 16
        x[:, 2] = torch.arange(T) // 16 % 16
        x[:, 3] = torch.arange(T) // 256
        if hidden >= 16:
            x[:, 8:14] = torch.tensor([0.0, 0.0, 0.0, -0.0, 1.0, 0.0])
        if routing == "random":
            ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k]
                               for _ in range(T)]) if T else torch.empty(0, top_k, dtype=torch.long)
        elif routing == "one_expert":          # every token of every rank to expert 0 (+ dups)
            ids = torch.zeros(T, top_k, dtype=torch.long)
        elif routing == "dups":                # repeated ids within a token
            ids = torch.randint(0, num_experts, (T, top_k), generator=g)
            if top_k > 1 and T:
                ids[:, 1] = ids[:, 0]
        elif routing == "low_experts":         # only the first expert block: others get nothing
            ids = torch.randint(0, max(1, num_experts // world), (T, top_k), generator=g)
        elif routing == "first_two":           # every token to experts 0 and 1 (+ others):
            # both fill to capacity on rank 0, so a packed layout's second segment starts at
            # its latest (the first one rounded up to packed_align)
            ids = torch.stack([torch.cat([torch.tensor([0, 1]), 2 + torch.randperm(
                num_experts - 2, generator=g)[:top_k - 2]]) for _ in range(T)]) if T \
                else torch.empty(0, top_k, dtype=torch.long)
        else:
            raise ValueError(routing)
        w = torch.rand(T, top_k, generator=g) + 0.1
        out.append((x.to(dtype), ids, w))
    return out


def expert_rows(expert_x: torch.Tensor, counts: list[int], offsets: list[int] | None,
                le: int) -> torch.Tensor:
    """Local expert ``le``'s valid rows: ``expert_x[le, :counts[le]]`` (padded) or
    ``expert_x[offsets[le]:offsets[le] + counts[le]]`` (packed, ``offsets`` given)."""
    if offsets is None:
        return expert_x[le, :counts[le]]
    return expert_x[offsets[le]:offsets[le] + counts[le]]


def check_offsets(counts: torch.Tensor, offsets: torch.Tensor, expert_x: torch.Tensor,
                  align: int = 1) -> list[int]:
    """A packed dispatch's ``offsets``: int32 ``[L + 1]``, ``[0, *cumsum(counts rounded up to
    align)]`` exactly, within ``expert_x``'s rows; returned as a list."""
    L = counts.shape[0]
    assert offsets.dtype == torch.int32 and tuple(offsets.shape) == (L + 1,), \
        (offsets.dtype, offsets.shape)
    got = offsets.cpu().tolist()
    want = [0]
    for c in counts.cpu().tolist():
        want.append(want[-1] + -(-c // align) * align)
    assert got == want, f"offsets {got} != [0, *cumsum(counts up to {align})] {want}"
    assert expert_x.dim() == 2 and got[-1] <= expert_x.shape[0], (expert_x.shape, got[-1])
    return got


def check_dispatch(rank: int, world: int, num_experts: int, inputs, expert_x: torch.Tensor,
                   counts: torch.Tensor, offsets: torch.Tensor | None = None,
                   align: int = 1, scale: torch.Tensor | None = None) -> int:
    """Every received row is checked against its source row; the multiset must be exact.
    ``offsets``: a packed dispatch's (checked against ``counts`` and ``align`` too).
    ``scale``: an fp8 dispatch's ``expert_x_scale``; each row's fp8 bytes and scales must be
    the float64 reference quantisation of its source row, bit for bit but for the sign of a
    zero (lamport sends an fp8 ``-0`` as ``+0`` where its byte pair reads as the sentinel)."""
    expected = reference_dispatch([ids for _, ids, _ in inputs], num_experts, rank)
    L = num_experts // world
    counts = counts.cpu()
    assert counts.dtype == torch.int32, counts.dtype
    assert tuple(counts.shape) == (L,), counts.shape
    if offsets is None:
        ex = expert_x[:, :max(1, int(counts.max()))].cpu()   # only the rows counted: fast
        sc = None if scale is None else scale[:, :ex.shape[1]].cpu()
        offs = None
    else:
        offs = check_offsets(counts, offsets, expert_x, align)
        ex = expert_x[:max(1, offs[-1])].cpu()
        sc = None if scale is None else scale[:ex.shape[0]].cpu()
    if scale is not None:
        assert expert_x.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32, \
            (expert_x.dtype, scale.dtype)
        assert tuple(scale.shape) == tuple(expert_x.shape[:-1]) + (expert_x.shape[-1] // 128,)
        quant = [quantize_fp8_blocks(x) for x, _, _ in inputs]
    cnt = counts.tolist()
    n = 0
    for le in range(L):
        c = cnt[le]
        want = expected[le]
        assert c == len(want), f"rank {rank} expert {le}: count {c} != expected {len(want)}"
        mine = expert_rows(ex, cnt, offs, le)
        if scale is None:
            rows = mine.float()
        else:
            mine_s = expert_rows(sc, cnt, offs, le)
            rows = dequantize_fp8_blocks(mine, mine_s)
        got = []
        for i in range(c):
            src = int(rows[i, 0])
            t = int(rows[i, 1]) + 16 * int(rows[i, 2]) + 256 * int(rows[i, 3])
            assert 0 <= src < world and 0 <= t < inputs[src][0].shape[0], (src, t)
            if scale is None:
                same = torch.equal(mine[i], inputs[src][0][t])
            else:
                q, s = quant[src]
                same = torch.equal(_fp8_bits(mine[i]), _fp8_bits(q[t])) and \
                    torch.equal(mine_s[i], s[t])
            assert same, \
                f"rank {rank} expert {le} row {i}: content differs from source ({src}, {t})"
            got.append((src, t))
        assert sorted(got) == want, f"rank {rank} expert {le}: got {sorted(got)} want {want}"
        n += c
    return n


def _fp8_bits(q: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn ``q``'s bytes with ``-0`` (0x80) as ``+0`` (0x00)."""
    b = q.view(torch.uint8)
    return torch.where(b == 0x80, torch.zeros_like(b), b)


def run_experts(rank: int, num_experts: int, world: int, expert_x: torch.Tensor,
                counts: torch.Tensor, offsets: torch.Tensor | None = None,
                scale: torch.Tensor | None = None, dtype: torch.dtype | None = None
                ) -> torch.Tensor:
    """expert_out: the affine test expert on valid rows, NaN (poison) everywhere else
    (``offsets``: a packed ``expert_x``'s; ``scale``: an fp8 one's scales, its rows
    dequantised first, ``expert_out`` in ``dtype``)."""
    L = num_experts // world
    out = torch.full(expert_x.shape, float("nan"), dtype=dtype or expert_x.dtype,
                     device=expert_x.device)
    cnt = counts.cpu().tolist()
    offs = None if offsets is None else offsets.cpu().tolist()
    for le in range(L):
        if cnt[le]:
            rows = expert_rows(expert_x, cnt, offs, le)
            rows = rows.double() if scale is None else \
                dequantize_fp8_blocks(rows, expert_rows(scale, cnt, offs, le)).to(rows.device)
            expert_rows(out, cnt, offs, le).copy_(
                affine_expert(rank * L + le, rows).to(out.dtype))
    return out


def check_combine(rank: int, inputs, y: torch.Tensor, dtype: torch.dtype,
                  what: str = "combine", fp8: bool = False) -> float:
    """``y`` against the dense reference; ``fp8``: of the reference-quantised tokens."""
    x, ids, w = inputs[rank]
    if fp8:
        x = dequantize_fp8_blocks(*quantize_fp8_blocks(x))
    return check_combine_output(y, reference_combine(x, ids, w), dtype, what=what)


def check_identity_call(rank: int, num_experts: int, dtype: torch.dtype, inputs,
                        counts: torch.Tensor, y: torch.Tensor) -> str:
    """One dispatch + combine of rank ``rank`` whose experts were the identity (the combine
    given ``expert_x`` itself): its ``counts`` (every local expert whose count is off) and its
    output ``y`` (``sum_k w_k x``) against the float64 reference; what failed, "" if nothing."""
    ref = reference_dispatch([c[1] for c in inputs], num_experts, rank)
    want = [len(ref[le]) for le in range(len(ref))]
    got = counts.cpu().tolist()
    off = [(le, got[le], want[le]) for le in range(len(want)) if got[le] != want[le]]
    if off:
        return f"rank {rank} counts off (expert, count, expected): {off[:8]}"
    x, ids, w = inputs[rank]
    try:
        check_combine_output(y, reference_combine(x, ids, w, expert_fn=lambda e, rows: rows),
                             dtype, what=f"rank {rank} combine")
    except AssertionError as e:
        return str(e)
    return ""


def roundtrip(ep: Any, rank: int, world: int, num_experts: int, inputs, dtype,
              device="cpu", pair: bool = False) -> tuple[int, float]:
    """One dispatch + combine of ``inputs[rank]``, every row and the output checked.
    ``pair``: an fp8 dispatcher gets ``x`` already quantised, as the reference's ``(q, s)``."""
    x, ids, w = (t.to(device) for t in inputs[rank])
    if pair:
        x = tuple(t.to(device) for t in quantize_fp8_blocks(x))
    d = ep.dispatch(x, ids, w)
    assert (d.offsets is not None) == ep.packed, (ep.packed, d.offsets)
    assert (d.expert_x_scale is not None) == ep.fp8, (ep.fp8, d.expert_x_scale)
    n = check_dispatch(rank, world, num_experts, inputs, d.expert_x, d.counts, d.offsets,
                       ep.packed_align, d.expert_x_scale)
    out = run_experts(rank, num_experts, world, d.expert_x, d.counts, d.offsets,
                      d.expert_x_scale, ep.dtype)
    y = ep.combine(out, d)
    err = check_combine(rank, inputs, y, dtype, what=f"{ep.backend} combine", fp8=ep.fp8)
    return n, err


#: routings and per-rank token counts (EP=2) of calls where both ranks hold at most one token,
#: for the GPU tests: the lamport dispatch's smallest batches (own rows placed by the other half
#: of the grid, most programs with nothing to send or receive); until session 29 they ran only
#: on the removed one-token path (``_one_token_slots``)
TINY_CASES = (("random", [1, 1]), ("dups", [1, 0]), ("random", [0, 1]), ("one_expert", [1, 1]))


def sentinel_calls(M: int) -> list[list[int]]:
    """Per-rank token counts of the lamport sentinel test's consecutive calls (EP=2, ``M``
    tokens at most), calls with both ranks at <= 1 token among them; call ``i`` draws
    ``make_inputs(70 + i, ...)``."""
    seq = [[M, M], [1, 8], [1, 1], [0, 1], [1, 0], [0, 0], [37, 0], [M, 5], [0, M], [17, 33],
           [M, M]]
    return [[min(t, M) for t in toks] for toks in seq]


def capture_graph(step):
    """Run ``step()`` once on a side stream (compile, warm up), then capture one call of it in a
    CUDA graph; returns ``(graph, what step returned inside the capture)``."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step()
    return g, out


def lamport_left(be, rank: int) -> list[str]:
    """What of a ``protocol="lamport"`` backend's receive slots (rank ``rank``'s, on a quiet
    group) is not the sentinel: nothing sent may be left unread, nothing read left unreset,
    and no reset overtaken by a late write."""
    from llmcomm.moe.p2p import LAMPORT_REGIONS

    bad = []
    for name in LAMPORT_REGIONS:
        reg = getattr(be, name)[rank]
        ib = {2: torch.int16, 4: torch.int32, 8: torch.int64}[reg.element_size()]
        idx = (reg.view(ib) != torch.iinfo(ib).min).nonzero().cpu()   # compared in place
        if len(idx):
            bad.append(f"rank {rank} {name}: {len(idx)} slots not reset, e.g. "
                       f"{idx[:3].tolist()}")
    return bad


def assert_lamport_sentinel(ep, rank: int, where: str) -> None:
    """:func:`lamport_left` of ``ep``'s backend is empty."""
    bad = lamport_left(ep._backend, rank)
    assert not bad, f"{where}: " + "; ".join(bad)
