"""One decode step of the Transformer as a single exportable function (for compiled_decode.py).

The eager forward runs a token through ~30 layers of small ops, each dispatched from Python: on a
laptop CPU that dispatch, not the matmuls, is most of a decode step (docs/performance.md, "CPU
decode"). This module is the same computation written so torch.export can trace it once with the
cache length as a symbolic size, and AOTInductor can compile it to one C++ function:

- the whole cache is two stacked tensors, (layers, kv_heads, slots, head_dim) for K and for V
  (ModelCache.stacked_k / stacked_v), of which the first `past` slots hold earlier positions;
- the step returns the new token's K and V instead of writing them; the caller stores them at slot
  `past` (two copies), so the graph mutates none of its inputs;
- attention of the one query is over the past keys plus its own key, merged in one softmax, so the
  new key never has to be written before it is read.

Everything else is the family's block (arch/): its norms, projections, RoPE, MLP and embedding scale.
Which families it may run is theirs to say (decode_strategies).

It shares every parameter and buffer with the Transformer it wraps: nothing is copied.
"""

from __future__ import annotations

import torch
from torch import nn

from .arch import family
from .arch.pieces import embed, final
from .model import Transformer


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor,
               past_v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of one token's queries (heads, D) over past keys/values (kv_heads, L, D) and its own
    key/value (kv_heads, D), grouped-query style (heads = kv_heads * group), scores scaled by `scale`.
    Returns (heads, D)."""
    n_heads, head_dim = q.shape
    n_kv = k.shape[0]
    q = q.view(n_kv, n_heads // n_kv, head_dim) * scale
    scores = torch.matmul(q, past_k.transpose(-1, -2))  # (kv, group, L)
    own = (q * k.unsqueeze(1)).sum(-1, keepdim=True)  # (kv, group, 1)
    top = torch.maximum(scores.amax(-1, keepdim=True), own)
    p, p_own = (scores - top).exp(), (own - top).exp()
    out = torch.matmul(p, past_v) + p_own * v.unsqueeze(1)
    return (out / (p.sum(-1, keepdim=True) + p_own)).view(n_heads, head_dim)


class DecodeStep(nn.Module):
    """forward(token (1,) int64, k (layers, kv, slots, D), v (same), cos (positions, D), sin, past (L,))
    -> (logits (vocab,) float32, new k (layers, kv, D), new v (layers, kv, D)) for the token at position L.

    `past` is only read for its length: an input's size is how torch.export lets L vary. The block is
    the model's family's (arch/): this step only says how attention reads the cache.
    """

    def __init__(self, model: Transformer):
        super().__init__()
        cfg = model.config
        if "compiled_cpu" not in family(cfg).decode_strategies(cfg):
            raise ValueError(f"the compiled decode step does not run this model ({cfg.model_type}"
                             f"{', sliding window' if cfg.sliding_window is not None else ''})")
        self.model = model

    def forward(self, token, cache_k, cache_v, cos_table, sin_table, past):
        m, cfg = self.model, self.model.config
        n_heads, n_kv, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        length = past.shape[0]
        cos, sin = cos_table.narrow(0, length, 1), sin_table.narrow(0, length, 1)  # (1, D)
        x = embed(token.view(1, 1), m.model.embed_tokens, cfg.embedding_multiplier)  # (1, 1, hidden)
        new_k, new_v = [], []
        for i, block in enumerate(m.model.layers):
            layer = block.arch.layer_of(block)
            q, k, v = block.arch.pre_attention(x, layer, cos, sin)  # (1, heads, 1, D)
            q, k, v = q.reshape(n_heads, head_dim), k.reshape(n_kv, head_dim), v.reshape(n_kv, head_dim)
            past_k, past_v = cache_k[i].narrow(1, 0, length), cache_v[i].narrow(1, 0, length)
            y = attend_one(q, k, v, past_k, past_v, cfg.attention_scale)
            x = block.arch.post_attention(x, y.view(1, 1, n_heads * head_dim), layer)
            new_k.append(k)
            new_v.append(v)
        logits = final(x, m.model.norm, m.lm_head, cfg.final_logit_softcapping).view(-1).float()
        return logits, torch.stack(new_k), torch.stack(new_v)
