"""Gemma 3's block: q/k norms, norms before and after attention and the MLP (sandwich), GeGLU, embeddings
scaled by sqrt(hidden), and every RMSNorm weight stored as an offset from 1.

Its sliding layers read their own RoPE tables (a base of their own, never scaled: model.set_rope) and
keep a ring of slots (cache.py); both are the strategies' business, fed by the config's layer types.
"""

from __future__ import annotations

import torch
from torch import nn

from arbor_core.config import ArborConfig

from .pieces import Layer, apply_rope, embed, final, heads_of, linear, mlp, projections, rms_norm, shapes

__all__ = ["MODEL_TYPES", "NORM_OFFSET", "QK_NORM", "SANDWICH", "attention_out", "decode_strategies", "embed",
           "feed_forward", "final", "layer_of", "post_attention", "pre_attention"]

MODEL_TYPES = ("gemma3_text",)
NORM_OFFSET = QK_NORM = SANDWICH = True


def decode_strategies(config: ArborConfig) -> frozenset[str]:
    """Not the compiled CPU step: it reads one whole-context cache per layer, and the sliding layers keep
    rings (it would also need their local RoPE tables as inputs)."""
    return frozenset({"eager", "cuda_graph"})


def layer_of(block: nn.Module, tensors: bool = False) -> Layer:
    """The block's weights by role; HF's post_attention_layernorm is the attention output's norm here."""
    a = block.self_attn
    return Layer(input_norm=block.input_layernorm.weight, mlp_norm=block.pre_feedforward_layernorm.weight,
                 q_norm=a.q_norm.weight, k_norm=a.k_norm.weight,
                 attention_out_norm=block.post_attention_layernorm.weight,
                 mlp_out_norm=block.post_feedforward_layernorm.weight, **projections(block, tensors), **shapes(block))


def pre_attention(x: torch.Tensor, layer: Layer, cos: torch.Tensor, sin: torch.Tensor):
    """As llama.pre_attention, with each head's q and k normed before RoPE."""
    q, k, v = heads_of(rms_norm(x, layer.input_norm, layer.eps, True), layer)
    q, k = rms_norm(q, layer.q_norm, layer.eps, True), rms_norm(k, layer.k_norm, layer.eps, True)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def attention_out(x: torch.Tensor, y: torch.Tensor, layer: Layer) -> torch.Tensor:
    """The attention output projected and normed before its residual."""
    return x + rms_norm(linear(y, layer.o), layer.attention_out_norm, layer.eps, True)


def feed_forward(x: torch.Tensor, layer: Layer) -> torch.Tensor:
    """The MLP between a norm of its input and one of its output."""
    return x + rms_norm(mlp(rms_norm(x, layer.mlp_norm, layer.eps, True), layer), layer.mlp_out_norm, layer.eps, True)


def post_attention(x: torch.Tensor, y: torch.Tensor, layer: Layer) -> torch.Tensor:
    """Everything after attention (the decode strategies' second half): attention_out, then feed_forward."""
    return feed_forward(attention_out(x, y, layer), layer)
