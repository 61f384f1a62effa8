"""Tiny random models of any architecture built by transformers itself and saved with save_pretrained.

A new architecture is proved against the code no one here wrote: transformers' own model class makes the
weights (their names and shapes) and the config.json, and the directory it saves is a Hugging Face model
directory, which arbor opens as it is. Every weight is drawn N(0, 0.2) and every RMSNorm weight 1 + N(0, 0.2)
(transformers' init leaves norms at exactly 1, which would hide a norm read wrongly, or not at all).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

# 4 layers (SmolLM3's default puts its one NoPE layer last), grouped-query attention; vocab 97 as the
# backend contract's random ids expect; no special ids (SmolLM3's defaults are outside the vocabulary, and an
# end-of-sequence id would stop, or with min_new_tokens bend, transformers' greedy generation)
TINY = dict(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)


def save_tiny_model(path: Path, model_type: str, seed: int = 0, **config):
    """transformers' random `model_type` model of TINY's shape (`config` overrides), saved into `path`;
    returns the model (float32, eval mode) as the reference."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    # a copy: transformers' config classes write into the dicts they are given (rope_scaling gains rope_theta)
    hf_config = transformers.AutoConfig.for_model(model_type, **copy.deepcopy({**TINY, **config}))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            weight.normal_(1.0 if name.endswith("norm.weight") else 0.0, 0.2)
    model.save_pretrained(path)
    return model.eval()


def tiny_transformers_checkpoint(directory: Path, **config):
    """save_tiny_model into a fresh folder of `directory`, opened as arbor opens a model directory."""
    from arbor_weights.checkpoint import open_checkpoint

    path = directory / f"hf{len(list(directory.iterdir()))}"
    save_tiny_model(path, **config)
    return open_checkpoint(path)
