"""Gemma 2 against transformers' Gemma2ForCausalLM on tiny random weights, on both backends: soft-capped attention
scores and logits, sliding layers alternating with global ones, a query scale of its own; the same model
through llama.cpp's converter and arbor's GGUF import; its config's defaults, decode strategies and memory."""

from __future__ import annotations

import dataclasses

import pytest
from tiny_hf import (BACKENDS, TOLERANCE, arbor_logits, gguf_import_of, greedy_through_cache, load_backend, prompt,
                     relative_error, save_tiny_model, transformers_greedy, transformers_logits)

from arbor_core.config import ArborConfig

# four layers, sliding (window 8) and global in turn; caps this small bend every score and logit, so a cap left
# out is visible at once
TINY_GEMMA2 = dict(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=128, sliding_window=8,
                   query_pre_attn_scalar=24, attn_logit_softcapping=2.0, final_logit_softcapping=3.0, pad_token_id=0)
NO_CAPS = dict(attn_logit_softcapping=None, final_logit_softcapping=None)


def arbor_config(**over) -> ArborConfig:
    return ArborConfig(model_type="gemma2", **{k: v for k, v in {**TINY_GEMMA2, **over}.items() if k != "pad_token_id"})


def tiny_gemma2(path, **over):
    transformers = pytest.importorskip("transformers")
    return save_tiny_model(transformers.Gemma2Config(**{**TINY_GEMMA2, **over}), path, norm_offset=True)


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory):
    return tiny_gemma2(tmp_path_factory.mktemp("gemma2"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tiny_gemma2_has_transformers_logits_across_its_windows(gemma2_dir, backend):
    ids = prompt(40)  # five windows long
    ref = transformers_logits(gemma2_dir, ids)
    ours = arbor_logits(gemma2_dir, backend, ids)
    assert relative_error(ours, ref) <= TOLERANCE
    # the caps matter: transformers without them is far from what arbor computed
    assert relative_error(ours, transformers_logits(gemma2_dir, ids, **NO_CAPS)) > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tiny_gemma2_decodes_greedily_as_transformers_through_its_rings(gemma2_dir, backend):
    lm = load_backend(gemma2_dir, backend)
    lm.prefill_chunk = 4
    assert lm.new_cache(64).layer_slots == [8 + 4 - 1, 64] * 2  # a ring for each sliding layer
    ids = prompt(30)
    assert greedy_through_cache(lm, ids, 64, 4, 20) == transformers_greedy(gemma2_dir, ids, 20)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_gemma2_gguf_from_llama_cpps_converter_imports_to_transformers_logits(tmp_path, backend):
    # the converter keeps no query scale (the import takes the published one: head_dim below 27B) and no RoPE base
    # (10,000, Gemma 2's): the tiny model has those
    hf_dir = tiny_gemma2(tmp_path / "hf", query_pre_attn_scalar=16)
    checkpoint = gguf_import_of(hf_dir, 97, tmp_path / "imported")
    config = ArborConfig.from_json_file(checkpoint / "config.json")
    assert (config.model_type, config.attn_logit_softcapping, config.final_logit_softcapping) == ("gemma2", 2.0, 3.0)
    assert config.layer_windows == [8, None, 8, None] and config.query_pre_attn_scalar == 16
    ids = prompt(40)
    ref = transformers_logits(hf_dir, ids)
    assert relative_error(arbor_logits(checkpoint, backend, ids), ref) <= TOLERANCE
    # the config.json the import wrote is one transformers reads the same: it runs the imported model alike
    assert relative_error(transformers_logits(checkpoint, ids), ref) <= TOLERANCE


def test_a_gemma2_config_json_takes_transformers_defaults_for_what_it_leaves_out():
    transformers = pytest.importorskip("transformers")
    given = {k: v for k, v in TINY_GEMMA2.items() if k not in ("attn_logit_softcapping", "final_logit_softcapping",
                                                                 "query_pre_attn_scalar", "pad_token_id")}
    theirs = transformers.Gemma2Config(**given)
    ours = ArborConfig.from_dict({"model_type": "gemma2", **given})
    assert ours.layer_types == theirs.layer_types == ["sliding_attention", "full_attention"] * 2
    assert (ours.attn_logit_softcapping, ours.final_logit_softcapping, ours.query_pre_attn_scalar) == (
        theirs.attn_logit_softcapping, theirs.final_logit_softcapping, theirs.query_pre_attn_scalar)
    assert ours.hidden_act == "gelu_pytorch_tanh" and ours.embedding_multiplier == 48 ** 0.5
    again = ArborConfig.from_dict(dataclasses.replace(ours, **NO_CAPS).to_dict())
    assert again.final_logit_softcapping is None  # a cap turned off stays off (written as null, not left out)


def test_a_gemma2_gguf_config_takes_the_published_query_scale():
    from arbor_weights.gguf_import import config_from_metadata

    def metadata(layers: int, hidden: int, heads: int, head_dim: int) -> dict:
        return {"general.architecture": "gemma2", "gemma2.context_length": 8192, "gemma2.embedding_length": hidden,
                "gemma2.block_count": layers, "gemma2.feed_forward_length": 4 * hidden,
                "gemma2.attention.head_count": heads, "gemma2.attention.head_count_kv": heads // 2,
                "gemma2.attention.key_length": head_dim, "gemma2.attention.sliding_window": 4096,
                "gemma2.attn_logit_softcapping": 50.0, "gemma2.final_logit_softcapping": 30.0}

    small = config_from_metadata(metadata(26, 2304, 8, 256), tie_word_embeddings=True, vocab_size=256000)
    assert small.query_pre_attn_scalar == 256 and small.layer_windows[:4] == [4096, None, 4096, None]
    assert (small.attn_logit_softcapping, small.final_logit_softcapping, small.rope_theta) == (50.0, 30.0, 10000.0)
    big = config_from_metadata(metadata(46, 4608, 32, 128), tie_word_embeddings=True, vocab_size=256000)
    assert big.query_pre_attn_scalar == 144  # 27B: hidden / heads, not head_dim


def test_soft_capped_attention_runs_eager_only():
    pytest.importorskip("torch")
    from arbor_torch.arch import family

    capped = arbor_config()
    assert family(capped).decode_strategies(capped) == {"eager"}  # neither split-KV nor the merged softmax caps
    uncapped = arbor_config(**NO_CAPS)
    assert "cuda_graph" in family(uncapped).decode_strategies(uncapped)


def test_the_planner_counts_windows_for_sliding_layers_and_the_capped_scores():
    from arbor_core.planner import kv_bytes, layer_cache_tokens, prefill_workspace_bytes

    config = arbor_config(max_position_embeddings=8192)
    assert layer_cache_tokens(config, 8192, 512) == [8 + 511, 8192] * 2
    assert kv_bytes(config, 8192, 2, 512) == config.kv_bytes_per_token(2) // 4 * 2 * (519 + 8192)
    uncapped = dataclasses.replace(config, **NO_CAPS)
    extra = prefill_workspace_bytes(config, 8192, 512, 4) - prefill_workspace_bytes(uncapped, 8192, 512, 4)
    assert extra == 3 * 512 * 8192 * 4 * 4  # three float32 copies of (chunk, heads, keys) scores
