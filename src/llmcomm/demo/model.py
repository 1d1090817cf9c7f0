"""A pre-norm decoder with random weights, as a single-process reference and sharded for TP x EP.

Layer ``l`` (``h`` is the residual stream, ``n`` its normalised value)::

    a = attention(n)                       # q/k/v column-parallel, o row-parallel -> partial sums
    n, h = allreduce_add_rms_norm(a, h, post_attn_norm[l])
    m = mlp(n)  or  moe(n) + shared(n)     # gate/up column-, down row-parallel -> partial sums
    n, h = allreduce_add_rms_norm(m, h, next_norm[l])   # next layer's input norm (or final)

The MoE layer: every TP rank holds the same tokens, so each rank dispatches its own contiguous
shard of them over the EP group; the combined rows land in that rank's shard of the partial sum,
and the fused allreduce of the TP group adds them to the shared expert's partial sums. With an
fp8 dispatcher (``EPDispatcher(fp8=True)``) the routed experts run on the dequantised fp8 rows,
and the reference (``fp8=True``) on ``n`` quantised and dequantised the same way.
Attention has no rotary embedding (it does not touch communication).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import reference
from ..moe.reference import dequantize_fp8_blocks, quantize_fp8_blocks
from .presets import Preset

EPS = 1e-6


def make_weights(p: Preset, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """Full (unsharded) weights, identical on every rank (same seed, same device type)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, fan_in):
        return (torch.randn(*shape, generator=g, device=device) / math.sqrt(fan_in)).to(dtype)

    def norm_w():
        return (1.0 + 0.1 * torch.randn(p.hidden, generator=g, device=device)).to(dtype)

    H = p.hidden
    w: dict = {"embed": rnd(p.vocab, H, fan_in=1), "in_norm": norm_w(), "layers": []}
    for li in range(p.layers):
        L = {"wq": rnd(H, p.heads * p.head_dim, fan_in=H),
             "wk": rnd(H, p.kv_heads * p.head_dim, fan_in=H),
             "wv": rnd(H, p.kv_heads * p.head_dim, fan_in=H),
             "wo": rnd(p.heads * p.head_dim, H, fan_in=p.heads * p.head_dim),
             "post_attn_norm": norm_w(), "next_norm": norm_w()}
        if li in p.moe_layers:
            L.update(router=rnd(H, p.experts, fan_in=H),
                     e_gate=rnd(p.experts, H, p.moe_intermediate, fan_in=H),
                     e_up=rnd(p.experts, H, p.moe_intermediate, fan_in=H),
                     e_down=rnd(p.experts, p.moe_intermediate, H, fan_in=p.moe_intermediate),
                     s_gate=rnd(H, p.shared_intermediate, fan_in=H),
                     s_up=rnd(H, p.shared_intermediate, fan_in=H),
                     s_down=rnd(p.shared_intermediate, H, fan_in=p.shared_intermediate))
        else:
            L.update(gate=rnd(H, p.intermediate, fan_in=H), up=rnd(H, p.intermediate, fan_in=H),
                     down=rnd(p.intermediate, H, fan_in=p.intermediate))
        w["layers"].append(L)
    return w


def route(n: torch.Tensor, router: torch.Tensor, top_k: int):
    """Softmax router in fp32: (topk_ids int64 [T, k], topk_weights float32 [T, k], renormalised)."""
    probs = torch.softmax(n.float() @ router.float(), dim=-1)
    wts, ids = probs.topk(top_k, dim=-1)
    return ids, wts / wts.sum(-1, keepdim=True)


def swiglu(x, gate, up, down):
    return (F.silu(x @ gate) * (x @ up)) @ down


class KVCache:
    def __init__(self, batch, kv_heads, max_len, head_dim, device, dtype):
        self.k = torch.zeros(batch, kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)


