"""GGUF -> Arbor checkpoint: rename every tensor to its HF name, keep Q4_0 / Q4_1 / Q8_0 / Q5_0 and
Q4_K / Q5_K / Q6_K matrices as their blocks' codes and scales (quantized.py: the checkpoint stores what
the model runs, losslessly), dequantize the other types arbor reads (FLOAT_TYPES) to float32 and refuse
the rest (IQ*, TQ*, …) with one line before anything is written; with each architecture's fixes for
how llama.cpp stored a tensor (architectures.py: Llama's permuted Q/K rows, Gemma's norms stored as 1 + w).

The config comes from the metadata (config_from_metadata), corrected by what the tensors show;
the vocabulary is rebuilt by gguf_vocab.py.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from arbor_core.chat_template import ChatTemplateError, check_template
from arbor_core.config import ArborConfig
from arbor_core.errors import ConfigError, CorruptModelError, ModelNotFoundError

from . import quantized
from .architectures import NON_WEIGHT_TENSORS, GGUFArchitecture, gguf_architecture
from .checkpoint import write_provenance
from .gguf_vocab import tokenizer_from_gguf
from .progress import Reporter
from .safetensors_file import write_safetensors
from .store import sha256_of_file

GGUF_MAGIC = b"GGUF"
# Bumped when an import of the same GGUF would write a different checkpoint; resolve() re-imports an
# installed one of an older version (1: all float32; 2: Q4_0/Q4_1/Q8_0 kept; 3: Q5_0, Q4_K/Q5_K/Q6_K too).
IMPORT_VERSION = 3
# Types imported as float32 (Q5_1, Q2_K, Q3_K: too rare for a layout of their own); with quantized.KINDS every
# type arbor reads. The others (IQ*, TQ*, MXFP4, …) are refused, not run through a dequantizer we have not checked.
FLOAT_TYPES = ("F32", "F16", "BF16", "Q5_1", "Q2_K", "Q3_K")
READ_TYPES = quantized.KINDS + FLOAT_TYPES


ACCEPTED_MODELS = ("a .gguf model file, a Hugging Face model directory (config.json + safetensors), an Arbor "
                   "model directory, hf:ORG/NAME, or a known model name (`arbor models` lists the installed ones)")


def _not_gguf(path: Path, detail: Any) -> CorruptModelError:
    # The file starts like a GGUF: it is one, cut off or damaged, so fetching it again is the fix.
    return CorruptModelError(
        f"{path} is truncated or not a GGUF file ({detail}); delete it and download it again")


def check_gguf_magic(path: Path) -> None:
    """Fail fast, before hashing or mapping, on a file that is not GGUF at all."""
    if not path.is_file():
        raise ModelNotFoundError(f"no GGUF file at {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic and GGUF_MAGIC.startswith(magic) and magic != GGUF_MAGIC:
        raise _not_gguf(path, f"it ends after {len(magic)} byte(s)")
    if magic != GGUF_MAGIC:
        # Some other kind of file (a text file, a zip, a PyTorch pickle): downloading it again won't help.
        starts = "it is empty" if not magic else f"it starts with {magic!r}, not {GGUF_MAGIC!r}"
        raise CorruptModelError(f"{path} is not a GGUF file ({starts}), so not a model arbor can read; "
                                f"give {ACCEPTED_MODELS}")


def _check_chat_template(tokenizer, path: Path) -> None:
    """Refuse, before any tensor is converted, a model whose chat template hangs, fails or is refused:
    it is rendered on sample conversations under the bounds every chat turn runs under."""
    if tokenizer.chat_template is None:  # a model for plain completion: nothing to check
        return
    try:
        check_template(tokenizer.encode_chat)
    except ChatTemplateError as e:
        raise type(e)(f"{e}; {path.name} was not installed") from None


def open_gguf(path: str | Path):
    """A gguf.GGUFReader over the file (memory-mapped), with damage reported as CorruptModelError."""
    import gguf

    path = Path(path)
    check_gguf_magic(path)
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - the reader indexes past the end of a cut-off file in many different ways
        raise _not_gguf(path, e) from None


def _metadata(reader, path: Path) -> dict[str, Any]:
    try:
        return {name: field.contents() for name, field in reader.fields.items()}
    except Exception as e:  # noqa: BLE001 - a damaged string or array field
        raise _not_gguf(path, e) from None


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The file's key/value metadata as Python values (str, int, float, bool, lists of them)."""
    return _metadata(open_gguf(path), Path(path))


