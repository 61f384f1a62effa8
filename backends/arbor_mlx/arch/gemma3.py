"""Gemma 3's block in MLX (transformers' Gemma3DecoderLayer).

Against Llama's: an RMSNorm over each head's q and k before RoPE; "sandwich" norms, after attention
(`post_attention_layernorm`, which in Llama is the norm before the MLP) and before and after the MLP;
every RMSNorm weight stored as an offset from 1; embeddings scaled by sqrt(hidden_size). Its GeGLU MLP,
query scale (query_pre_attn_scalar), interleaved sliding/global layers and the sliding layers' own RoPE
base are config fields the shared machinery reads (hidden_act, attention_scale, layer_types,
rope_local_base_freq).
"""

from __future__ import annotations

import mlx.core as mx
from mlx import nn

from arbor_core.config import ArborConfig

from .. import layers
from ..layers import MLP, RMSNorm, Rope

MODEL_TYPES = ("gemma3_text",)


def norm(cfg: ArborConfig, dim: int | None = None) -> RMSNorm:
    """Gemma's RMSNorm over `dim` (default hidden_size): x * (1 + w)."""
    return RMSNorm(dim or cfg.hidden_size, cfg.rms_norm_eps, offset=True)


class Attention(layers.Attention):
    def __init__(self, cfg: ArborConfig, layer: int = 0):
        super().__init__(cfg, layer)
        self.q_norm = norm(cfg, cfg.head_dim)
        self.k_norm = norm(cfg, cfg.head_dim)


class Layer(nn.Module):
    def __init__(self, cfg: ArborConfig, layer: int = 0):
        super().__init__()
        self.input_layernorm = norm(cfg)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = norm(cfg)
        self.pre_feedforward_layernorm = norm(cfg)
        self.post_feedforward_layernorm = norm(cfg)
        self.mlp = MLP(cfg)


def embed(embed_tokens: nn.Embedding, tokens: mx.array, cfg: ArborConfig) -> mx.array:
    x = embed_tokens(tokens)
    return x * mx.array(cfg.hidden_size ** 0.5, dtype=x.dtype)  # sqrt(hidden), rounded to the dtype as HF does


def pre_attention(x: mx.array, layer: Layer, rope: Rope, start: int) -> tuple[mx.array, mx.array, mx.array]:
    attn = layer.self_attn
    q, k, v = attn.project(layer.input_layernorm(x))
    q, k = attn.q_norm(q), attn.k_norm(k)
    return rope(q, start), rope(k, start), v


def post_attention(x: mx.array, y: mx.array, layer: Layer) -> mx.array:
    x = x + layer.post_attention_layernorm(layer.self_attn.o_proj(y))
    return x + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))
