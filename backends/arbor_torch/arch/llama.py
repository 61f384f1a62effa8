"""The Llama family's block: RMSNorm, GQA attention with RoPE, SwiGLU (Llama, SmolLM2, Mistral, and
Qwen2, whose q/k/v projections carry biases; any of them may tie the output head to the embedding).

Biases and tied embeddings are in the weights (the modules of model.py), a sliding window in the
strategy's attention; the block itself is the same for all of them.
"""

from __future__ import annotations

import torch
from torch import nn

from arbor_core.config import ArborConfig

from .pieces import Layer, apply_rope, embed, final, heads_of, linear, mlp, projections, rms_norm, shapes

__all__ = ["MODEL_TYPES", "NORM_OFFSET", "QK_NORM", "SANDWICH", "attention_out", "decode_strategies", "embed",
           "feed_forward", "final", "layer_of", "post_attention", "pre_attention"]

MODEL_TYPES = ("llama", "mistral", "qwen2", "phi3")  # Phi-3: fused weights, split at load
# which modules model.py builds: norm weights stored as is (no offset), no q/k norms, one norm per half-block
NORM_OFFSET = QK_NORM = SANDWICH = False


def decode_strategies(config: ArborConfig) -> frozenset[str]:
    """Every strategy runs the block; the compiled CPU step's merged softmax attends to every past key,
    so it takes a model only without a sliding window (Mistral's has one)."""
    if config.sliding_window is None:
        return frozenset({"eager", "cuda_graph", "compiled_cpu"})
    return frozenset({"eager", "cuda_graph"})


def layer_of(block: nn.Module, tensors: bool = False) -> Layer:
    """The block's weights by role (pieces.projections says what `tensors` changes)."""
    return Layer(input_norm=block.input_layernorm.weight, mlp_norm=block.post_attention_layernorm.weight,
                 **projections(block, tensors), **shapes(block))


def pre_attention(x: torch.Tensor, layer: Layer, cos: torch.Tensor, sin: torch.Tensor):
    """x (..., T, hidden) -> q (..., heads, T, D), k and v (..., kv_heads, T, D): norm, projections, RoPE."""
    q, k, v = heads_of(rms_norm(x, layer.input_norm, layer.eps), layer)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def attention_out(x: torch.Tensor, y: torch.Tensor, layer: Layer) -> torch.Tensor:
    """The attention output y (..., T, heads * D) projected onto the residual."""
    return x + linear(y, layer.o)


def feed_forward(x: torch.Tensor, layer: Layer) -> torch.Tensor:
    """The MLP's half-block: its input normed, its output added to the residual."""
    return x + mlp(rms_norm(x, layer.mlp_norm, layer.eps), layer)


def post_attention(x: torch.Tensor, y: torch.Tensor, layer: Layer) -> torch.Tensor:
    """Everything after attention (the decode strategies' second half): attention_out, then feed_forward."""
    return feed_forward(attention_out(x, y, layer), layer)