def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight' in a GGUF of `arch`, and the global tensors."""
    return gguf_architecture(arch).hf_name(gguf_name)


def _hf_shape(tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))  # GGUF lists the fastest axis first


def _blocks(tensor, path: Path) -> np.ndarray:
    """A block-quantized tensor's raw bytes, checked to be whole: one row of blocks per output row."""
    import gguf

    rows, columns = _hf_shape(tensor)
    block, size = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
    data = np.asarray(tensor.data).view(np.uint8)
    if data.size != rows * columns // block * size:
        raise _not_gguf(path, f"tensor {tensor.name} holds {data.size} bytes, not {rows}x{columns} of "
                              f"{tensor.tensor_type.name}")
    return data.reshape(rows, -1)


def check_tensor_types(tensors, path: Path) -> None:
    """ConfigError, one line, for the first tensor of a type arbor does not read (READ_TYPES)."""
    for tensor in tensors:
        if tensor.tensor_type.name not in READ_TYPES:
            raise ConfigError(
                f"{path.name}: tensor {tensor.name} is stored as {tensor.tensor_type.name}, which arbor does not "
                f"read; arbor reads GGUF tensors of types {', '.join(READ_TYPES)}: use a file of one of those "
                "quantisations (e.g. Q4_K_M or Q8_0)")


def dequantized(tensor, path: Path) -> np.ndarray:
    """A GGUF tensor as float32, shaped (rows = output features, columns = input features)."""
    from gguf.quants import dequantize

    shape = _hf_shape(tensor)
    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ConfigError(
            f"{path.name}: tensor {tensor.name} is stored as {tensor.tensor_type.name}, which this gguf "
            "package cannot dequantize; upgrade it (pip install -U gguf) or use another quantisation") from None
    try:
        return np.ascontiguousarray(values.reshape(shape), dtype=np.float32)
    except ValueError:
        raise _not_gguf(path, f"tensor {tensor.name} holds {values.size} values, not {shape}") from None


