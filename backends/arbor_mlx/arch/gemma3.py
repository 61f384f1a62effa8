"""Gemma 3's block in MLX (transformers' Gemma3DecoderLayer): Gemma 2's sandwich (gemma2.py: its norms,
scaled embeddings, GeGLU) with an RMSNorm over each head's q and k before RoPE.

Its query scale (query_pre_attn_scalar), interleaved sliding/global layers and the sliding layers' own RoPE
base are config fields the shared machinery reads (attention_scale, layer_types, rope_local_base_freq).
"""

from __future__ import annotations

import mlx.core as mx

from arbor_core.config import ArborConfig

from .. import layers
from ..layers import Rope
from . import gemma2
from .gemma2 import embed, norm, post_attention

__all__ = ["MODEL_TYPES", "Layer", "embed", "norm", "post_attention", "pre_attention"]

MODEL_TYPES = ("gemma3_text",)


class Attention(layers.Attention):
    def __init__(self, cfg: ArborConfig, layer: int = 0):
        super().__init__(cfg, layer)
        self.q_norm = norm(cfg, cfg.head_dim)
        self.k_norm = norm(cfg, cfg.head_dim)


class Layer(gemma2.Layer):
    def __init__(self, cfg: ArborConfig, layer: int = 0):
        super().__init__(cfg, layer, Attention)


def pre_attention(x: mx.array, layer: Layer, rope: Rope, start: int) -> tuple[mx.array, mx.array, mx.array]:
    attn = layer.self_attn
    q, k, v = attn.project(layer.input_layernorm(x))
    q, k = attn.q_norm(q), attn.k_norm(k)
    return rope(q, start), rope(k, start), v