def attention(n, L, cache: KVCache, batch: int, pos: torch.Tensor | None, heads: int,
              kv_heads: int, head_dim: int):
    """Causal GQA attention. Prefill (``pos`` None): ``n`` is [batch*P, H]; decode: [batch, H]
    at the device position ``pos`` (a 1-element int64 tensor, so decode is graph-capturable)."""
    T = n.shape[0]
    P = T // batch
    q = (n @ L["wq"]).view(batch, P, heads, head_dim).transpose(1, 2)
    k = (n @ L["wk"]).view(batch, P, kv_heads, head_dim).transpose(1, 2)
    v = (n @ L["wv"]).view(batch, P, kv_heads, head_dim).transpose(1, 2)
    rep = heads // kv_heads
    if pos is None:
        cache.k[:, :, :P] = k
        cache.v[:, :, :P] = v
        kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        o = F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
    else:
        cache.k.index_copy_(2, pos, k)
        cache.v.index_copy_(2, pos, v)
        max_len = cache.k.shape[2]
        mask = (torch.arange(max_len, device=n.device) <= pos).view(1, 1, 1, max_len)
        kk, vv = cache.k.repeat_interleave(rep, 1), cache.v.repeat_interleave(rep, 1)
        o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
    return o.transpose(1, 2).reshape(T, heads * head_dim) @ L["wo"]


class ReferenceModel:
    """The whole model in one process, computed in float32 from the same weights."""

    def __init__(self, p: Preset, w: dict, batch: int, max_len: int, device, fp8: bool = False):
        self.p, self.batch, self.fp8 = p, batch, fp8
        f = lambda t: t.float()  # noqa: E731
        self.w = {"embed": f(w["embed"]), "in_norm": f(w["in_norm"]),
                  "layers": [{k: f(v) for k, v in L.items()} for L in w["layers"]]}
        self.caches = [KVCache(batch, p.kv_heads, max_len, p.head_dim, device, torch.float32)
                       for _ in range(p.layers)]

    def forward(self, ids, pos=None, forced_routing=None):
        """Final normed hidden states [T, H] (float32). ``forced_routing[l]`` = (ids, weights)
        replaces the reference's own routing (bf16 vs fp32 can flip near-tied experts)."""
        p = self.p
        h = self.w["embed"][ids]
        n = reference.rms_norm(h, self.w["in_norm"], EPS)
        for li, L in enumerate(self.w["layers"]):
            a = attention(n, L, self.caches[li], self.batch, pos, p.heads, p.kv_heads, p.head_dim)
            h = h + a
            n = reference.rms_norm(h, L["post_attn_norm"], EPS)
            if li in p.moe_layers:
                ids_k, wts = route(n, L["router"], p.top_k)
                if forced_routing is not None and li in forced_routing:
                    ids_k, wts = forced_routing[li]
                m = swiglu(n, L["s_gate"], L["s_up"], L["s_down"])
                # the routed experts' input: what an fp8 dispatch delivers
                nx = dequantize_fp8_blocks(*quantize_fp8_blocks(n)).float() if self.fp8 else n
                for e in range(p.experts):
                    rows, slot = (ids_k == e).nonzero(as_tuple=True)
                    if rows.numel():
                        y = swiglu(nx[rows], L["e_gate"][e], L["e_up"][e], L["e_down"][e])
                        m = m.index_add(0, rows, y * wts[rows, slot].unsqueeze(1).float())
            else:
                m = swiglu(n, L["gate"], L["up"], L["down"])
            h = h + m
            n = reference.rms_norm(h, L["next_norm"], EPS)
        return n


@dataclass
class Shard:
    tp_rank: int
    tp: int
    ep_rank: int
    ep: int


