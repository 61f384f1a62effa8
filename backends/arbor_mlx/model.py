"""The Llama-family transformer in MLX: RMSNorm, GQA attention with RoPE, SwiGLU (and Gemma 3's block).

The same model as arbor_torch/model.py, written with MLX's fused kernels (`mx.fast.rms_norm`,
`mx.fast.rope`, `mx.fast.scaled_dot_product_attention`). Module and parameter names follow
Hugging Face's LlamaForCausalLM, so the dict `mx.load` reads from an Arbor checkpoint's
safetensors maps straight onto `Transformer.parameters()`. Architecture switches are config
fields: attention biases (Qwen2), tied embeddings, sliding-window attention (Mistral), and Gemma 3's
q/k norms, sandwich norms, GeGLU, scaled embeddings and interleaved local/global layers.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx import nn

from arbor_core import kv_layout
from arbor_core.config import ArborConfig
from arbor_core.rope import local_rope

from .cache import KVCache


class RMSNorm(nn.Module):
    """x / rms(x) * weight; Gemma stores the weight as an offset from 1 (`offset`)."""

    def __init__(self, dim: int, eps: float, offset: bool = False):
        super().__init__()
        self.weight = mx.zeros((dim,)) if offset else mx.ones((dim,))
        self.eps, self.offset = eps, offset

    def __call__(self, x: mx.array) -> mx.array:
        if self.offset:  # x * (1 + w), the factor formed in float32 as transformers does
            return mx.fast.rms_norm(x, (1.0 + self.weight.astype(mx.float32)).astype(x.dtype), self.eps)
        return mx.fast.rms_norm(x, self.weight, self.eps)  # accumulates in float32 whatever x's dtype


class Rope:
    """RoPE with arbor's frequencies (rope.py): HF's half-split layout, scaled by attention_factor.

    arbor hands every backend inverse frequencies; `mx.fast.rope` takes the reciprocal (a
    wavelength-like `freqs`, angle = position / freqs), which expresses linear, dynamic, yarn and
    llama3 scaling alike. YaRN's attention factor multiplies cos and sin, i.e. the rotated vector.
    """

    def __init__(self, inv_freq: np.ndarray, attention_factor: float, positions: int):
        self.freqs = mx.array(np.float32(1.0) / inv_freq.astype(np.float32))
        self.dims = 2 * inv_freq.shape[0]
        self.attention_factor = attention_factor
        self.positions = positions  # the context it was set up for: positions beyond are refused

    def __call__(self, x: mx.array, start: int) -> mx.array:
        # x: (B, heads, T, head_dim) at positions [start, start + T)
        x = mx.fast.rope(x, self.dims, traditional=False, base=None, scale=1.0, offset=start, freqs=self.freqs)
        return x * self.attention_factor if self.attention_factor != 1.0 else x


class Attention(nn.Module):
    def __init__(self, cfg: ArborConfig, layer: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.window = cfg.layer_window(layer)
        self.scale = cfg.attention_scale  # head_dim ** -0.5, or Gemma's query_pre_attn_scalar ** -0.5
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.attention_out_bias)
        if cfg.gemma:  # RMSNorm over each head's q and k, before RoPE
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, offset=True)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, offset=True)
        self.qk_norm = cfg.gemma

    def __call__(self, x: mx.array, rope: Rope, cache: KVCache | None, start: int) -> mx.array:
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)  # (B, nh, T, hd)
        k = self.k_proj(x).reshape(B, T, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)  # (B, nkv, T, hd)
        v = self.v_proj(x).reshape(B, T, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(q, start), rope(k, start)
        key_pos = None  # None: the keys are positions [0, start + T) in order
        if cache is not None:
            k, v, key_pos = cache.update(start, k, v)  # key_pos: each key's position, once a ring cache wrapped
        key_start = 0
        if key_pos is None and self.window is not None and start + T > self.window:
            key_start = kv_layout.first_visible_key(start, self.window)  # older keys are outside every query's window
            k, v = k[:, :, key_start:], v[:, :, key_start:]
        mask = attention_mask(T, k.shape[2], key_start, start, self.window, key_pos)
        y = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)  # GQA: k/v not tiled
        return self.o_proj(y.transpose(0, 2, 1, 3).reshape(B, T, self.n_heads * self.head_dim))


def attention_mask(q_len: int, kv_len: int, key_start: int, start: int, window: int | None, key_pos=None):
    """Mask for queries at [start, start+q_len) over keys at [key_start, key_start+kv_len), or at
    the positions `key_pos` (a wrapped ring cache's slots, which only a window model has).

    None for one query whose keys are all visible; "causal" (MLX aligns it lower-right: the last
    query sees the last key) when the keys end with the queries and no window cuts in; otherwise
    an explicit boolean matrix, as arbor_torch's `_mask` builds it.
    """
    end = key_start + kv_len
    windowed = kv_layout.window_cuts_in(window, start + q_len - 1, key_start)  # some query loses a key
    if key_pos is None and not windowed and end == start + q_len:
        return None if q_len == 1 else "causal"
    k_pos = mx.arange(key_start, end) if key_pos is None else key_pos
    return kv_layout.visible(mx.arange(start, start + q_len), k_pos, window)


class MLP(nn.Module):
    def __init__(self, cfg: ArborConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gelu = cfg.hidden_act == "gelu_pytorch_tanh"

    def __call__(self, x: mx.array) -> mx.array:
        gate = self.gate_proj(x)
        gate = nn.gelu_approx(gate) if self.gelu else nn.silu(gate)  # GeGLU (tanh GELU) or SwiGLU
        return self.down_proj(gate * self.up_proj(x))


class Block(nn.Module):
    """Llama's pre-norm block; Gemma's adds a norm after attention (post_attention_layernorm, which in Llama
    is the norm before the MLP) and norms before and after the MLP."""

    def __init__(self, cfg: ArborConfig, layer: int = 0):
        super().__init__()
        self.gemma = cfg.gemma
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset=cfg.gemma)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset=cfg.gemma)
        if cfg.gemma:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset=True)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset=True)
        self.mlp = MLP(cfg)

    def __call__(self, x, rope, cache, start):
        if self.gemma:
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, cache, start))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ArborConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [Block(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset=cfg.gemma)


class Transformer(nn.Module):
    """Llama-family causal LM. `__call__` runs tokens at positions [start, start+T)."""

    def __init__(self, cfg: ArborConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        if not cfg.tie_word_embeddings:  # tied: the head is the embedding matrix, no parameter of its own
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope: Rope | None = None
        self.local_rope: Rope | None = None  # Gemma's sliding layers: their own base, unscaled

    def set_rope(self, inv_freq: np.ndarray, attention_factor: float, positions: int) -> None:
        self.rope = Rope(inv_freq, attention_factor, positions)
        if self.config.rope_local_base_freq:
            self.local_rope = Rope(local_rope(self.config).inv_freq, 1.0, positions)

    def rope_len(self) -> int:
        return 0 if self.rope is None else self.rope.positions

    def __call__(self, tokens: mx.array, start: int = 0, caches: list[KVCache] | None = None,
                 last_only: bool = False) -> mx.array:
        # tokens: (B, T) -> logits (B, T, vocab), or (B, 1, vocab) when last_only
        T = tokens.shape[1]
        if start + T > self.rope_len():
            raise ValueError(f"positions up to {start + T} exceed the RoPE table ({self.rope_len()})")
        x = self.model.embed_tokens(tokens)
        if self.config.embedding_multiplier is not None:  # Gemma: sqrt(hidden), rounded to the dtype as HF does
            x = x * mx.array(self.config.embedding_multiplier, dtype=x.dtype)
        for i, layer in enumerate(self.model.layers):
            rope = self.local_rope if self.local_rope is not None and layer.self_attn.window is not None else self.rope
            x = layer(x, rope, caches[i] if caches is not None else None, start)
        if last_only:
            x = x[:, -1:]
        x = self.model.norm(x)
        return self.model.embed_tokens.as_linear(x) if self.config.tie_word_embeddings else self.lm_head(x)
