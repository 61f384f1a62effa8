"""What the GGUF import knows of each llama.cpp architecture (`general.architecture`), one entry each.

An entry says how the file's tensors become a checkpoint the backends run (their Hugging Face names,
and the fixes for how llama.cpp stored them) and what config a file of that architecture leaves out.
Adding an architecture is one entry here, one file per backend (backends/*/arch/) and a contract-test
entry.

Why Llama's Q/K rows are un-permuted: HF Llama applies RoPE by rotating the two *halves* of each head
(`rotate_half`); llama.cpp rotates *adjacent pairs*. Its converter reorders each head's Q/K rows so
pairs line up, and the same rows of our checkpoint must go back to the half-split order for the
HF-style math in the backends (SmolLM3's too: its converter is Llama's). Qwen2, Qwen3, Gemma 2/3 and Phi-3
files are not permuted (llama.cpp runs them with the half-split "NEOX" RoPE).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from arbor_core.errors import ConfigError

GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Not weights in the HF layout: rope_freqs (Llama 3 RoPE scaling) becomes config, the others are
# precomputed tables some old converters stored.
NON_WEIGHT_TENSORS = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}
# the parts of a layer whose rows llama.cpp permuted, and the config field that counts their heads
ROTARY_PARTS = {"attn_q": "num_attention_heads", "attn_k": "num_key_value_heads"}

LLAMA_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
# Qwen3's block: Llama's with norms on each head's q and k (stored as they are, rows not permuted: NEOX RoPE)
QWEN3_LAYER_TENSORS = {**LLAMA_LAYER_TENSORS, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# Gemma's block: norms after attention and around the MLP; its ffn_norm is the norm before the MLP (a Llama
# block's ffn_norm is HF's post_attention_layernorm, which in Gemma follows attention). Gemma 3 adds q/k norms.
GEMMA2_LAYER_TENSORS = {
    **LLAMA_LAYER_TENSORS, "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
GEMMA3_LAYER_TENSORS = {**GEMMA2_LAYER_TENSORS, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# Phi-3's q/k/v and gate/up projections are one tensor each, in the GGUF as in HF's checkpoint: they keep HF's
# fused names (checkpoint.FUSED_PROJECTIONS splits them at load).
PHI3_LAYER_TENSORS = {
    **{k: v for k, v in LLAMA_LAYER_TENSORS.items() if k not in ("attn_q", "attn_k", "attn_v", "ffn_gate")},
    "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj",
}
# What a gemma3 GGUF does not record, from Gemma 3's published configurations (google/gemma-3-{270m,1b,4b,12b,
# 27b}[-it] config.json on the Hugging Face Hub, and the Gemma 3 technical report, 2025, section 2.1): five
# sliding-window layers then one global layer, the sliding layers' RoPE base 10,000 (unscaled), and
# query_pre_attn_scalar = head_dim in every size but 27B, whose is hidden_size / heads = 168.
GEMMA3_SLIDING_WINDOW_PATTERN = 6
GEMMA3_ROPE_LOCAL_BASE_FREQ = 10_000.0
GEMMA3_QUERY_PRE_ATTN_SCALAR_BY_HIDDEN = {5376: 168}
# A gemma2 GGUF records its soft-caps and window but not the query scale: head_dim in Gemma 2's published 2B and 9B
# configurations, hidden_size / heads = 144 in the 27B's (google/gemma-2-{2b,9b,27b} config.json; llama.cpp
# hard-codes the same). Its alternating layers are transformers' Gemma2Config default (ArborConfig applies it).
GEMMA2_QUERY_PRE_ATTN_SCALAR_BY_HIDDEN = {4608: 144}

# A smollm3 GGUF records no NoPE layers: llama.cpp's converter writes Llama's keys only (conversion/llama.py,
# SmolLM3Model), and llama.cpp itself fixes them (src/models/smollm3.cpp: n_no_rope_layer_step = 4, RoPE
# skipped where (layer + 1) % 4 == 0), as SmolLM3-3B's published config.json does (no_rope_layer_interval 4).
SMOLLM3_NO_ROPE_LAYER_STEP = 4


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert convert_hf_to_gguf.py's permute for Q/K weights and biases (rows = n_head * head_dim):
    it did reshape(n_head, 2, head_dim // 2, …).swapaxes(1, 2); we do the reverse, exactly."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gemma3_published_config(hidden: int, head_dim: int, layers: int) -> dict[str, Any]:
    """The config fields a gemma3 GGUF lacks, for a model of this shape."""
    return dict(
        layer_types=["full_attention" if (i + 1) % GEMMA3_SLIDING_WINDOW_PATTERN == 0 else "sliding_attention"
                     for i in range(layers)],
        rope_local_base_freq=GEMMA3_ROPE_LOCAL_BASE_FREQ,
        query_pre_attn_scalar=GEMMA3_QUERY_PRE_ATTN_SCALAR_BY_HIDDEN.get(hidden, head_dim))


def smollm3_published_config(hidden: int, head_dim: int, layers: int) -> dict[str, Any]:
    """SmolLM3's NoPE layers, as llama.cpp runs a smollm3 GGUF (1: RoPE, 0: none)."""
    return dict(no_rope_layers=[int((i + 1) % SMOLLM3_NO_ROPE_LAYER_STEP != 0) for i in range(layers)])


