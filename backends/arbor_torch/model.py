"""The transformer's modules in PyTorch, and its eager forward (prefill, eager decode, training, growth).

Module and parameter names follow Hugging Face's LlamaForCausalLM (Gemma and Qwen3 add their norms), so
an Arbor checkpoint (config.json + safetensors with HF names) loads with `load_state_dict` and no
renaming. The block's math is its family's (arch/: llama.py, gemma2.py, gemma3.py, qwen3.py, smollm3.py,
found by model_type); what is here is the eager strategy's attention (SDPA, the masks, the CUDA prefix
kernels, and the explicit soft-capped attention SDPA cannot do), the RoPE tables, and the one q/k/v fusion
(fuse_layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from arbor_core import kv_layout
from arbor_core.config import ArborConfig
from arbor_core.rope import local_rope

from .arch import family
from .arch.pieces import embed, final, rms_norm, soft_cap
from .cache import KVCache
from .prefix_attention import attention_after_prefix, choose_kernel


class RMSNorm(nn.Module):
    """x / rms(x) * weight; Gemma stores the weight as an offset from 1 (`offset`) and scales in float32."""

    def __init__(self, dim: int, eps: float, offset: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.offset)


class Attention(nn.Module):
    """The attention modules of a block (HF names) and the eager strategy's `attend`: SDPA over the cache."""

    def __init__(self, cfg: ArborConfig, layer: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.window = cfg.layer_window(layer)
        self.scale = cfg.attention_scale  # head_dim ** -0.5, or Gemma's query_pre_attn_scalar ** -0.5
        self.softcap = cfg.attn_logit_softcapping  # Gemma 2: scores soft-capped before the softmax
        self.prefix_kernel: str | None = None  # chosen on the first CUDA prefill chunk (prefix_attention.py)
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.attention_out_bias)
        # the one fusion (fuse_layer): q/k/v rows stored contiguously, the three weights becoming views
        self.qkv_weight: torch.Tensor | None = None
        self.qkv_bias: torch.Tensor | None = None
        self.qkv_proj: nn.Module | None = None  # q, k, v in one quantized matmul (quantize.py, load_quantized.py)
        self.uses_rope = cfg.layer_rope(layer)  # False: a layer without position encoding (SmolLM3's NoPE)
        if family(cfg).QK_NORM:  # RMSNorm over each head's q and k, before RoPE
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, offset=family(cfg).NORM_OFFSET)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, offset=family(cfg).NORM_OFFSET)
        else:
            self.q_norm = self.k_norm = None

    def attend(self, q, k, v, cache: KVCache | LayerRows | None, start: int) -> torch.Tensor:
        """q (B, heads, T, D) and the new k, v (B, kv_heads, T, D) at positions [start, start + T), stored
        in `cache` and attended with the cached keys -> (B, T, heads * D). With `cache` a LayerRows (several
        sequences packed into T, B = 1), each sequence attends over its own cache, as it would alone."""
        if isinstance(cache, LayerRows):
            return self._attend_rows(q, k, v, cache)
        B, _, T, _ = q.shape
        key_pos = None  # None: the keys are positions [key_start, start + T) in order
        if cache is not None:
            k, v, key_pos = cache.update(start, k, v)  # key_pos: each key's position, once a ring cache wrapped
        key_start = start + T - k.shape[2]
        if self.softcap is not None:
            y = capped_attention(q, k, v, self._visible(T, k.shape[2], key_start, start, q.device, key_pos),
                                 self.scale, self.softcap)
        elif key_pos is None and self._after_prefix(T, k.shape[2], key_start, start, q):
            y = attention_after_prefix(q, k, v, self.prefix_kernel)  # a prefill chunk after cached keys, on CUDA
        else:
            mask = self._mask(T, k.shape[2], key_start, start, q.device, key_pos)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               is_causal=mask is None and T > 1 and start == 0,
                                               scale=self.scale, enable_gqa=self.n_heads != self.n_kv_heads)
        return y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)

    def _attend_rows(self, q, k, v, rows: LayerRows) -> torch.Tensor:
        """Packed sequences (B = 1): the pooled rows in one call, every other row over its own cache."""
        p = rows.pooled
        if p is None or self.window is not None or self.softcap is not None:
            return torch.cat([self.attend(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], layer, start)
                              for (a, b), layer, start in rows], dim=1)
        pooled = self._attend_pooled(q, k, v, p, rows.index)  # (pooled tokens, heads * D)
        if p.everything:
            return pooled[None]
        y = q.new_empty(1, q.shape[2], self.n_heads * self.head_dim)
        if p.dense:
            y[0, p.first:p.first + pooled.shape[0]] = pooled
        else:
            y[0, p.packed] = pooled
        for (a, b), layer, start in rows:
            y[:, a:b] = self.attend(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], layer, start)
        return y

    def _attend_pooled(self, q, k, v, p: PooledRows, index: int) -> torch.Tensor:
        """The pooled rows `p` at layer `index`: their new keys and values written into their pool rows, then
        every row's queries over its pool row, masked to its own positions -> (tokens, heads * D)."""
        keys, values = p.pool.k[:, index], p.pool.v[:, index]  # (n, kv_heads, capacity, D)
        if p.dense:  # one token a row, rows consecutive: views instead of gathers
            new_k, new_v = k[0, :, p.first:p.first + len(p.row)], v[0, :, p.first:p.first + len(p.row)]
            queries = q[0, :, p.first:p.first + len(p.row)].transpose(0, 1).unsqueeze(2)
        else:
            new_k, new_v = k[0, :, p.packed], v[0, :, p.packed]
            queries = q.new_zeros(p.hi - p.lo, self.n_heads, p.width, self.head_dim)
            queries[p.row, :, p.query] = q[0, :, p.packed].transpose(0, 1)
        keys[p.pool_row, :, p.pos] = new_k.transpose(0, 1)  # (tokens, kv_heads, D)
        values[p.pool_row, :, p.pos] = new_v.transpose(0, 1)
        y = F.scaled_dot_product_attention(queries, keys[p.lo:p.hi, :, :p.end], values[p.lo:p.hi, :, :p.end],
                                           attn_mask=p.mask, scale=self.scale,
                                           enable_gqa=self.n_heads != self.n_kv_heads)  # (R, heads, width, D)
        y = y[:, :, 0] if p.dense else y[p.row, :, p.query]  # (tokens, heads, D)
        return y.reshape(-1, self.n_heads * self.head_dim)

    def _after_prefix(self, q_len: int, kv_len: int, key_start: int, start: int, q: torch.Tensor) -> bool:
        """A CUDA prefill chunk over keys from position 0 that the LSE-merged fast kernels can take."""
        if q.device.type != "cuda" or q_len == 1 or q_len == kv_len or key_start != 0:
            return False
        if self.scale != self.head_dim ** -0.5:  # the merged kernels use the default scale
            return False
        if self.window is not None and start + q_len > self.window:
            return False
        if self.prefix_kernel is None:
            self.prefix_kernel = choose_kernel(q.device, q.dtype)
        return self.prefix_kernel != "efficient"

    def _mask(self, q_len: int, kv_len: int, key_start: int, start: int, device, key_pos=None):
        """Causal mask for queries at [start, start+q_len) over keys at [key_start, key_start+kv_len)
        (or at the positions `key_pos`, a wrapped ring cache's slots, which only a window model has).

        None when SDPA needs none (one query; or plain causal, passed as is_causal). On CUDA a
        lower-right causal bias keeps SDPA in its flash / cuDNN kernels without materialising a
        q_len x kv_len matrix; CPU kernels run an explicit boolean mask faster (docs/performance.md,
        "Attention masks"). A sliding window always needs the explicit mask.
        """
        if not kv_layout.window_cuts_in(self.window, start + q_len - 1, 0):
            if q_len == 1 or q_len == kv_len:
                return None
            if device.type == "cuda":
                from torch.nn.attention.bias import causal_lower_right  # slow import: only when needed

                return causal_lower_right(q_len, kv_len)
        return self._visible(q_len, kv_len, key_start, start, device, key_pos)

    def _visible(self, q_len: int, kv_len: int, key_start: int, start: int, device, key_pos=None) -> torch.Tensor:
        """The boolean (q_len, kv_len) mask of which keys each query sees (causal, and within the window)."""
        q_pos = torch.arange(start, start + q_len, device=device)
        k_pos = torch.arange(key_start, key_start + kv_len, device=device) if key_pos is None else key_pos
        return kv_layout.visible(q_pos, k_pos, self.window)


