"""Qwen3's block: Llama's, with an RMSNorm over each head's q and k before RoPE (transformers' Qwen3Attention).

Against Gemma 3's q/k norms these store their weights as they are (x * w, not x * (1 + w)); the q/k/v
projections carry no biases (Qwen2's did), and head_dim is the config's own, which may differ from
hidden_size / heads (Qwen3-0.6B: 1024 / 16 heads, head_dim 128). Tied or untied head: the weights say.
"""

from __future__ import annotations

import torch
from torch import nn

from .llama import attention_out, decode_strategies, embed, feed_forward, final, post_attention
from .pieces import Layer, apply_rope, heads_of, projections, rms_norm, shapes

__all__ = ["MODEL_TYPES", "NORM_OFFSET", "QK_NORM", "SANDWICH", "attention_out", "decode_strategies", "embed",
           "feed_forward", "final", "layer_of", "post_attention", "pre_attention"]

MODEL_TYPES = ("qwen3",)
NORM_OFFSET = SANDWICH = False
QK_NORM = True


def layer_of(block: nn.Module, tensors: bool = False) -> Layer:
    """Llama's roles plus the q/k norms (pieces.projections says what `tensors` changes)."""
    a = block.self_attn
    return Layer(input_norm=block.input_layernorm.weight, mlp_norm=block.post_attention_layernorm.weight,
                 q_norm=a.q_norm.weight, k_norm=a.k_norm.weight, **projections(block, tensors), **shapes(block))


def pre_attention(x: torch.Tensor, layer: Layer, cos: torch.Tensor, sin: torch.Tensor):
    """As llama.pre_attention, with each head's q and k normed (plain RMSNorm) before RoPE."""
    q, k, v = heads_of(rms_norm(x, layer.input_norm, layer.eps), layer)
    q, k = rms_norm(q, layer.q_norm, layer.eps), rms_norm(k, layer.k_norm, layer.eps)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v
