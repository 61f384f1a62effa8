"""Rotary position embeddings: inverse frequencies and attention factor, computed once in numpy.

Semantics follow Hugging Face transformers' `modeling_rope_utils` for the same config.json, so a
checkpoint with `rope_scaling` behaves identically in arbor:

- default:  inv_freq[i] = 1 / theta^(2i/d)
- linear:   Position Interpolation (Chen et al. 2023): positions divided by `factor`
- dynamic:  NTK-aware scaling whose base grows with the sequence length once it passes the trained
            length (bloc97 / emozilla); below the trained length it is the default RoPE
- yarn:     NTK-by-parts interpolation plus an attention temperature (Peng et al. 2023)
- llama3:   Llama 3.1's wavelength-banded interpolation
- longrope: LongRoPE (Phi-3): a searched factor per frequency, the long list when the context passes
            the original length, the short one within it, and the attention factor
            sqrt(1 + ln(max / original) / ln(original))

A partial_rotary_factor < 1 (Phi-4-mini) rotates only the first rotary_dim dims of each head.

Backends turn (inv_freq, attention_factor) into cos/sin tables: angle = position * inv_freq in
float32, cos/sin multiplied by attention_factor (as transformers does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import ArborConfig
from .errors import UsageError
from .number_input import parse_number


@dataclass(frozen=True)
class RopeTables:
    inv_freq: np.ndarray  # float32 [rotary_dim // 2]
    attention_factor: float
    rope_type: str
    seq_len: int  # the sequence length the frequencies were computed for (matters for dynamic and longrope)


def rope_frequencies(config: ArborConfig, seq_len: int | None = None) -> RopeTables:
    """Inverse frequencies for `config`, for sequences up to `seq_len` tokens.

    `seq_len` (default: max_position_embeddings) only changes the result for dynamic NTK scaling, whose
    base depends on the length of the sequence being processed, and for LongRoPE, whose factors do.
    """
    dim, base, rope = config.rotary_dim, float(config.rope_theta), config.rope_scaling or {}
    kind = config.rope_type
    seq_len = int(seq_len or config.max_position_embeddings)
    attention_factor = 1.0
    if kind == "default":
        inv_freq = _default_inv_freq(base, dim)
    elif kind == "linear":
        inv_freq = _default_inv_freq(base, dim) / float(rope["factor"])
    elif kind == "dynamic":
        inv_freq = _dynamic_inv_freq(base, dim, float(rope["factor"]), config.max_position_embeddings, seq_len)
    elif kind == "yarn":
        inv_freq, attention_factor = _yarn(base, dim, rope, config.max_position_embeddings)
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(base, dim, rope)
    elif kind == "longrope":
        inv_freq, attention_factor = _longrope(base, dim, rope, config.max_position_embeddings, seq_len)
    else:  # ArborConfig.validate rejects anything else
        raise ValueError(f"unknown rope type {kind!r}")
    return RopeTables(inv_freq.astype(np.float32), float(attention_factor), kind, seq_len)


def _default_inv_freq(base: float, dim: int) -> np.ndarray:
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / np.power(np.float32(base), exponents)).astype(np.float32)


def _dynamic_inv_freq(base: float, dim: int, factor: float, max_positions: int, seq_len: int) -> np.ndarray:
    seq_len = max(seq_len, max_positions)
    grown_base = base * ((factor * seq_len / max_positions) - (factor - 1)) ** (dim / (dim - 2))
    return _default_inv_freq(grown_base, dim)


def _yarn(base: float, dim: int, rope: dict, max_positions: int) -> tuple[np.ndarray, float]:
    factor = rope.get("factor")
    original = int(rope.get("original_max_position_embeddings") or max_positions)
    if factor is None:
        factor = max_positions / original
    factor = float(factor)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        if rope.get("mscale") and rope.get("mscale_all_dim"):
            attention_factor = mscale(factor, rope["mscale"]) / mscale(factor, rope["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast = rope.get("beta_fast") or 32
    beta_slow = rope.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # the dimension whose wavelength fits `rotations` times into the original context
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation_weight = 1 - ramp
    pos_freqs = np.power(np.float32(base), np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    extrapolated = np.float32(1.0) / pos_freqs
    interpolated = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    inv_freq = interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight
    return inv_freq, float(attention_factor)


def _llama3_inv_freq(base: float, dim: int, rope: dict) -> np.ndarray:
    inv_freq = _default_inv_freq(base, dim)
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    original = float(rope["original_max_position_embeddings"])
    low_freq_wavelen, high_freq_wavelen = original / low, original / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _longrope(base: float, dim: int, rope: dict, max_positions: int, seq_len: int) -> tuple[np.ndarray, float]:
    """transformers' _compute_longrope_parameters: the factor defaults to max_positions / original (Phi-3 sets
    no factor), and the whole sequence rotates with the long factors once it is longer than the original."""
    original = int(rope["original_max_position_embeddings"])
    factor = rope.get("factor")
    if factor is None:
        factor = max_positions / original
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    factors = np.asarray(rope["long_factor" if seq_len > original else "short_factor"], dtype=np.float32)
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return np.float32(1.0) / (factors * np.power(np.float32(base), exponents)), float(attention_factor)


# RoPE types whose tables depend on the context they run at (rope_frequencies' seq_len), not only on the config
CONTEXT_DEPENDENT = ("dynamic", "longrope")


METHODS = ("none", "linear", "dynamic", "yarn", "llama3")
AUTO_METHOD = "yarn"  # what "auto" runs beyond the trained context: measured best untuned (docs/long-context.md)


def resolve_method(method: str) -> str:
    """'auto' -> AUTO_METHOD; a known method unchanged; anything else a ValueError naming the choices."""
    method = (method or "auto").lower()
    if method == "auto":
        return AUTO_METHOD
    if method not in METHODS:
        raise ValueError(f"--rope must be auto or one of {', '.join(METHODS)}, got {method!r}")
    return method


def scaling_for_context(config: ArborConfig, context: int, method: str = "auto") -> dict | None:
    """The rope_scaling to use when running `config` at `context` tokens.

    The model's own rope_scaling wins when it has one (it was trained or tuned for it). Otherwise,
    within the trained context no scaling is needed; beyond it, `method` (auto: AUTO_METHOD) with
    factor context / trained.
    """
    if config.rope_scaling:
        return config.rope_scaling
    method = resolve_method(method)
    trained = config.trained_context
    if context <= trained or method == "none":
        return None
    return _scaling(method, context / trained, trained)


def parse_scaling(spec: str | None, trained: int) -> dict | None:
    """'yarn:4' / 'linear:2' (`arbor train --rope`) -> the rope_scaling dict (YaRN keeps the trained
    length as original); None for no spec."""
    if not spec:
        return None
    method, _, factor = spec.partition(":")
    try:
        if method not in ("yarn", "linear"):
            raise UsageError(method)
        value = parse_number(factor, "--rope", float, above=1)  # never NaN or infinite
    except UsageError:
        raise UsageError(f"--rope takes linear:F or yarn:F with a factor F > 1, got {spec!r}") from None
    return _scaling(method, value, trained)


def _scaling(method: str, factor: float, trained: int) -> dict:
    """The rope_scaling of `method` stretching a model trained on `trained` tokens `factor` times."""
    scaling = {"rope_type": method, "factor": factor}
    if method in ("yarn", "llama3"):
        scaling["original_max_position_embeddings"] = trained
    if method == "llama3":
        scaling.update(low_freq_factor=1.0, high_freq_factor=4.0)
    return scaling


def method_for_context(config: ArborConfig, context: int, requested: str = "auto") -> str:
    """The method that runs at `context`: under 'auto', plain RoPE ('none') within the trained
    context and AUTO_METHOD beyond it; an explicit method as asked."""
    if (requested or "auto").lower() != "auto":
        return resolve_method(requested)
    return "none" if context <= config.trained_context else AUTO_METHOD


def describe_scaling(config: ArborConfig, context: int, method: str) -> str:
    """What runs at `context`: 'none' (plain RoPE), 'yarn x2', or the checkpoint's own scaling."""
    scaling = scaling_for_context(config, context, method)
    if not scaling:
        return "none"
    kind = scaling.get("rope_type", "?")
    if config.rope_scaling:
        return f"{kind} (checkpoint)"
    return f"{kind} x{float(scaling.get('factor', 1.0)):g}"


def local_rope(config: ArborConfig) -> RopeTables:
    """The RoPE of Gemma 3's sliding-window layers: base rope_local_base_freq, never scaled (transformers'
    rotary_emb_local)."""
    import dataclasses

    return rope_frequencies(dataclasses.replace(config, rope_theta=config.rope_local_base_freq, rope_scaling=None))