POOLED_ROW_TOKENS = 64  # a row of at most this many tokens attends with its pool's other rows, in one call


class Rows:
    """Several sequences packed into one forward's T positions (B = 1): sequence i's tokens are the packed
    positions [offsets[i], offsets[i + 1]), running at positions [starts[i], starts[i] + counts[i]) of its own
    cache `caches[i]` (a ModelCache). The projections and the MLP see one (1, T, hidden) tensor, so B decode
    steps cost one matmul of B rows. The rows whose caches are rows of one CachePool (decode steps, short
    prompt pieces) attend in one call over the pool (PooledRows); any other attends alone over its cache."""

    def __init__(self, caches: list, counts: list[int], device):
        self.caches, self.counts = caches, counts
        self.starts = [c.length for c in caches]
        self.offsets = [0]
        for n in counts:
            self.offsets.append(self.offsets[-1] + n)
        self.positions = torch.cat([torch.arange(s, s + n) for s, n in zip(self.starts, counts)]).to(device)
        self.last = torch.tensor(self.offsets[1:], device=device) - 1  # each sequence's last packed position
        pool = caches[0].pool
        pooled = [i for i, (c, n) in enumerate(zip(caches, counts))
                  if pool is not None and c.pool is pool and n <= POOLED_ROW_TOKENS]
        self.pooled = PooledRows(pool, [caches[i] for i in pooled], [counts[i] for i in pooled],
                                 [self.offsets[i] for i in pooled], self.offsets[-1], device) \
            if len(pooled) > 1 else None
        self.apart = [i for i in range(len(caches)) if self.pooled is None or i not in pooled]

    def layer(self, i: int) -> "LayerRows":
        return LayerRows([((self.offsets[j], self.offsets[j + 1]), self.caches[j].layers[i], self.starts[j])
                          for j in self.apart], i, self.pooled)


