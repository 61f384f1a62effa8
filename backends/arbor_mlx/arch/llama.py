"""Llama's block in MLX: pre-norm attention, then a pre-norm gated MLP (SwiGLU), each added to the residual.

The family of Llama, SmolLM2, Mistral (a sliding window on every layer), Qwen2 (biases on q, k and v) and Phi-3
(q/k/v and gate/up stored fused, split at load: checkpoint.FUSED_PROJECTIONS): what differs among them is a
config field the shared layers read (attention_bias, sliding_window, rope_scaling, partial_rotary_factor).
"""

from __future__ import annotations

import mlx.core as mx
from mlx import nn

from arbor_core.config import ArborConfig

from ..layers import MLP, Attention, RMSNorm, Rope

MODEL_TYPES = ("llama", "mistral", "qwen2", "phi3")  # Phi-3: fused weights split at load


class Layer(nn.Module):
    def __init__(self, cfg: ArborConfig, layer: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # Llama's norm before the MLP
        self.mlp = MLP(cfg)


def norm(cfg: ArborConfig) -> RMSNorm:
    return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def embed(embed_tokens: nn.Embedding, tokens: mx.array, cfg: ArborConfig) -> mx.array:
    return embed_tokens(tokens)


def pre_attention(x: mx.array, layer: Layer, rope: Rope, start: int) -> tuple[mx.array, mx.array, mx.array]:
    q, k, v = layer.self_attn.project(layer.input_layernorm(x))
    return rope(q, start), rope(k, start), v


def post_attention(x: mx.array, y: mx.array, layer: Layer) -> mx.array:
    x = x + layer.self_attn.o_proj(y)
    return x + layer.mlp(layer.post_attention_layernorm(x))