def config_from_metadata(meta: dict[str, Any], *, tie_word_embeddings: bool,
                         vocab_size: int | None = None) -> ArborConfig:
    """ArborConfig from GGUF key/values alone (already decoded to Python values)."""
    arch = gguf_architecture(meta.get("general.architecture"))

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch.name}.{key}", default)

    def need(key: str) -> Any:
        if f"{arch.name}.{key}" not in meta:
            raise ConfigError(f"GGUF metadata is missing {arch.name}.{key}")
        return meta[f"{arch.name}.{key}"]

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    context = int(need("context_length"))
    rope = _rope_scaling(get)
    tokens = meta.get("tokenizer.ggml.tokens")
    rope_dims = get("rope.dimension_count")
    head_dim = int(get("attention.key_length") or (None if arch.rope_dims_partial else rope_dims) or hidden // heads)
    layers = int(need("block_count"))
    return ArborConfig(
        vocab_size=int(vocab_size or get("vocab_size") or len(tokens or [])),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=rope,
        max_position_embeddings=context,
        tie_word_embeddings=tie_word_embeddings,
        attention_bias=arch.attention_bias,
        sliding_window=get("attention.sliding_window") or None,  # Phi-3's converter writes 0 for none
        attn_logit_softcapping=get("attn_logit_softcapping"),
        final_logit_softcapping=get("final_logit_softcapping"),
        partial_rotary_factor=int(rope_dims) / head_dim if rope_dims and int(rope_dims) != head_dim else None,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        model_type=arch.model_type,
        **(arch.published_config(hidden, head_dim, layers) if arch.published_config else {}),
    )


def _rope_scaling(get) -> dict[str, Any] | None:
    """rope_scaling from the metadata's rope.scaling.* (`get` reads a key of the file's architecture)."""
    scaling_type = get("rope.scaling.type")
    if not scaling_type or scaling_type == "none":
        return None
    rope = {"rope_type": {"linear": "linear", "yarn": "yarn"}.get(scaling_type, scaling_type),
            "factor": float(get("rope.scaling.factor", 1.0))}
    original = get("rope.scaling.original_context_length")
    if original:
        rope["original_max_position_embeddings"] = int(original)
    return rope


def config_from_gguf(meta: dict[str, Any], tensors: dict[str, Any]) -> ArborConfig:
    """ArborConfig from the metadata, corrected by what the tensors themselves show."""
    config = config_from_metadata(
        meta, tie_word_embeddings="output.weight" not in tensors,
        vocab_size=int(tensors["token_embd.weight"].shape[1]))
    q_bias, o_bias = "blk.0.attn_q.bias" in tensors, "blk.0.attn_output.bias" in tensors
    if (q_bias, o_bias) != (config.attention_bias, config.attention_out_bias):
        config = dataclasses.replace(config, attention_bias=q_bias, attention_out_bias=o_bias)
    if "rope_freqs.weight" in tensors and config.rope_scaling is None:
        factors = tensors["rope_freqs.weight"].data.astype(np.float32)
        config = config.with_rope_scaling(llama3_scaling_from_rope_freqs(factors, config))
    if "rope_factors_long.weight" in tensors:
        config = config.with_rope_scaling(longrope_scaling(meta, tensors))
    return config


def longrope_scaling(meta: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    """Phi-3's LongRoPE rope_scaling from what llama.cpp's converter stores instead: its long and short factor
    lists as the tensors rope_factors_long / rope_factors_short, the original context and the attention factor
    (which the converter computed from the context lengths) as metadata."""
    def key(name: str) -> Any:
        return meta.get(f"{meta['general.architecture']}.{name}")

    if "rope_factors_short.weight" not in tensors or not key("rope.scaling.original_context_length"):
        raise ConfigError("this GGUF stores RoPE long factors without the short ones or its original context; "
                          "arbor cannot recover its LongRoPE scaling: use the original HF checkpoint")
    scaling = {"rope_type": "longrope",
               "original_max_position_embeddings": int(key("rope.scaling.original_context_length")),
               **{f"{kind}_factor": tensors[f"rope_factors_{kind}.weight"].data.astype(np.float32).tolist()
                  for kind in ("long", "short")}}
    if key("rope.scaling.attn_factor") is not None:
        scaling["attention_factor"] = float(key("rope.scaling.attn_factor"))
    return scaling


def llama3_scaling_from_rope_freqs(factors: np.ndarray, config: ArborConfig) -> dict[str, Any]:
    """Recover Llama 3.x `rope_scaling` from the per-frequency factors llama.cpp stores instead.

    llama.cpp's converter computes the factors from (factor, low_freq_factor, high_freq_factor,
    original context); every Llama 3.1-3.3 release uses 1, 4 and 8192 with factor = the largest
    entry, so we recompute the table from those values and accept them only if it matches.
    """
    candidate = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if np.allclose(_llama3_factors(candidate, config.head_dim, config.rope_theta), factors, rtol=1e-4):
        return candidate
    raise ConfigError("this GGUF stores RoPE frequency factors (rope_freqs) that are not Llama 3's; "
                      "arbor cannot recover its rope_scaling: use the original HF checkpoint")


def _llama3_factors(rope: dict[str, Any], head_dim: int, theta: float) -> np.ndarray:
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    original = rope["original_max_position_embeddings"]
    low, high, factor = rope["low_freq_factor"], rope["high_freq_factor"], rope["factor"]
    wavelen = 2 * math.pi / freqs
    smooth = (original / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, blended))


def _check_complete(config: ArborConfig, names: set[str], path: Path, arch: GGUFArchitecture) -> None:
    required = ["model.embed_tokens.weight", "model.norm.weight"]
    required += [] if config.tie_word_embeddings else ["lm_head.weight"]
    for i in range(config.num_hidden_layers):
        required += [f"model.layers.{i}.{weight}" for weight in arch.layer_weights()]
    missing = [n for n in required if n not in names]
    if missing:
        raise CorruptModelError(f"{path} lacks {len(missing)} tensor(s) a {config.num_hidden_layers}-layer model "
                                f"needs (first: {missing[0]}); download it again")


def _layout(by_hf_name: dict[str, Any]) -> tuple[list[tuple[str, tuple[int, ...], str]], dict[str, int]]:
    """The checkpoint's entries (name, shape, dtype) in order, and how many tensors of each kind stay blocks."""
    layout, counts = [], {}
    for name, tensor in by_hf_name.items():
        shape, kind = _hf_shape(tensor), tensor.tensor_type.name
        if quantized.keeps_quantized(kind, shape):
            base = name.removesuffix(".weight")
            layout += [(f"{base}.{suffix}", entry_shape, dtype)
                       for suffix, (entry_shape, dtype) in quantized.entry_layout(kind, shape).items()]
            counts[kind] = counts.get(kind, 0) + 1
        else:
            layout.append((name, shape, "float32"))
    return layout, counts


def _entry_reader(by_hf_name: dict[str, Any], arch: GGUFArchitecture, config: ArborConfig, path: Path):
    """entry(name) -> the values of one checkpoint entry, read from the GGUF as write_safetensors asks for it."""
    current: dict[str, dict[str, np.ndarray]] = {}  # base -> entries of the one tensor being written

    def entry(name: str) -> np.ndarray:
        if name in by_hf_name:
            tensor = by_hf_name[name]
            return arch.float_weight(name, arch.rows_in_hf_order(tensor.name, dequantized(tensor, path), config))
        base, _, suffix = name.rpartition(".")
        if base not in current:
            tensor = by_hf_name[f"{base}.weight"]
            blocks = quantized.from_gguf_blocks(_blocks(tensor, path), tensor.tensor_type.name, _hf_shape(tensor))
            current.clear()
            current[base] = {s: arch.rows_in_hf_order(tensor.name, a, config) for s, a in blocks.items()}
        return current[base][suffix]

    return entry


def convert_gguf(gguf_path: str | Path, dest_dir: str | Path, *, reporter: Reporter,
                 source: str | None = None, sha256: str | None = None) -> None:
    """Write config.json, model.safetensors, tokenizer files and arbor.json into dest_dir."""
    path, dest = Path(gguf_path).absolute(), Path(dest_dir)
    with reporter.stage(f"reading {path.name}"):  # seconds for a large vocabulary: show that we are alive
        reader = open_gguf(path)
        meta = _metadata(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    check_tensor_types(tensors.values(), path)
    if "token_embd.weight" not in tensors:
        raise CorruptModelError(f"{path} has no token_embd.weight tensor, so it is not a language model GGUF")
    config = config_from_gguf(meta, tensors)
    arch = gguf_architecture(meta.get("general.architecture"))
    by_hf_name = {arch.hf_name(n): t for n, t in tensors.items() if n not in NON_WEIGHT_TENSORS}
    _check_complete(config, set(by_hf_name), path, arch)
    tokenizer = tokenizer_from_gguf(meta, name=path.name)
    _check_chat_template(tokenizer, path)

    layout, counts = _layout(by_hf_name)
    if (record := quantized.quantization_record(counts)) is not None:
        config = dataclasses.replace(config, extra={**config.extra, "quantization": record})
    dest.mkdir(parents=True, exist_ok=True)
    with reporter.stage(f"converting {path.name}", total=len(layout)) as advance:
        write_safetensors(dest / "model.safetensors", layout, _entry_reader(by_hf_name, arch, config, path), advance)
    config.save(dest / "config.json")
    tokenizer.save(dest)
    # Size and mtime let a later resolve() of the same path skip re-hashing a multi-GB file.
    stat = path.stat()
    write_provenance(dest, source=source or f"gguf:{path}", sha256=sha256 or sha256_of_file(path),
                     source_size=stat.st_size, source_mtime_ns=stat.st_mtime_ns, import_version=IMPORT_VERSION)


def import_gguf(gguf_path: str | Path, dest_dir: str | Path, *, quiet: bool = False) -> None:
    """Convert a .gguf file into a complete Arbor checkpoint in dest_dir (created if needed)."""
    convert_gguf(gguf_path, dest_dir, reporter=Reporter(quiet=quiet))
