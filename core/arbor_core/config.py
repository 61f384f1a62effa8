"""ArborConfig: the model's shape, a superset of Hugging Face's config.json for the Llama family.

A HF directory's config.json loads as it is (Llama, Mistral, Qwen2/3, SmolLM2/3, Gemma 2/3, Phi-3), in both the
`rope_scaling` form and transformers 5's `rope_parameters` form; `to_dict()` writes a config.json
that transformers loads back. GGUF metadata converts in arbor_weights (gguf_import.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")
# Architectures whose math is the Llama block (RMSNorm, GQA + RoPE, SwiGLU), differing only in flags.
LLAMA_FAMILY = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "gemma3_text": "Gemma3ForCausalLM",
                "qwen3": "Qwen3ForCausalLM", "smollm3": "SmolLM3ForCausalLM",
                "gemma2": "Gemma2ForCausalLM", "phi3": "Phi3ForCausalLM"}
# transformers' switch for a configured window: off, these families attend to the whole context on every layer
USE_SLIDING_WINDOW = ("qwen2", "qwen3", "smollm3")
GEMMA_TYPES = ("gemma2", "gemma3_text")  # norms of 1 + w, embeddings scaled by sqrt(hidden), GeGLU
# The soft caps transformers applies, by model type (its Gemma 3 attention reads no attn_logit_softcapping)
SOFT_CAPS = {"gemma2": ("attn_logit_softcapping", "final_logit_softcapping"), "gemma3_text": ("final_logit_softcapping",)}
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # SwiGLU (Llama), GeGLU with tanh GELU (Gemma)
LAYER_TYPES = ("full_attention", "sliding_attention")
ROPE_KEYS = (
    "rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
    "low_freq_factor", "high_freq_factor", "attention_factor", "mscale", "mscale_all_dim", "truncate",
)


@dataclass
class ArborConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2: always)
    attention_out_bias: bool | None = None  # bias on o_proj; defaults to attention_bias (Llama)
    sliding_window: int | None = None  # Mistral-style local attention window, in tokens
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    model_type: str = "llama"
    hidden_act: str | None = None  # the MLP's gate activation; default: silu, gelu_pytorch_tanh for Gemma
    query_pre_attn_scalar: float | None = None  # attention scores are scaled by this ** -0.5 (default head_dim)
    layer_types: list[str] | None = None  # per layer, full_attention or sliding_attention (None: all alike)
    rope_local_base_freq: float | None = None  # the RoPE base of sliding layers, unscaled (Gemma 3)
    no_rope_layers: list[int] | None = None  # SmolLM3: per layer 1 (RoPE) or 0 (no position encoding, "NoPE")
    attn_logit_softcapping: float | None = None  # Gemma: attention scores become cap * tanh(score / cap)
    final_logit_softcapping: float | None = None  # Gemma: the logits become cap * tanh(logit / cap)
    partial_rotary_factor: float | None = None  # the share of each head RoPE rotates (None: all of it)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # unknown keys, kept for export

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and _positive(self.num_attention_heads):
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.attention_out_bias is None:
            self.attention_out_bias = self.attention_bias and self.model_type != "qwen2"
        if self.hidden_act is None:
            self.hidden_act = "gelu_pytorch_tanh" if self.gemma else "silu"
        if self.model_type == "gemma2" and self.layer_types is None:  # transformers' Gemma2Config: even layers slide
            self.layer_types = ["full_attention" if i % 2 else "sliding_attention" for i in range(self.num_hidden_layers)]
        if self.rope_scaling is not None:
            self.rope_scaling = _normalise_rope_scaling(self.rope_scaling, self.max_position_embeddings)
        self.validate()

    # ---- derived quantities -------------------------------------------------------------
    @property
    def gemma(self) -> bool:
        """Gemma's block (2 and 3): norms before and after attention and the MLP, weights of every RMSNorm
        stored as an offset from 1, embeddings scaled by sqrt(hidden_size); Gemma 3 adds RMSNorm on q and k."""
        return self.model_type in GEMMA_TYPES

    @property
    def embedding_multiplier(self) -> float | None:
        return self.hidden_size ** 0.5 if self.gemma else None

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of `layer`: the model's for every layer, or for its sliding_attention
        layers when layer_types says which those are; None: it attends to the whole context."""
        if self.sliding_window is None or (self.layer_types is not None and
                                           self.layer_types[layer] != "sliding_attention"):
            return None
        return self.sliding_window

    @property
    def layer_windows(self) -> list[int | None]:
        return [self.layer_window(i) for i in range(self.num_hidden_layers)]

    def layer_rope(self, layer: int) -> bool:
        """Whether `layer` rotates its q and k (SmolLM3's NoPE layers do not)."""
        return self.no_rope_layers is None or bool(self.no_rope_layers[layer])

    @property
    def rotary_dim(self) -> int:
        """The dimensions of each head RoPE rotates (the first ones; the rest pass through)."""
        return int(self.head_dim * (self.partial_rotary_factor or 1.0))

    @property
    def rope_type(self) -> str:
        return self.rope_scaling["rope_type"] if self.rope_scaling else "default"

    @property
    def trained_context(self) -> int:
        """The context the model was trained for: before any RoPE scaling was configured."""
        if self.rope_scaling and self.rope_scaling.get("original_max_position_embeddings"):
            return int(self.rope_scaling["original_max_position_embeddings"])
        return self.max_position_embeddings

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    def kv_bytes_per_token(self, bytes_per_element: int, scale_bytes: int = 0) -> int:
        """Bytes of K and V cache one token costs across all layers.

        `scale_bytes`: what a quantized cache stores beside each head's vector (an int8 cache keeps
        one float16 scale per head, per token, for K and for V).
        """
        per_head = self.head_dim * bytes_per_element + scale_bytes
        return 2 * self.num_hidden_layers * self.num_key_value_heads * per_head

    def num_parameters(self) -> int:
        h, v, i, layers = self.hidden_size, self.vocab_size, self.intermediate_size, self.num_hidden_layers
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        if self.attention_bias:
            attn += q + 2 * kv
        if self.attention_out_bias:
            attn += h
        per_layer = attn + 3 * h * i + 2 * h
        return v * h * (1 if self.tie_word_embeddings else 2) + layers * per_layer + h

    def with_rope_scaling(self, rope_scaling: dict[str, Any] | None) -> "ArborConfig":
        return dataclasses.replace(self, rope_scaling=dict(rope_scaling) if rope_scaling else None)

    # ---- validation ---------------------------------------------------------------------
    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if not _positive(getattr(self, name)):
                raise ConfigError(f"config field {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config field num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"config field head_dim must be even for RoPE, got {self.head_dim}")
        if not (isinstance(self.rms_norm_eps, (int, float)) and 0 < self.rms_norm_eps < 1):
            raise ConfigError(f"config field rms_norm_eps must be in (0, 1), got {self.rms_norm_eps!r}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 1):
            raise ConfigError(f"config field rope_theta must be a number > 1, got {self.rope_theta!r}")
        if self.sliding_window is not None and not _positive(self.sliding_window):
            raise ConfigError(f"config field sliding_window must be a positive integer, got {self.sliding_window!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"config field hidden_act {self.hidden_act!r} is not one of {', '.join(ACTIVATIONS)}")
        if self.layer_types is not None and (len(self.layer_types) != self.num_hidden_layers
                                             or any(t not in LAYER_TYPES for t in self.layer_types)):
            raise ConfigError(f"config field layer_types must give one of {', '.join(LAYER_TYPES)} for each of the "
                              f"{self.num_hidden_layers} layers")
        for name in ("query_pre_attn_scalar", "rope_local_base_freq", "final_logit_softcapping",
                     "attn_logit_softcapping", "partial_rotary_factor"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ConfigError(f"config field {name} must be a positive number, got {value!r}")
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(self, name) is not None and name not in SOFT_CAPS.get(self.model_type, ()):
                raise ConfigError(f"config field {name} is set, but {self.model_type} runs no such soft-capping "
                                  "in transformers, so arbor does not either")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ConfigError(f"config field partial_rotary_factor must rotate an even number of head dims, "
                              f"got {self.partial_rotary_factor!r}")
        if self.model_type not in LLAMA_FAMILY:
            raise ConfigError(
                f"config field model_type {self.model_type!r} is not supported; arbor runs "
                f"{', '.join(sorted(LLAMA_FAMILY))}")
        if self.no_rope_layers is not None and (
                self.model_type != "smollm3" or not isinstance(self.no_rope_layers, list)
                or len(self.no_rope_layers) != self.num_hidden_layers or any(r not in (0, 1) for r in self.no_rope_layers)):
            raise ConfigError(f"config field no_rope_layers must give 1 (RoPE) or 0 (none) for each of the "
                              f"{self.num_hidden_layers} layers of a smollm3 model")
        if self.rope_scaling:
            _validate_rope_scaling(self.rope_scaling, self.rotary_dim)

    # ---- config.json --------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ArborConfig":
        if not isinstance(raw, dict):
            raise ConfigError("config.json must hold a JSON object")
        data = dict(raw)
        model_type = data.pop("model_type", None) or "llama"
        data.pop("architectures", None)  # derived from model_type on save
        rope = data.pop("rope_scaling", None)
        params = data.pop("rope_parameters", None)  # transformers >= 5 spelling; holds rope_theta too
        if isinstance(params, dict):
            params = dict(params)
            if params.get("rope_theta") is not None:  # transformers gives rope_parameters priority
                data["rope_theta"] = params.pop("rope_theta")
            if rope is None and params.get("rope_type", params.get("type", "default")) != "default":
                rope = params
        for scaling in (rope, params):  # transformers 5 keeps it beside the RoPE parameters
            if isinstance(scaling, dict) and "partial_rotary_factor" in scaling:
                data.setdefault("partial_rotary_factor", scaling["partial_rotary_factor"])
        if "hidden_activation" in data:  # Gemma's name for it
            data.setdefault("hidden_act", data.pop("hidden_activation"))
        _implicit_family_fields(model_type, data)
        if model_type == "phi3" and isinstance(rope, dict):
            rope = _phi3_rope_scaling(rope, data.get("original_max_position_embeddings"))
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "model_type", "rope_scaling"}
        if model_type != "smollm3":  # transformers reads no_rope_layers for SmolLM3 only: elsewhere it is kept, unused
            known.discard("no_rope_layers")
        kwargs = {k: data.pop(k) for k in list(data) if k in known}
        for required in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if required not in kwargs:
                raise ConfigError(f"config is missing the field {required}")
        if kwargs.get("rope_theta") is None:
            kwargs.pop("rope_theta", None)
        return cls(**kwargs, rope_scaling=rope, model_type=model_type, extra=data)

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = getattr(self, f.name)
        out["architectures"] = [LLAMA_FAMILY[self.model_type]]
        if self.model_type in USE_SLIDING_WINDOW:
            out["use_sliding_window"] = self.sliding_window is not None
        if self.model_type == "phi3" and self.rope_type == "longrope":  # Phi3Config reads it here first (4096 if absent)
            out["original_max_position_embeddings"] = self.rope_scaling["original_max_position_embeddings"]
        if self.gemma:
            out["hidden_activation"] = out.pop("hidden_act")
        for name in ("query_pre_attn_scalar", "layer_types", "rope_local_base_freq", "partial_rotary_factor", "no_rope_layers") + (
                () if self.model_type == "gemma2" else ("attn_logit_softcapping", "final_logit_softcapping")):
            if out.get(name) is None:  # Gemma 2's caps stay, even null: its transformers config defaults them to on
                out.pop(name)
        if self.rope_scaling is None:
            out.pop("rope_scaling")
        return out

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ArborConfig":
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); re-download or re-convert the model") from None
        return cls.from_dict(raw)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _implicit_family_fields(model_type: str, data: dict[str, Any]) -> None:
    """Fill in, as transformers' config class of `model_type` does, what its config.json may leave implicit."""
    if model_type == "qwen2":  # biases on q, k and v, none on o
        data["attention_bias"] = True
        data.setdefault("attention_out_bias", False)
    if model_type == "gemma2":  # transformers' Gemma2Config defaults, for a config.json that leaves them out
        for name, value in (("attn_logit_softcapping", 50.0), ("final_logit_softcapping", 30.0),
                            ("query_pre_attn_scalar", 256)):
            data.setdefault(name, value)
    layers = data.get("num_hidden_layers")
    layers = layers if _positive(layers) else 0  # a bad count is validate's to report
    if model_type == "smollm3":
        if data.get("no_rope_layers") is None:  # every interval-th layer without RoPE, the last of each interval
            interval = data.get("no_rope_layer_interval", 4)
            if not _positive(interval):
                raise ConfigError(f"config field no_rope_layer_interval must be a positive integer, got {interval!r}")
            data["no_rope_layers"] = [int((i + 1) % interval != 0) for i in range(layers)]
        elif isinstance(data["no_rope_layers"], list):  # "at least" one entry per layer: the first ones count
            data["no_rope_layers"] = data["no_rope_layers"][:layers]
        else:
            raise ConfigError(f"config field no_rope_layers must be a list, got {data['no_rope_layers']!r}")
    if model_type in USE_SLIDING_WINDOW:
        if not data.pop("use_sliding_window", False):
            data["sliding_window"] = None
        elif data.get("layer_types") is None and data.get("sliding_window") is not None:
            # the windowed layers: Qwen's from max_window_layers on, SmolLM3's NoPE layers
            windowed = ([rope == 0 for rope in data["no_rope_layers"]] if model_type == "smollm3"
                        else [i >= data.get("max_window_layers", 28) for i in range(layers)])
            data["layer_types"] = [LAYER_TYPES[int(w)] for w in windowed]


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _normalise_rope_scaling(rope: dict[str, Any], max_positions: int) -> dict[str, Any] | None:
    if not isinstance(rope, dict):
        raise ConfigError(f"config field rope_scaling must be an object, got {rope!r}")
    rope = dict(rope)
    kind = rope.pop("type", None)
    rope.setdefault("rope_type", kind or "default")
    rope.pop("rope_theta", None)
    rope.pop("partial_rotary_factor", None)  # a config field of its own (transformers 5 keeps it here)
    if rope["rope_type"] == "su":  # LongRoPE's first name (the early Phi-3 128K configs)
        rope["rope_type"] = "longrope"
    if rope["rope_type"] == "default":
        return None
    if rope["rope_type"] in ("yarn", "llama3", "longrope"):
        rope.setdefault("original_max_position_embeddings", max_positions)
    return rope


def _phi3_rope_scaling(rope: dict[str, Any], original: Any) -> dict[str, Any]:
    """Phi-3's rope_scaling as transformers' Phi3Config reads it: "su" and "yarn" name LongRoPE, and the
    top-level original_max_position_embeddings wins over one inside."""
    rope = dict(rope)
    if rope.get("rope_type", rope.get("type")) in ("su", "yarn", "longrope"):
        rope.pop("type", None)
        rope["rope_type"] = "longrope"
        if original is not None:
            rope["original_max_position_embeddings"] = original
    return rope


def _validate_rope_scaling(rope: dict[str, Any], rotary_dim: int) -> None:
    kind = rope["rope_type"]
    if kind not in ROPE_TYPES:
        raise ConfigError(f"config field rope_scaling.rope_type {kind!r} is not one of {', '.join(ROPE_TYPES[1:])}")
    factor = rope.get("factor")
    if kind == "longrope":  # its factor is optional: max_position_embeddings / original by default
        _validate_longrope(rope, rotary_dim)
    elif not (isinstance(factor, (int, float)) and not isinstance(factor, bool) and math.isfinite(factor)
              and factor >= 1):
        raise ConfigError(f"config field rope_scaling.factor must be a number >= 1, got {factor!r}")
    if kind == "llama3":
        for name in ("low_freq_factor", "high_freq_factor"):
            if not isinstance(rope.get(name), (int, float)):
                raise ConfigError(f"config field rope_scaling.{name} is required for llama3 scaling")
        if rope["high_freq_factor"] <= rope["low_freq_factor"]:
            raise ConfigError("config field rope_scaling.high_freq_factor must exceed low_freq_factor")
    original = rope.get("original_max_position_embeddings")
    if original is not None and not _positive(original):
        raise ConfigError(f"config field rope_scaling.original_max_position_embeddings must be a positive integer, got {original!r}")


def _validate_longrope(rope: dict[str, Any], rotary_dim: int) -> None:
    """LongRoPE's two lists of per-frequency factors, one per rotated pair of dims."""
    for name in ("long_factor", "short_factor"):
        factors = rope.get(name)
        if not (isinstance(factors, list) and len(factors) == rotary_dim // 2
                and all(isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0 for f in factors)):
            raise ConfigError(f"config field rope_scaling.{name} must list {rotary_dim // 2} positive numbers "
                              "for longrope scaling")
    if rope.get("factor") is not None and not (isinstance(rope["factor"], (int, float)) and rope["factor"] > 0):
        raise ConfigError(f"config field rope_scaling.factor must be a positive number, got {rope['factor']!r}")
