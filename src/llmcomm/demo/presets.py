"""Model shapes for the demo. Few layers; the shapes of the named models where it matters for
communication (hidden size, experts, top-k)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    name: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: int
    moe_layers: tuple[int, ...] = ()   # indices of layers whose MLP is an MoE
    experts: int = 0
    top_k: int = 0
    moe_intermediate: int = 0
    shared_intermediate: int = 0
    vocab: int = 256


PRESETS = {
    "tiny": Preset("tiny", hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128,
                   layers=2, moe_layers=(1,), experts=8, top_k=2, moe_intermediate=32,
                   shared_intermediate=32),
    # "tiny" at hidden 128: the fp8 dispatch's smallest (a scale per 128 channels; --moe-fp8)
    "tiny128": Preset("tiny128", hidden=128, heads=4, kv_heads=2, head_dim=32, intermediate=256,
                      layers=2, moe_layers=(1,), experts=8, top_k=2, moe_intermediate=64,
                      shared_intermediate=64),
    # Llama-3-8B: hidden 4096, 32 heads / 8 KV heads of 128, MLP 14336 (dense, no MoE)
    "llama-8b": Preset("llama-8b", hidden=4096, heads=32, kv_heads=8, head_dim=128,
                       intermediate=14336, layers=2, vocab=1024),
    # DeepSeek-V3: hidden 7168, 256 routed experts top-8 (moe 2048) + 1 shared expert (2048);
    # attention simplified to GQA (MLA is not a communication concern); layer 0 dense, 1 MoE.
    "deepseek-v3": Preset("deepseek-v3", hidden=7168, heads=56, kv_heads=8, head_dim=128,
                          intermediate=18432, layers=2, moe_layers=(1,), experts=256, top_k=8,
                          moe_intermediate=2048, shared_intermediate=2048, vocab=1024),
}
