"""EP token-exchange backends built on torch.distributed collectives, and their shared contract.

Every backend derives from :class:`MoEBackend`. The combine contract is declared in exactly one
place, ``MoEBackend.output_is_reduced = True``: ``combine`` returns the final
``y[t] = sum_k w[t, k] * expert_out(t, k)``, weights applied once and the top-k sum done once.
A subclass may not override it; the dispatcher refuses a backend class that does.

Layouts shared by all backends (``W`` ranks, ``L`` local experts, ``M = max_tokens_per_rank``):

* padded (the default): ``expert_x`` is ``[L, capacity, H]`` with ``capacity = W * M`` (the
  worst case: every token of every rank routed to one expert; a token reaches an expert at most
  once), rows ``[:counts[l]]`` valid, in an unspecified order;
* packed (``EPConfig.packed``): ``expert_x`` is ``[rows, H]`` with ``rows = W * M * min(K, L)
  + L * (packed_align - 1)`` (the worst case of all experts together: a received token fills
  at most ``min(K, L)`` local experts' rows; plus each segment's padding), expert ``l``'s rows
  at ``[offsets[l], offsets[l] + counts[l])`` with ``offsets`` the exclusive prefix sum of the
  counts rounded up to ``packed_align`` (:func:`packed_offsets`), in an unspecified order; the
  other rows undefined.

``combine`` takes ``expert_out`` of ``expert_x``'s shape. With ``EPConfig.fp8`` a dispatched
row is a *wire row* of ``row_width`` elements (the token's fp8 bytes and scales,
:mod:`llmcomm.moe.fp8`) and ``expert_x`` has rows of that width; ``expert_out`` keeps ``H``.

Backends here:

* ``torch`` — ``all_to_all_single`` of the deduplicated rows (a token travels once to each
  destination rank). It works on any process group that implements all-to-all (NCCL across
  nodes, gloo on CPU). **It synchronises the host once per dispatch** (the split sizes are read
  back) and so cannot be captured in a CUDA graph.
* ``allgather`` — ``all_gather`` of every rank's tokens padded to ``M`` rows, local selection,
  then ``reduce_scatter`` of the per-rank partial sums. Static shapes, no host sync, graph-safe on
  NCCL; it moves ``W * M`` rows whatever the real token count (the engines' fallback path).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from ..agree import TimedCollectives


@dataclass(frozen=True)
class EPConfig:
    """What a backend needs to know; identical on every rank (checked by fingerprint)."""

    rank: int
    world_size: int
    num_experts: int
    top_k: int
    hidden_size: int
    max_tokens_per_rank: int
    dtype: torch.dtype
    device: torch.device
    packed: bool = False
    packed_align: int = 1
    fp8: bool = False

    @property
    def local_experts(self) -> int:
        return self.num_experts // self.world_size

    @property
    def capacity(self) -> int:
        return self.world_size * self.max_tokens_per_rank

    @property
    def rows(self) -> int:
        """Rows of ``expert_x`` over all local experts: ``L * capacity`` padded, ``W * M *
        min(K, L) + L * (packed_align - 1)`` packed."""
        if self.packed:
            return (self.capacity * min(self.top_k, self.local_experts)
                    + self.local_experts * (self.packed_align - 1))
        return self.local_experts * self.capacity

    @property
    def slot_cap(self) -> int:
        """The p2p kernels' ``CAP`` (row ``el * CAP + slot``, a slot below ``CAP``):
        ``capacity``, plus ``packed_align - 1`` packed (the cursors start at ``offsets[el] - el *
        CAP``, and ``offsets[el] + counts[el] <= (el + 1) * CAP`` needs that much room when every
        earlier segment is padded)."""
        return self.capacity + (self.packed_align - 1 if self.packed else 0)

    @property
    def expert_x_shape(self) -> tuple[int, ...]:
        """``(L, capacity, H)`` padded, ``(rows, H)`` packed (``expert_out``'s shape too)."""
        if self.packed:
            return (self.rows, self.hidden_size)
        return (self.local_experts, self.capacity, self.hidden_size)

    @property
    def row_width(self) -> int:
        """Elements of ``dtype`` in a dispatched row: ``H``, or with ``fp8`` the width of a wire
        row (its fp8 bytes and scales, :func:`llmcomm.moe.fp8.wire_width`)."""
        if self.fp8:
            from .fp8 import wire_width

            return wire_width(self.hidden_size, self.dtype)
        return self.hidden_size

    @property
    def wire_shape(self) -> tuple[int, ...]:
        """What a backend's ``dispatch`` returns as ``expert_x``: :attr:`expert_x_shape` with
        rows of :attr:`row_width` elements of ``dtype``."""
        return self.expert_x_shape[:-1] + (self.row_width,)


def packed_offsets(counts: torch.Tensor, align: int = 1) -> torch.Tensor:
    """``[0, *cumsum(ceil(counts / align) * align)]`` as int32 ``[L + 1]``: where each local
    expert's segment starts in a packed ``expert_x`` (its tokens are the first ``counts[l]``
    rows of it; ``offsets[L]``: where the last segment ends). Device ops only (no host sync,
    capturable, traceable by ``torch.compile``)."""
    zero = torch.zeros(1, dtype=torch.int32, device=counts.device)
    seg = counts if align == 1 else (counts + (align - 1)) // align * align
    return torch.cat([zero, torch.cumsum(seg, 0, dtype=torch.int32)])


def packed_row_experts(counts: torch.Tensor, offsets: torch.Tensor, rows: int) -> torch.Tensor:
    """``[rows]`` int32: the local expert whose token each row of a packed ``expert_x`` holds,
    ``-1`` for the others (a segment's padding, the rows past the last segment) -- the per-row
    expert index some grouped GEMMs take. In reference code::

        out = [-1] * rows
        for l in range(L):
            out[offsets[l]:offsets[l] + counts[l]] = [l] * counts[l]

    Device ops only (no host sync, capturable, traceable by ``torch.compile``)."""
    L = counts.shape[0]
    r = torch.arange(rows, dtype=torch.int32, device=counts.device)
    seg = torch.searchsorted(offsets[1:].contiguous(), r, right=True)   # L past the last one
    el = seg.clamp_max(L - 1)
    valid = (seg < L) & (r < offsets.index_select(0, el) + counts.index_select(0, el))
    return torch.where(valid, el, -1).to(torch.int32)


class MoEBackend:
    """Base class of every EP backend. Instances belong to one :class:`EPDispatcher`."""

    #: THE combine contract, declared once for every backend: ``combine`` returns the final,
    #: reduced output (weights applied once, top-k summed once). Do not override.
    output_is_reduced: ClassVar[bool] = True
    #: may ``dispatch``/``combine`` be captured in a CUDA graph (no host sync, static shapes)
    graph_safe: ClassVar[bool] = False
    name: ClassVar[str] = "?"

    def __init__(self, group: Any, cfg: EPConfig) -> None:
        self.group = group
        self.cfg = cfg

    def fingerprint(self) -> dict[str, Any]:
        """Backend facts that must agree on every rank (added to the dispatcher's fingerprint)."""
        return {}

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Return ``(expert_x, counts [L] int32, state for combine)``; ``expert_x`` of shape
        ``cfg.wire_shape`` (padded or packed, see the module doc). ``x`` is ``[T,
        cfg.row_width]``: the tokens, or with ``cfg.fp8`` their wire rows, which a backend
        moves as it moves any row (bit copies)."""
        raise NotImplementedError

    def offsets(self, counts: torch.Tensor) -> torch.Tensor:
        """A packed dispatch's ``offsets [L + 1]`` int32 for the ``counts`` it returned (device
        ops, no sync). Backends whose kernels compute them return their own."""
        return packed_offsets(counts, self.cfg.packed_align)

    def combine(self, expert_out: torch.Tensor, state: Any, num_tokens: int) -> torch.Tensor:
        """Return ``y [num_tokens, H]`` in the dispatcher's dtype, fully reduced."""
        raise NotImplementedError

    def warmup(self, num_tokens: Sequence[int], ids_dtypes: Sequence[torch.dtype],
               weights_dtype: torch.dtype) -> int:
        """Compile and load every kernel that ``dispatch``/``combine`` would launch for these
        token counts and input dtypes; launch nothing, talk to no peer. Return how many kernel
        variants are now loaded for them (backends without kernels of their own: 0)."""
        return 0

    def check_errors(self, sync: bool = True) -> None:
        """Raise an error recorded by a device kernel (backends without kernels: nothing)."""

    def close(self) -> None:
        """Release workspaces. Safe to call twice."""


