"""Tiny random HF checkpoints: arbor's logits equal transformers' for every RoPE scaling type,
at positions beyond the trained (original) context, and for Qwen2 (biases) and Mistral (sliding window)."""

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import arbor_torch  # noqa: E402
import arbor_weights  # noqa: E402
from arbor_cli.model import Model  # noqa: E402

TRAINED = 48
SEQ = 160  # > 3x the trained context
SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": TRAINED},
    "yarn-betas": {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": TRAINED,
                   "beta_fast": 16, "beta_slow": 2, "attention_factor": 1.2},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": TRAINED,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0},
}


def tiny_kwargs(**over):
    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=TRAINED, rope_theta=50.0, tie_word_embeddings=False)
    kw.update(over)
    return kw


def save_random(cls_name, config_cls, path, **kw):
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(getattr(transformers, config_cls)(**kw)).eval()
    with torch.no_grad():  # random norms too, so a dropped weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, safe_serialization=True)
    return model


def arbor_logits(path, ids):
    checkpoint = arbor_weights.open_checkpoint(path)
    lm = arbor_torch.load(checkpoint, "cpu", "float32")
    # rope_method "none": no automatic scaling beyond the trained length, as transformers does
    return Model(checkpoint, lm, tokenizer=None, backend="torch", rope_method="none").logits(ids)


def rel_error(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name", list(SCALINGS))
def test_rope_scaling_matches_transformers_beyond_trained_context(tmp_path, name):
    kw = tiny_kwargs(rope_scaling=SCALINGS[name]) if SCALINGS[name] else tiny_kwargs()
    ref = save_random("LlamaForCausalLM", "LlamaConfig", tmp_path, **kw)
    ids = torch.randint(0, 256, (SEQ,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].numpy()
    got = arbor_logits(tmp_path, ids)
    assert got.shape == expected.shape
    assert rel_error(got, expected) <= 1e-4


def test_scaling_changes_logits_so_the_parity_test_can_fail(tmp_path):
    plain = save_random("LlamaForCausalLM", "LlamaConfig", tmp_path / "a", **tiny_kwargs())
    ids = list(range(SEQ))
    with torch.no_grad():
        expected = plain(torch.tensor([ids])).logits[0].numpy()
    save_random("LlamaForCausalLM", "LlamaConfig", tmp_path / "b", **tiny_kwargs(rope_scaling=SCALINGS["yarn"]))
    assert rel_error(arbor_logits(tmp_path / "b", ids), expected) > 1e-3  # 10x the tolerance


def test_qwen2_attention_bias_matches_transformers(tmp_path):
    ref = save_random("Qwen2ForCausalLM", "Qwen2Config", tmp_path, **tiny_kwargs(tie_word_embeddings=True))
    ids = list(range(3, 3 + 64))
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].numpy()
    assert rel_error(arbor_logits(tmp_path, ids), expected) <= 1e-4


def test_mistral_sliding_window_matches_transformers(tmp_path):
    ref = save_random("MistralForCausalLM", "MistralConfig", tmp_path, **tiny_kwargs(sliding_window=16))
    ref.config._attn_implementation = "eager"
    ids = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].numpy()
    assert rel_error(arbor_logits(tmp_path, ids), expected) <= 1e-4


def test_mistral_rolling_cache_matches_transformers_in_chunked_prefill_and_greedy_decode(tmp_path):
    """Window 16, 80 tokens, prefill chunks of 7: the ring holds 16 + 7 - 1 = 22 positions and wraps
    several times; every position's logits and a 40-token greedy continuation match transformers."""
    from arbor_core.rope import rope_frequencies

    window, chunk, prompt, total = 16, 7, 40, 80
    ref = save_random("MistralForCausalLM", "MistralConfig", tmp_path, **tiny_kwargs(sliding_window=window))
    ref.config._attn_implementation = "eager"
    ids = torch.randint(0, 256, (total,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].numpy()
    checkpoint = arbor_weights.open_checkpoint(tmp_path)
    lm = arbor_torch.load(checkpoint, "cpu", "float32")
    lm.prefill_chunk = chunk  # sizes the ring
    lm.set_rope(rope_frequencies(checkpoint.config, 128), 128)  # plain RoPE, as transformers runs it here
    cache = lm.new_cache(128)
    assert (cache.slots, cache.max_chunk) == (window + chunk - 1, chunk)
    bytes_before, rows = cache.nbytes, []
    with torch.inference_mode():
        for begin in range(0, total, chunk):
            part = ids[begin:begin + chunk]
            rows.append(lm.model(torch.tensor([part]), cache.length, cache.layers)[0].numpy())
            cache.length += len(part)
    assert rel_error(np.concatenate(rows), expected) <= 1e-4
    assert cache.nbytes == bytes_before

    # greedy: transformers' full forward picks each next token; arbor decodes through the ring
    hf_tokens = ids[:prompt]
    with torch.no_grad():
        for _ in range(total - prompt):
            hf_tokens.append(int(ref(torch.tensor([hf_tokens])).logits[0, -1].argmax()))
    cache.truncate(0)
    logits = lm.prefill(ids[:prompt], cache, chunk_size=512)  # split into ring-sized chunks
    ours = ids[:prompt]
    for _ in range(total - prompt):
        ours.append(int(logits.argmax()))
        if len(ours) < total:
            logits = lm.decode(ours[-1], cache)
    assert ours == hf_tokens
