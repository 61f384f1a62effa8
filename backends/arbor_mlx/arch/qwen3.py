"""Qwen3's block in MLX (transformers' Qwen3DecoderLayer): Llama's, with an RMSNorm over each head's q and k
before RoPE, stored as plain weights (x * w; Gemma 3's are offsets from 1), no q/k/v biases, and the config's
own head_dim (it may differ from hidden_size / heads)."""

from __future__ import annotations

import mlx.core as mx

from arbor_core.config import ArborConfig

from .. import layers
from ..layers import RMSNorm, Rope
from . import llama
from .llama import embed, norm, post_attention

__all__ = ["MODEL_TYPES", "Layer", "embed", "norm", "post_attention", "pre_attention"]

MODEL_TYPES = ("qwen3",)


class Attention(layers.Attention):
    def __init__(self, cfg: ArborConfig, layer: int = 0):
        super().__init__(cfg, layer)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)


class Layer(llama.Layer):
    def __init__(self, cfg: ArborConfig, layer: int = 0):
        super().__init__(cfg, layer)
        self.self_attn = Attention(cfg, layer)


def pre_attention(x: mx.array, layer: Layer, rope: Rope, start: int) -> tuple[mx.array, mx.array, mx.array]:
    attn = layer.self_attn
    q, k, v = attn.project(layer.input_layernorm(x))
    q, k = attn.q_norm(q), attn.k_norm(k)
    return rope(q, start), rope(k, start), v
