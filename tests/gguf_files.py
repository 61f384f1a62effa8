"""Tiny GGUF files written the way llama.cpp's converter writes them, for the arbor_weights tests.

Synthetic GGUFs are written with gguf.GGUFWriter exactly as llama.cpp's converter would write
them (Q/K rows permuted by its own `permute`), so un-permuting is checked against the original
matrices.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from arbor_weights import architectures, gguf_import, quantized

Q = gguf.GGMLQuantizationType
HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 256, 4, 2, 256, 2  # 256 columns: whole K-quant blocks
HEAD_DIM = HIDDEN // HEADS


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim: the oracle we must invert."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gpt2_byte_symbols() -> list[str]:
    """GPT-2's bytes_to_unicode(): printable bytes stand for themselves, the rest map above U+0100."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted, extra = {}, 0
    for b in range(256):
        if b not in printable:
            shifted[b] = 256 + extra
            extra += 1
    return [chr(b if b in printable else shifted[b]) for b in range(256)]


def tiny_tokenizer_metadata(writer: gguf.GGUFWriter) -> int:
    """A byte-level BPE vocabulary (GPT-2 style): special tokens, the 256 byte symbols, one merge."""
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + gpt2_byte_symbols() + ["he"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["h e"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    return len(tokens)


def hf_weights(vocab: int, *, tied: bool, bias: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Random HF-named Llama weights (q/k in HF order, as a HF checkpoint holds them)."""
    rng = np.random.default_rng(seed)
    w = {"model.embed_tokens.weight": rng.standard_normal((vocab, HIDDEN)), "model.norm.weight": rng.random(HIDDEN)}
    if not tied:
        w["lm_head.weight"] = rng.standard_normal((vocab, HIDDEN))
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = rng.standard_normal((HEADS * HEAD_DIM, HIDDEN))
        w[p + "self_attn.k_proj.weight"] = rng.standard_normal((KV_HEADS * HEAD_DIM, HIDDEN))
        w[p + "self_attn.v_proj.weight"] = rng.standard_normal((KV_HEADS * HEAD_DIM, HIDDEN))
        w[p + "self_attn.o_proj.weight"] = rng.standard_normal((HIDDEN, HEADS * HEAD_DIM))
        w[p + "mlp.gate_proj.weight"] = rng.standard_normal((FFN, HIDDEN))
        w[p + "mlp.up_proj.weight"] = rng.standard_normal((FFN, HIDDEN))
        w[p + "mlp.down_proj.weight"] = rng.standard_normal((HIDDEN, FFN))
        w[p + "input_layernorm.weight"] = rng.random(HIDDEN)
        w[p + "post_attention_layernorm.weight"] = rng.random(HIDDEN)
        if bias:
            w[p + "self_attn.q_proj.bias"] = rng.standard_normal(HEADS * HEAD_DIM)
            w[p + "self_attn.k_proj.bias"] = rng.standard_normal(KV_HEADS * HEAD_DIM)
            w[p + "self_attn.v_proj.bias"] = rng.standard_normal(KV_HEADS * HEAD_DIM)
    return {k: v.astype(np.float32) for k, v in w.items()}


GGUF_NAMES = {v: k for k, v in architectures.LLAMA_LAYER_TENSORS.items()}


def gguf_name(hf_name: str) -> str:
    if hf_name.startswith("model.layers."):
        _, _, layer, *part, kind = hf_name.split(".")
        return f"blk.{layer}.{GGUF_NAMES['.'.join(part)]}.{kind}"
    stem, kind = hf_name.rsplit(".", 1)
    return {v: k for k, v in architectures.GLOBAL_TENSORS.items()}[stem] + "." + kind


# gguf can dequantize K-quants but not produce them, so those tests store random blocks; only the
# float16 super-block scales (at these byte offsets in each block) are pinned, to stay finite.
K_QUANT_SCALE_OFFSETS = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
# types arbor refuses, written as random blocks the same way (their float16 d pinned) to see the refusal
REFUSED_SCALE_OFFSETS = {Q.IQ4_NL: (0,), Q.IQ2_XXS: (0,), Q.TQ2_0: (64,)}


def random_k_quant_blocks(kind, shape, seed, d: float = 0.01) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[kind]
    rows, blocks = shape[0], shape[1] // block
    data = np.random.default_rng(seed).integers(0, 256, (rows, blocks, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(d).tobytes(), dtype=np.uint8)
    for offset in {**K_QUANT_SCALE_OFFSETS, **REFUSED_SCALE_OFFSETS}[kind]:
        data[:, :, offset:offset + 2] = scale
    return data.reshape(rows, blocks * size)


def write_tiny_gguf(path: Path, *, qtype=Q.F32, arch="llama", tied=True, bias=False, extra=None, seed=0,
                    chat_template: str | None = None, kinds: dict | None = None, scale: float = 1.0,
                    name: str | None = None, file_type: int | None = None):
    """A tiny GGUF written the way convert_hf_to_gguf.py writes one. Returns (HF weights, stored
    GGUF arrays): matrices in `qtype` (norms and biases stay F32, as llama.cpp keeps them), or in
    kinds[part] for a matrix whose HF name contains `part` (a mix, as Q4_K_M files are); with
    `chat_template`, the file carries it as tokenizer.chat_template. `scale` multiplies the matrices (and a
    K-quant's pinned d): 0.02 gives weights of a real model's size, whose logits do not blow up. `name` and
    `file_type`: general.name and general.file_type, as a published file carries them."""
    writer = gguf.GGUFWriter(str(path), arch)
    if name is not None:
        writer.add_name(name)
    if file_type is not None:
        writer.add_file_type(file_type)
    writer.add_block_count(LAYERS)
    writer.add_context_length(512)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_dimension_count(HEAD_DIM)
    vocab = tiny_tokenizer_metadata(writer)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    weights = {name: w * np.float32(scale) if w.ndim == 2 else w
               for name, w in hf_weights(vocab, tied=tied, bias=bias, seed=seed).items()}
    stored = {}
    for hf, w in weights.items():
        if arch == "llama" and ".q_proj." in hf:
            w = llama_cpp_permute(w, HEADS, HEADS)
        elif arch == "llama" and ".k_proj." in hf:
            w = llama_cpp_permute(w, HEADS, KV_HEADS)
        kind = next((k for part, k in (kinds or {}).items() if part in hf), qtype) if w.ndim == 2 else Q.F32
        if kind in K_QUANT_SCALE_OFFSETS or kind in REFUSED_SCALE_OFFSETS:
            data = random_k_quant_blocks(kind, w.shape, seed=len(stored), d=0.01 * scale)
        else:
            data = gguf.quants.quantize(w, kind)
        writer.add_tensor(gguf_name(hf), data, raw_dtype=kind)
        stored[hf] = gguf.quants.dequantize(data, kind).reshape(w.shape).astype(np.float32)
    for name, array in (extra or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights, stored


def count_conversions(monkeypatch) -> list:
    calls = []
    real = gguf_import.convert_gguf

    def counting(*args, **kwargs):
        calls.append(args[0])
        time.sleep(0.2)  # widen the window in which a second puller could start its own conversion
        return real(*args, **kwargs)

    monkeypatch.setattr(gguf_import, "convert_gguf", counting)
    return calls


# byte offsets of each kept type's float16 block constants (d, and dmin / m): random bytes elsewhere
KEPT_CONSTANTS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q8_0": (0,), "Q5_0": (0,), "Q4_K": (0, 2), "Q5_K": (0, 2),
                  "Q6_K": (208,)}


def random_kept_blocks(kind: str, rows: int, blocks: int, seed: int = 0) -> np.ndarray:
    """Raw blocks of a type arbor keeps as codes: every code and sub-scale pattern, not only those a quantizer
    writes; the float16 constants finite and of both signs (NaN bit patterns could differ without the values
    differing). uint8 [rows, blocks * bytes]."""
    rng = np.random.default_rng(seed)
    size = quantized.BLOCK_BYTES[kind][1]
    data = rng.integers(0, 256, (rows, blocks, size), dtype=np.uint8)
    for offset in KEPT_CONSTANTS[kind]:
        data[..., offset:offset + 2] = rng.uniform(-4, 4, (rows, blocks, 1)).astype(np.float16).view(np.uint8)
    return data.reshape(rows, -1)


# The real Qwen GGUFs of the registry (issue 26), found on this machine, never downloaded by the tests
GGUF_DIR_ENV = "ARBOR_GGUF_DIR"
REAL_FILES = {"qwen2.5-coder-0.5b-instruct": 491_400_064, "qwen2.5-coder-1.5b-instruct": 1_117_320_768}


def real_gguf(name: str) -> Path:
    """The registry model's GGUF: in $ARBOR_GGUF_DIR (any .gguf of its exact size), or left in the
    download directory by a pull; else the calling test is skipped."""
    from arbor_weights import cache_dir
    from arbor_weights.registry import KNOWN_MODELS

    places = [cache_dir() / "downloads" / KNOWN_MODELS[name].filename]
    if os.environ.get(GGUF_DIR_ENV):
        places += sorted(Path(os.environ[GGUF_DIR_ENV]).expanduser().glob("*.gguf"))
    for path in places:
        if path.is_file() and path.stat().st_size == REAL_FILES[name]:
            return path
    pytest.skip(f"{name}'s GGUF is not here (CI does not download 1.6 GB): set {GGUF_DIR_ENV} to a directory "
                "holding it")
