"""The causal LM in MLX: embedding -> decoder layers -> final norm -> head, for any architecture in arch/.

The architecture (found by the config's model_type) gives the layer's parameters and its block
(`embed`, `pre_attention`, `post_attention`, the final `norm`); this module runs it: the attention over
each layer's KV cache, one RoPE per layer, the head (tied to the embedding or its own). Module and
parameter names follow Hugging Face's LlamaForCausalLM, so the dict `mx.load` reads from an Arbor
checkpoint's safetensors maps straight onto `Transformer.parameters()`.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx import nn

from arbor_core.config import ArborConfig
from arbor_core.rope import local_rope

from .arch import architecture
from .cache import KVCache
from .layers import Rope, Rows, attention_mask

__all__ = ["Transformer", "Rope", "attention_mask"]


class Backbone(nn.Module):
    def __init__(self, cfg: ArborConfig):
        super().__init__()
        arch = architecture(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [arch.Layer(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.norm = arch.norm(cfg)


class Transformer(nn.Module):
    """A causal LM of the family `cfg.model_type` names. `__call__` runs tokens at positions [start, start+T)."""

    def __init__(self, cfg: ArborConfig):
        super().__init__()
        self.config = cfg
        self.arch = architecture(cfg)
        self.model = Backbone(cfg)
        if not cfg.tie_word_embeddings:  # tied: the head is the embedding matrix, no parameter of its own
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope: Rope | None = None
        self.local_rope: Rope | None = None  # sliding layers' own base, unscaled (Gemma 3's rope_local_base_freq)

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
        arch = self.arch
        x = arch.embed(self.model.embed_tokens, tokens, self.config)
        for i, layer in enumerate(self.model.layers):
            rope = self.local_rope if self.local_rope is not None and layer.self_attn.window is not None else self.rope
            q, k, v = arch.pre_attention(x, layer, rope, start)
            y = layer.self_attn.attend(q, k, v, caches[i] if caches is not None else None, start)
            x = arch.post_attention(x, y, layer)
        if last_only:
            x = x[:, -1:]
        x = self.model.norm(x)
        logits = self.model.embed_tokens.as_linear(x) if self.config.tie_word_embeddings else self.lm_head(x)
        cap = self.config.final_logit_softcapping  # Gemma's soft-capped logits
        return logits if cap is None else mx.tanh(logits / cap) * cap

    def forward_rows(self, tokens: mx.array, rows: Rows) -> mx.array:
        """Several sequences in one forward: tokens (1, T) packed as `rows` says, each appended to its own
        cache -> each sequence's last logits (B, vocab)."""
        end = max(s + n for s, n in zip(rows.starts, rows.counts))
        if end > self.rope_len():
            raise ValueError(f"positions up to {end} exceed the RoPE table ({self.rope_len()})")
        arch = self.arch
        x = arch.embed(self.model.embed_tokens, tokens, self.config)
        for i, layer in enumerate(self.model.layers):
            rope = self.local_rope if self.local_rope is not None and layer.self_attn.window is not None else self.rope
            q, k, v = arch.pre_attention(x, layer, rows.rope(rope), 0)
            x = arch.post_attention(x, layer.self_attn.attend(q, k, v, rows.layer(i), 0), layer)
        x = self.model.norm(x[:, mx.array([b - 1 for _, b in rows.spans])])  # each sequence's last position
        logits = self.model.embed_tokens.as_linear(x) if self.config.tie_word_embeddings else self.lm_head(x)
        cap = self.config.final_logit_softcapping
        return (logits if cap is None else mx.tanh(logits / cap) * cap)[0]