# --------------------------------------------------------------------------------------------
# Local (per-rank) steps shared by the torch-collective backends. Pure tensor code, no sync.
# --------------------------------------------------------------------------------------------

def expand_to_experts(rows: torch.Tensor, ids: torch.Tensor, cfg: EPConfig,
                      expert_x_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy received rows into the per-expert layout (padded or packed, ``cfg.packed``).

    ``rows [N, H]`` and ``ids [N, K]`` (global expert ids, ``-1`` = nothing) are the rows that
    reached this rank (``H``: ``cfg.row_width``, an fp8 dispatch's wire rows included);
    ``expert_x_rows`` is ``[cfg.rows + 1, H]`` (the last row is a scratch row
    that absorbs writes of non-local entries, so no boolean indexing and no host sync is needed).
    Returns ``counts [L] int32`` and ``slot [N, K] int64``: the flat row of ``expert_x`` that
    holds ``(n, k)`` (padded: ``l * cap + i``; packed: ``offsets[l] + i``), or ``-1`` when
    ``ids[n, k]`` is not a local expert. A repeated id in one row gets one slot; every repeat
    points at it (so its weights add up in ``combine``). Slots within an expert follow the
    order of ``rows`` (deterministic).
    """
    n, k = ids.shape
    L, cap = cfg.local_experts, cfg.capacity
    dev = ids.device
    el = ids.long() - cfg.rank * L
    local = (ids >= 0) & (el >= 0) & (el < L)
    same = ids.unsqueeze(2) == ids.unsqueeze(1)                        # [N, K, K]
    earlier = torch.ones(k, k, dtype=torch.bool, device=dev).tril(-1)   # j < i
    dup = (same & earlier).any(dim=2)                                  # an earlier k has it
    first_pos = torch.where(same & (earlier | torch.eye(k, dtype=torch.bool, device=dev)),
                            torch.arange(k, device=dev).expand(k, k), k).amin(dim=2)  # [N, K]
    first = local & ~dup
    key = torch.where(first, el, L).flatten()                          # [N*K], L = "none"
    counts_ext = torch.zeros(L + 1, dtype=torch.long, device=dev)
    counts_ext.scatter_add_(0, key, torch.ones_like(key))
    order = torch.sort(key, stable=True).indices
    starts = torch.cumsum(counts_ext, 0) - counts_ext
    sorted_key = key[order]
    rank_in_key = torch.arange(key.numel(), device=dev) - starts[sorted_key]
    slot_in_expert = torch.empty_like(key)
    slot_in_expert[order] = rank_in_key
    # packed: the expert's segment start (key L, "none", reads offsets[L]: a scratch-row entry)
    start = packed_offsets(counts_ext[:L], cfg.packed_align)[key] if cfg.packed else key * cap
    flat = torch.where(first.flatten(), start + slot_in_expert, cfg.rows)  # else: scratch row
    src_row = torch.arange(n, device=dev).repeat_interleave(k)
    if flat.numel():
        expert_x_rows.index_copy_(0, flat, rows.index_select(0, src_row))
    slot_first = torch.where(first, flat.view(n, k), -1)
    slot = torch.gather(slot_first, 1, first_pos)                      # repeats -> first slot
    slot = torch.where(local, slot, -1)
    return counts_ext[:L].to(torch.int32), slot


def weighted_partial(expert_out: torch.Tensor, slot: torch.Tensor, weights: torch.Tensor
                     ) -> torch.Tensor:
    """``p[n] = sum_k w[n, k] * expert_out[slot[n, k]]`` over local entries, float32, k order."""
    flat = expert_out.reshape(-1, expert_out.shape[-1])
    n, k = slot.shape
    acc = torch.zeros(n, flat.shape[1], dtype=torch.float32, device=flat.device)
    w = weights.float()
    for j in range(k):
        idx = slot[:, j]
        valid = (idx >= 0).unsqueeze(1)
        v = flat.index_select(0, idx.clamp_min(0)).float()
        acc += torch.where(valid, w[:, j:j + 1] * v, 0.0)   # where(): garbage rows never leak
    return acc


def _new_expert_x(cfg: EPConfig) -> torch.Tensor:
    """``[cfg.rows + 1, row_width]``: ``expert_x``'s rows and the scratch row of
    :func:`expand_to_experts`."""
    return torch.empty(cfg.rows + 1, cfg.row_width, dtype=cfg.dtype, device=cfg.device)


def _pack_meta(ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """ids int32 and weights float32 in one int32 tensor ``[N, 2K]`` (one collective)."""
    return torch.cat([ids.to(torch.int32), weights.to(torch.float32).view(torch.int32)], dim=1)


def _unpack_meta(meta: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return meta[:, :k], meta[:, k:].contiguous().view(torch.float32)


@dataclass
class _A2AState:
    send_idx: list[torch.Tensor]     # per destination rank: token indices sent there
    send_splits: list[int]
    recv_splits: list[int]
    slot: torch.Tensor               # [N_recv, K]
    recv_w: torch.Tensor             # [N_recv, K] float32


class _CollectiveBackend(MoEBackend):
    """Backends built on torch.distributed collectives: deadlines on gloo (see
    :class:`llmcomm.agree.TimedCollectives`), plain capturable calls on NCCL."""

    def __init__(self, group: Any, cfg: EPConfig) -> None:
        super().__init__(group, cfg)
        self._timed = TimedCollectives(group, f"EPDispatcher.{self.name}", cfg.device.type)

    def _run(self, op: str, collective: Any, *args: Any, **kwargs: Any) -> None:
        """``collective(*args, group=..., async_op=...)`` under the deadline."""
        self._timed.run(f"{op} ({self.name} EP backend)",
                        lambda a: collective(*args, group=self.group, async_op=a, **kwargs))


class TorchA2ABackend(_CollectiveBackend):
    """``all_to_all_single`` of deduplicated rows; spans nodes; syncs the host (not graph-safe)."""

    name = "torch"
    graph_safe = False

    def dispatch(self, x, topk_ids, topk_weights):
        cfg = self.cfg
        W, L = cfg.world_size, cfg.local_experts
        owner = topk_ids.long() // L                                       # [T, K]
        hit = torch.zeros(x.shape[0], W, dtype=torch.bool, device=x.device)
        if topk_ids.numel():
            hit.scatter_(1, owner, True)
        send_counts = hit.sum(dim=0)                                       # [W]
        recv_counts = torch.empty_like(send_counts)
        self._run("dispatch", dist.all_to_all_single, recv_counts, send_counts)
        both = torch.stack([send_counts, recv_counts]).cpu()               # the one host sync
        send_splits, recv_splits = both[0].tolist(), both[1].tolist()
        send_idx = [hit[:, d].nonzero().flatten() for d in range(W)]
        idx = torch.cat(send_idx)
        send_x = x.index_select(0, idx)
        send_meta = _pack_meta(topk_ids.index_select(0, idx), topk_weights.index_select(0, idx))
        n_recv = sum(recv_splits)
        recv_x = torch.empty(n_recv, cfg.row_width, dtype=x.dtype, device=x.device)
        recv_meta = torch.empty(n_recv, 2 * cfg.top_k, dtype=torch.int32, device=x.device)
        self._run("dispatch", dist.all_to_all_single, recv_x, send_x, recv_splits, send_splits)
        self._run("dispatch", dist.all_to_all_single, recv_meta, send_meta, recv_splits,
                  send_splits)
        recv_ids, recv_w = _unpack_meta(recv_meta, cfg.top_k)
        ex = _new_expert_x(cfg)
        counts, slot = expand_to_experts(recv_x, recv_ids, cfg, ex)
        return ex[:-1].view(cfg.wire_shape), counts, _A2AState(send_idx, send_splits,
                                                                   recv_splits, slot, recv_w)

    def combine(self, expert_out, state: _A2AState, num_tokens):
        cfg = self.cfg
        partial = weighted_partial(expert_out, state.slot, state.recv_w).to(cfg.dtype)
        back = torch.empty(sum(state.send_splits), cfg.hidden_size, dtype=cfg.dtype,
                           device=expert_out.device)
        self._run("combine", dist.all_to_all_single, back, partial, state.send_splits,
                  state.recv_splits)
        y = torch.zeros(num_tokens, cfg.hidden_size, dtype=torch.float32, device=back.device)
        start = 0
        for d in range(cfg.world_size):                 # fixed rank order, no duplicate index
            n = state.send_splits[d]
            if n:
                y.index_add_(0, state.send_idx[d], back[start:start + n].float())
            start += n
        return y.to(cfg.dtype)


@dataclass
class _AGState:
    slot: torch.Tensor               # [W * M, K]
    weights: torch.Tensor            # [W * M, K] float32


class AllGatherBackend(_CollectiveBackend):
    """``all_gather`` (padded to ``M`` rows) + local selection + ``reduce_scatter``; graph-safe."""

    name = "allgather"
    graph_safe = True

    def __init__(self, group, cfg):
        super().__init__(group, cfg)
        # gloo implements neither all_gather_into_tensor nor reduce_scatter_tensor everywhere;
        # the list forms are used there.
        self._tensor_forms = dist.get_backend(group) == "nccl"

    def _all_gather(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        if self._tensor_forms:
            self._run("dispatch", dist.all_gather_into_tensor, out, inp)
        else:
            self._run("dispatch", dist.all_gather, list(out.chunk(self.cfg.world_size)), inp)

    def dispatch(self, x, topk_ids, topk_weights):
        cfg = self.cfg
        W, M, K, H = cfg.world_size, cfg.max_tokens_per_rank, cfg.top_k, cfg.row_width
        T = x.shape[0]
        xp = torch.empty(M, H, dtype=x.dtype, device=x.device)
        xp[:T] = x
        meta = torch.empty(M, 2 * K, dtype=torch.int32, device=x.device)
        meta[:, :K] = -1
        meta[:, K:] = 0
        meta[:T] = _pack_meta(topk_ids, topk_weights)
        all_x = torch.empty(W * M, H, dtype=x.dtype, device=x.device)
        all_meta = torch.empty(W * M, 2 * K, dtype=torch.int32, device=x.device)
        self._all_gather(all_x, xp)
        self._all_gather(all_meta, meta)
        ids, w = _unpack_meta(all_meta, K)
        ex = _new_expert_x(cfg)
        counts, slot = expand_to_experts(all_x, ids, cfg, ex)
        return ex[:-1].view(cfg.wire_shape), counts, _AGState(slot, w)

    def combine(self, expert_out, state: _AGState, num_tokens):
        cfg = self.cfg
        M = cfg.max_tokens_per_rank
        partial = weighted_partial(expert_out, state.slot, state.weights).to(cfg.dtype)
        out = torch.empty(M, cfg.hidden_size, dtype=cfg.dtype, device=expert_out.device)
        if self._tensor_forms:
            self._run("combine", dist.reduce_scatter_tensor, out, partial)
        else:   # gloo: all_reduce then take this rank's block (same sum, more traffic)
            self._run("combine", dist.all_reduce, partial)
            out.copy_(partial[cfg.rank * M:(cfg.rank + 1) * M])
        return out[:num_tokens].clone()