def shard_weights(p: Preset, w: dict, s: Shard) -> dict:
    """This rank's slices: heads / intermediate over TP, expert blocks over EP."""
    def cols(t, n):  # column-parallel: split the output dim
        step = t.shape[-1] // n
        return t[..., s.tp_rank * step:(s.tp_rank + 1) * step].contiguous()

    def rows(t, n):  # row-parallel: split the input dim
        step = t.shape[0] // n
        return t[s.tp_rank * step:(s.tp_rank + 1) * step].contiguous()

    out = {"embed": w["embed"], "in_norm": w["in_norm"], "layers": []}
    e_per = p.experts // s.ep if p.experts else 0
    for li, L in enumerate(w["layers"]):
        M = {"wq": cols(L["wq"], s.tp), "wk": cols(L["wk"], s.tp), "wv": cols(L["wv"], s.tp),
             "wo": rows(L["wo"], s.tp), "post_attn_norm": L["post_attn_norm"],
             "next_norm": L["next_norm"]}
        if li in p.moe_layers:
            blk = slice(s.ep_rank * e_per, (s.ep_rank + 1) * e_per)
            M.update(router=L["router"], e_gate=L["e_gate"][blk].contiguous(),
                     e_up=L["e_up"][blk].contiguous(), e_down=L["e_down"][blk].contiguous(),
                     s_gate=cols(L["s_gate"], s.tp), s_up=cols(L["s_up"], s.tp),
                     s_down=rows(L["s_down"], s.tp))
        else:
            M.update(gate=cols(L["gate"], s.tp), up=cols(L["up"], s.tp),
                     down=rows(L["down"], s.tp))
        out["layers"].append(M)
    return out


class ShardedModel:
    """This rank's part of the model; communication through llmcomm only."""

    def __init__(self, p: Preset, w: dict, shard: Shard, comm, ep_disp, batch: int,
                 max_len: int, device, dtype):
        if p.heads % shard.tp or p.kv_heads % shard.tp or p.intermediate % shard.tp:
            raise ValueError(f"preset {p.name}: heads {p.heads}, kv_heads {p.kv_heads} and "
                             f"intermediate {p.intermediate} must be divisible by tp={shard.tp}")
        self.p, self.s, self.comm, self.ep, self.batch = p, shard, comm, ep_disp, batch
        self.w = shard_weights(p, w, shard)
        self.heads, self.kv_heads = p.heads // shard.tp, p.kv_heads // shard.tp
        self.caches = [KVCache(batch, self.kv_heads, max_len, p.head_dim, device, dtype)
                       for _ in range(p.layers)]
        self.last_routing: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _token_shard(self, T: int) -> slice:
        per = -(-T // self.s.tp)
        lo = min(T, self.s.tp_rank * per)
        return slice(lo, min(T, lo + per))

    def moe(self, n, L, li):
        p = self.p
        ids, wts = route(n, L["router"], p.top_k)
        self.last_routing[li] = (ids, wts)
        m = swiglu(n, L["s_gate"], L["s_up"], L["s_down"])  # shared expert, TP partial sum
        sl = self._token_shard(n.shape[0])
        d = self.ep.dispatch(n[sl].contiguous(), ids[sl].contiguous(),
                             wts[sl].to(torch.float32).contiguous())
        x = d.expert_x  # [local_experts, capacity, H]; rows past counts[e] are ignored
        if d.expert_x_scale is not None:   # fp8: dequantised (a scale per 128 channels)
            x = (x.float().unflatten(-1, (-1, 128)) * d.expert_x_scale.unsqueeze(-1)) \
                .flatten(-2).to(n.dtype)
        y = torch.bmm(F.silu(torch.bmm(x, L["e_gate"])) * torch.bmm(x, L["e_up"]), L["e_down"])
        routed = self.ep.combine(y, d)  # [shard, H], weighted and summed over top-k
        m[sl] += routed.to(m.dtype)
        return m

    def forward(self, ids, pos=None):
        p = self.p
        h = self.w["embed"][ids]
        n = reference.rms_norm(h.float(), self.w["in_norm"], EPS).to(h.dtype)
        for li, L in enumerate(self.w["layers"]):
            a = attention(n, L, self.caches[li], self.batch, pos, self.heads, self.kv_heads,
                          p.head_dim)
            n, h = self.comm.all_reduce_add_rms_norm(a, h, L["post_attn_norm"], EPS)
            m = self.moe(n, L, li) if li in p.moe_layers else \
                swiglu(n, L["gate"], L["up"], L["down"])
            n, h = self.comm.all_reduce_add_rms_norm(m, h, L["next_norm"], EPS)
        return n