class PooledRows:
    """Rows whose caches are rows of one CachePool, attended in one call: the pool's rows [lo, hi) read up to
    `end` positions, each row's queries (padded to `width`) masked causally to its own positions. Pool rows
    between them that take no part, and padding queries, see position 0 only; their output is dropped."""

    def __init__(self, pool, caches: list, counts: list[int], packed: list[int], total: int, device):
        self.pool = pool
        rows, starts = [c.row for c in caches], [c.length for c in caches]
        self.lo, self.hi, self.width = min(rows), max(rows) + 1, max(counts)
        self.end = max(s + n for s, n in zip(starts, counts))
        pool.make_finite(range(self.lo, self.hi), self.end)

        def each(values) -> torch.Tensor:  # one value per token of the pooled rows, in packed order
            return torch.cat([torch.as_tensor(v, dtype=torch.long).expand(n) if isinstance(v, int) else v
                              for v, n in zip(values, counts)]).to(device)

        self.row = each([r - self.lo for r in rows])  # the token's row among [lo, hi)
        self.pos = each([torch.arange(s, s + n) for s, n in zip(starts, counts)])  # its position
        self.query = each([torch.arange(n) for n in counts])  # its query slot within its row
        self.packed = each([torch.arange(o, o + n) for o, n in zip(packed, counts)])  # its packed position
        self.pool_row = self.row + self.lo
        # one-token rows over consecutive pool rows, in packed order: queries and outputs are views
        self.dense = self.width == 1 and rows == list(range(self.lo, self.hi)) and packed == list(
            range(packed[0], packed[0] + len(rows)))
        self.first = packed[0]
        self.everything = self.dense and packed[0] == 0 and len(rows) == total  # every packed position, in order
        last = torch.zeros(self.hi - self.lo, self.width, dtype=torch.long, device=device)  # each query's position
        last[self.row, self.query] = self.pos
        self.mask = (torch.arange(self.end, device=device) <= last[..., None])[:, None]  # (R, 1, width, end)


class LayerRows(list):
    """One layer's view of Rows: ((begin, end) in the packed positions, the sequence's KVCache, its start) for
    each row attending alone; `pooled`: the rows attending in one call over their pool's layer `index`."""

    def __init__(self, rows: list, index: int, pooled: PooledRows | None):
        super().__init__(rows)
        self.index, self.pooled = index, pooled


