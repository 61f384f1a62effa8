"""Tiny random models built by transformers itself, the reference an architecture is proved against.

A tiny model is transformers' own `<Family>ForCausalLM` of a small config, its weights drawn again at a scale
that makes every part of the block matter (transformers' 0.02 init leaves the logits near zero), saved with
`save_pretrained`: a Hugging Face directory, which arbor opens as a checkpoint as it is. The same directory,
given a SentencePiece tokenizer, is what llama.cpp's converter turns into the GGUF the import tests read.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

BACKENDS = [
    pytest.param("torch", marks=pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                                   reason="torch not installed")),
    pytest.param("mlx", marks=pytest.mark.skipif(importlib.util.find_spec("mlx") is None, reason="mlx not installed")),
]
TOLERANCE = 1e-4  # max |diff| / max |logit|, float32 on the CPU


def save_tiny_model(config, path: Path, seed: int = 0, norm_offset: bool = False) -> Path:
    """transformers' model of `config` with weights N(0, 0.2) (RMSNorm weights 1 + N(0, 0.2), or N(0, 0.2) for
    `norm_offset` models such as Gemma, whose norms multiply by 1 + w), saved to `path`."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            values = torch.randn(parameter.shape, generator=generator) * 0.2
            parameter.copy_(values + (1.0 if name.endswith("norm.weight") and not norm_offset else 0.0))
    model.save_pretrained(path)
    return path


def prompt(n: int, seed: int = 1, vocab: int = 97) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab, n).tolist()


def transformers_model(path: Path, **config_overrides):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                             **config_overrides).eval()


def transformers_logits(path: Path, ids: list[int], **config_overrides) -> np.ndarray:
    import torch

    with torch.no_grad():
        return transformers_model(path, **config_overrides)(torch.tensor([ids])).logits[0].numpy()


def load_backend(path: Path, backend: str):
    """The checkpoint at `path` on the CPU in float32, straight from the backend (no tokenizer needed)."""
    from arbor_weights.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(path)
    if backend == "mlx":
        import arbor_mlx

        return arbor_mlx.load(checkpoint, device="cpu", dtype="float32")
    import arbor_torch

    return arbor_torch.load(checkpoint, device="cpu", dtype="float32")


def arbor_logits(path: Path, backend: str, ids: list[int], context: int | None = None) -> np.ndarray:
    """Logits of every position of `ids`, the RoPE tables those of a `context` (default: len(ids)) context."""
    from arbor_core.rope import rope_frequencies

    lm = load_backend(path, backend)
    return np.array(lm.logits(ids, rope_frequencies(lm.config, context or len(ids))), dtype=np.float32)


def relative_error(ours, ref) -> float:
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def as_numpy(row) -> np.ndarray:
    return np.array(row.tolist() if hasattr(row, "tolist") else row, dtype=np.float32).reshape(-1)


def greedy_through_cache(lm, ids: list[int], capacity: int, chunk: int, steps: int) -> list[int]:
    """Greedy tokens after `ids` prefilled in chunks of `chunk` into a cache of `capacity` (its RoPE that
    context's), then one decode step each."""
    from arbor_core.rope import rope_frequencies

    cache = lm.new_cache(capacity, rope_frequencies(lm.config, capacity))
    logits, tokens = lm.prefill(ids, cache, chunk_size=chunk), []
    for _ in range(steps):
        tokens.append(int(as_numpy(logits).argmax()))
        logits = lm.decode(tokens[-1], cache)
    return tokens


def transformers_greedy(path: Path, ids: list[int], steps: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = transformers_model(path).generate(torch.tensor([ids]), max_new_tokens=steps, min_new_tokens=steps,
                                                do_sample=False)
    return out[0, len(ids):].tolist()


def gguf_import_of(hf_dir: Path, vocab_size: int, dest: Path, outtype: str = "f32") -> Path:
    """hf_dir converted by llama.cpp's convert_hf_to_gguf.py to `outtype` (given a trained SentencePiece tokenizer
    of `vocab_size` pieces, written once), then imported by arbor into `dest`: the Arbor checkpoint's path."""
    from llama_cpp_convert import convert_hf_to_gguf, write_sentencepiece_tokenizer

    from arbor_weights.gguf_import import import_gguf

    if not (hf_dir / "tokenizer.model").is_file():
        write_sentencepiece_tokenizer(hf_dir, vocab_size)
    gguf = convert_hf_to_gguf(hf_dir, dest.with_suffix(".gguf"), outtype)
    import_gguf(gguf, dest, quiet=True)
    return dest
