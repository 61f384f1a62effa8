"""Gemma 2's block in MLX (transformers' Gemma2DecoderLayer), the sandwich Gemma 3 builds on.

Against Llama's: "sandwich" norms, after attention (`post_attention_layernorm`, which in Llama is the norm
before the MLP) and before and after the MLP; every RMSNorm weight stored as an offset from 1; embeddings
scaled by sqrt(hidden_size). Its GeGLU MLP, query scale (query_pre_attn_scalar), alternating sliding/global
layers and soft-capped attention scores and logits are config fields the shared machinery reads
(hidden_act, attention_scale, layer_types, attn_logit_softcapping in layers.Attention,
final_logit_softcapping in model.py).
"""

from __future__ import annotations

import mlx.core as mx
from mlx import nn

from arbor_core.config import ArborConfig

from .. import layers
from ..layers import MLP, RMSNorm
from .llama import pre_attention

__all__ = ["MODEL_TYPES", "Layer", "embed", "norm", "post_attention", "pre_attention"]

MODEL_TYPES = ("gemma2",)


def norm(cfg: ArborConfig, dim: int | None = None) -> RMSNorm:
    """Gemma's RMSNorm over `dim` (default hidden_size): x * (1 + w)."""
    return RMSNorm(dim or cfg.hidden_size, cfg.rms_norm_eps, offset=True)


class Layer(nn.Module):
    def __init__(self, cfg: ArborConfig, layer: int = 0, attention: type = layers.Attention):
        super().__init__()
        self.input_layernorm = norm(cfg)
        self.self_attn = attention(cfg, layer)
        self.post_attention_layernorm = norm(cfg)
        self.pre_feedforward_layernorm = norm(cfg)
        self.post_feedforward_layernorm = norm(cfg)
        self.mlp = MLP(cfg)


def embed(embed_tokens: nn.Embedding, tokens: mx.array, cfg: ArborConfig) -> mx.array:
    x = embed_tokens(tokens)
    return x * mx.array(cfg.hidden_size ** 0.5, dtype=x.dtype)  # sqrt(hidden), rounded to the dtype as HF does


def post_attention(x: mx.array, y: mx.array, layer: Layer) -> mx.array:
    x = x + layer.post_attention_layernorm(layer.self_attn.o_proj(y))
    return x + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))