def capped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float,
                     cap: float) -> torch.Tensor:
    """Attention with soft-capped scores, cap * tanh(q.k * scale / cap), written out as transformers' eager Gemma 2
    attention is (no fused kernel takes a cap). q (B, heads, T, D), k and v (B, kv_heads, L, D), `visible`
    (T, L) -> (B, heads, T, D). It holds the (B, heads, T, L) scores: the planner counts them."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # kv head j serves query heads j*g..
    scores = soft_cap(torch.matmul(q, k.transpose(-1, -2)) * scale, cap)
    scores = scores.masked_fill_(~visible, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


class MLP(nn.Module):
    def __init__(self, cfg: ArborConfig):
        super().__init__()
        self.gelu = cfg.hidden_act != "silu"  # SwiGLU (Llama), or GeGLU with the tanh GELU (Gemma)
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_weight: torch.Tensor | None = None  # gate and up rows contiguous (fuse_layer)
        self.gate_up_proj: nn.Module | None = None  # gate and up in one quantized matmul


class Block(nn.Module):
    """One decoder layer's modules (HF names); its math is its family's (arch/), its attention eager SDPA."""

    def __init__(self, cfg: ArborConfig, layer: int = 0):
        super().__init__()
        self.arch = family(cfg)
        eps, offset = cfg.rms_norm_eps, self.arch.NORM_OFFSET
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, offset)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, offset)
        self.mlp = MLP(cfg)
        if self.arch.SANDWICH:  # norms before and after attention and the MLP
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, offset)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, offset)

    def forward(self, x, cos, sin, cache, start):
        layer = self.arch.layer_of(self)
        # the halves are called so that no name holds q, k, v or the attention output through the MLP: in a
        # long prefill chunk each is (T, hidden)-sized, and the MLP's own tensors are the peak
        x = self.arch.attention_out(x, self.self_attn.attend(*self.arch.pre_attention(x, layer, cos, sin), cache,
                                                              start), layer)
        return self.arch.feed_forward(x, layer)


class Backbone(nn.Module):
    def __init__(self, cfg: ArborConfig):
        super().__init__()
        # the table is made here, not by nn.Embedding: its random init on the meta device (how checkpoints are
        # loaded) runs a reference op that imports torch._dynamo, ~1 s of every cold start
        table = torch.empty(cfg.vocab_size, cfg.hidden_size)
        if not table.is_meta:
            nn.init.normal_(table)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=table)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, family(cfg).NORM_OFFSET)


class Transformer(nn.Module):
    """Llama-family causal LM. `forward` runs tokens at positions [start, start+T)."""

    def __init__(self, cfg: ArborConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope_cos: torch.Tensor | None = None
        self.rope_sin: torch.Tensor | None = None
        # Gemma's sliding layers rotate with their own base, never scaled (set with the global tables)
        self.local_cos: torch.Tensor | None = None
        self.local_sin: torch.Tensor | None = None

    def set_rope(self, inv_freq: torch.Tensor, attention_factor: float, positions: int) -> None:
        """Precompute cos/sin for positions [0, positions), as transformers does: float32 angles."""
        device = self.model.embed_tokens.weight.device
        t = torch.arange(positions, device=device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq.to(device=device, dtype=torch.float32))
        emb = torch.cat((freqs, freqs), dim=-1)
        dtype = self.model.embed_tokens.weight.dtype
        cos, sin = (emb.cos() * attention_factor).to(dtype), (emb.sin() * attention_factor).to(dtype)
        same = self.rope_cos is not None and (self.rope_cos.shape, self.rope_cos.device) == (cos.shape, cos.device)
        if same:
            self.rope_cos.copy_(cos)  # in place: captured CUDA graphs keep reading the same buffers
            self.rope_sin.copy_(sin)
        else:
            self.rope_cos, self.rope_sin = cos, sin
        if self.config.rope_local_base_freq:
            local = local_rope(self.config)
            freqs = torch.outer(t, torch.from_numpy(local.inv_freq).to(device=device, dtype=torch.float32))
            emb = torch.cat((freqs, freqs), dim=-1)
            self.local_cos, self.local_sin = emb.cos().to(dtype), emb.sin().to(dtype)

    def _rope_for_layers(self, start: int, T: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) of positions [start, start + T) for each layer: Gemma's sliding layers read the local tables."""
        return self._rope_at(slice(start, start + T))

    def _rope_at(self, positions: slice | torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) of `positions` (a range, or each packed token's position) for each layer."""
        full = (self.rope_cos[positions], self.rope_sin[positions])
        if self.local_cos is None:
            return [full] * len(self.model.layers)
        local = (self.local_cos[positions], self.local_sin[positions])
        return [local if layer.self_attn.window is not None else full for layer in self.model.layers]

    def forward(self, tokens: torch.Tensor, start: int = 0, caches: list[KVCache] | None = None,
                last_only: bool = False) -> torch.Tensor:
        # tokens: (B, T) -> logits (B, T, vocab), or (B, 1, vocab) when last_only
        T = tokens.shape[1]
        if self.rope_cos is None or start + T > self.rope_cos.shape[0]:
            raise ValueError(f"positions up to {start + T} exceed the RoPE table ({self._rope_len()})")
        x = embed(tokens, self.model.embed_tokens, self.config.embedding_multiplier)
        for i, (layer, (cos, sin)) in enumerate(zip(self.model.layers, self._rope_for_layers(start, T))):
            x = layer(x, cos, sin, caches[i] if caches is not None else None, start)
        if last_only:
            x = x[:, -1:]
        return final(x, self.model.norm, self.lm_head, self.config.final_logit_softcapping)

    def forward_rows(self, tokens: torch.Tensor, rows: Rows, every: bool = False) -> torch.Tensor:
        """Several sequences in one forward: tokens (1, T) packed as `rows` says, each appended to its own
        cache -> each sequence's last logits (B, vocab), or every position's (T, vocab) with `every`."""
        end = max(s + n for s, n in zip(rows.starts, rows.counts))
        if self.rope_cos is None or end > self.rope_cos.shape[0]:
            raise ValueError(f"positions up to {end} exceed the RoPE table ({self._rope_len()})")
        x = embed(tokens, self.model.embed_tokens, self.config.embedding_multiplier)
        for i, (layer, (cos, sin)) in enumerate(zip(self.model.layers, self._rope_at(rows.positions))):
            x = layer(x, cos, sin, rows.layer(i), 0)
        if not every:
            x = x[:, rows.last]  # (1, B, hidden): the head runs on each sequence's last position only
        return final(x, self.model.norm, self.lm_head, self.config.final_logit_softcapping)[0]

    def hidden_states(self, tokens: torch.Tensor, checkpoint_blocks: bool = False) -> torch.Tensor:
        """(B, T) -> the final norm's output (B, T, hidden) at positions [0, T), no cache: training's
        forward (train.py applies the head in chunks). With `checkpoint_blocks`, each block's activations
        are recomputed in the backward pass instead of kept: one block's memory, not all of them."""
        from torch.utils.checkpoint import checkpoint  # imported when training: it costs every start otherwise

        x = embed(tokens, self.model.embed_tokens, self.config.embedding_multiplier)
        for layer, (cos, sin) in zip(self.model.layers, self._rope_for_layers(0, tokens.shape[1])):
            if checkpoint_blocks:
                x = checkpoint(layer, x, cos, sin, None, 0, use_reentrant=False)
            else:
                x = layer(x, cos, sin, None, 0)
        return self.model.norm(x)

    def fuse_projections(self) -> None:
        """fuse_layer on every block (the CUDA graph reads the fused weights; runner.py calls this at load)."""
        for layer in self.model.layers:
            fuse_layer(layer)

    def _rope_len(self) -> int:
        return 0 if self.rope_cos is None else self.rope_cos.shape[0]


def fuse_layer(block: Block) -> None:
    """The one q/k/v (and gate/up) fusion: the rows stored contiguously, in the order q, k, v (gate, up),
    the per-projection weights becoming views of them, so no memory is duplicated, the HF names and the
    parameter count are unchanged and eager's separate matmuls read the same numbers. The CUDA graph
    multiplies by the fused weights; quantize.py quantizes them into one Linear each. Done once: a block
    already fused, or quantized, is left as it is."""
    a, mlp = block.self_attn, block.mlp
    if a.qkv_weight is not None or a.qkv_proj is not None:
        return
    a.qkv_weight, (a.q_proj.weight, a.k_proj.weight, a.v_proj.weight) = _fused(
        a.q_proj.weight, a.k_proj.weight, a.v_proj.weight)
    if a.q_proj.bias is not None:
        a.qkv_bias, (a.q_proj.bias, a.k_proj.bias, a.v_proj.bias) = _fused(a.q_proj.bias, a.k_proj.bias, a.v_proj.bias)
    mlp.gate_up_weight, (mlp.gate_proj.weight, mlp.up_proj.weight) = _fused(mlp.gate_proj.weight, mlp.up_proj.weight)


def _fused(*params: nn.Parameter) -> tuple[torch.Tensor, list[nn.Parameter]]:
    whole = torch.cat([p.detach() for p in params], dim=0)
    views, start = [], 0
    for p in params:
        views.append(nn.Parameter(whole[start:start + p.shape[0]], requires_grad=p.requires_grad))
        start += p.shape[0]
    return whole, views