def gemma2_published_config(hidden: int, head_dim: int, layers: int) -> dict[str, Any]:
    return dict(query_pre_attn_scalar=GEMMA2_QUERY_PRE_ATTN_SCALAR_BY_HIDDEN.get(hidden, head_dim))


@dataclass(frozen=True)
class GGUFArchitecture:
    name: str  # llama.cpp's general.architecture
    model_type: str  # the config's (backends find their block by it)
    layer_tensors: Mapping[str, str]  # a layer's GGUF tensor -> its HF module, below model.layers.N
    rotary_permuted: bool = False  # Q/K rows reordered for llama.cpp's adjacent-pair RoPE: undone on import
    norms_plus_one: bool = False  # RMSNorm weights stored as 1 + w, the factor llama.cpp multiplies by
    attention_bias: bool = False  # q/k/v projections carry biases (the tensors have the last word)
    # rope.dimension_count counts the rotated dims only (Phi-3's partial_rotary_factor); head_dim is hidden / heads
    rope_dims_partial: bool = False
    # (hidden_size, head_dim, layers) -> config fields the file does not record
    published_config: Callable[[int, int, int], dict[str, Any]] | None = None

    def hf_name(self, gguf_name: str) -> str:
        """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight', and the global tensors."""
        if match := LAYER_NAME.fullmatch(gguf_name):
            layer, part, kind = match.groups()
            if part in self.layer_tensors:
                return f"model.layers.{layer}.{self.layer_tensors[part]}.{kind}"
        else:
            stem, _, kind = gguf_name.rpartition(".")
            if stem in GLOBAL_TENSORS and kind in ("weight", "bias"):
                return f"{GLOBAL_TENSORS[stem]}.{kind}"
        raise ConfigError(f"GGUF tensor {gguf_name} is not part of the Llama block arbor runs")

    def layer_weights(self) -> list[str]:
        """The weights every layer must have, below model.layers.N."""
        return [f"{part}.weight" for part in self.layer_tensors.values()]

    def rows_in_hf_order(self, gguf_name: str, values: np.ndarray, config) -> np.ndarray:
        """A tensor's rows (or a block-quantized tensor's codes or scales) as HF orders them."""
        part = gguf_name.split(".")[-2]
        if self.rotary_permuted and part in ROTARY_PARTS:
            return unpermute_rotary(values, getattr(config, ROTARY_PARTS[part]))
        return values

    def float_weight(self, hf_name: str, values: np.ndarray) -> np.ndarray:
        """A dequantized tensor as the checkpoint keeps it: a Gemma norm's w, not the 1 + w llama.cpp stored
        (the model computes x * (1 + w))."""
        return values - 1.0 if self.norms_plus_one and hf_name.endswith("norm.weight") else values


ARCHITECTURES = {arch.name: arch for arch in (
    GGUFArchitecture("llama", "llama", LLAMA_LAYER_TENSORS, rotary_permuted=True),
    GGUFArchitecture("mistral", "mistral", LLAMA_LAYER_TENSORS, rotary_permuted=True),
    GGUFArchitecture("qwen2", "qwen2", LLAMA_LAYER_TENSORS, attention_bias=True),
    GGUFArchitecture("gemma3", "gemma3_text", GEMMA3_LAYER_TENSORS, norms_plus_one=True,
                     published_config=gemma3_published_config),
    GGUFArchitecture("qwen3", "qwen3", QWEN3_LAYER_TENSORS),
    GGUFArchitecture("smollm3", "smollm3", LLAMA_LAYER_TENSORS, rotary_permuted=True,
                     published_config=smollm3_published_config),
    GGUFArchitecture("gemma2", "gemma2", GEMMA2_LAYER_TENSORS, norms_plus_one=True,
                     published_config=gemma2_published_config),
    GGUFArchitecture("phi3", "phi3", PHI3_LAYER_TENSORS, rope_dims_partial=True),
)}


def gguf_architecture(name: Any) -> GGUFArchitecture:
    """The entry of a GGUF's general.architecture; ConfigError for one arbor does not run."""
    if name not in ARCHITECTURES:
        raise ConfigError(f"GGUF general.architecture {name!r} is not supported; arbor runs "
                          f"{', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[name]
