"""The default model's GGUF vocabulary, tokenized by arbor and by transformers, must give the same ids."""

import pytest
from tokenizer_samples import REFERENCE_SAMPLES as SAMPLES

from arbor_weights.gguf_vocab import tokenizer_from_gguf


@pytest.fixture(scope="module")
def ours(default_gguf):
    import gguf

    meta = {name: field.contents() for name, field in gguf.GGUFReader(default_gguf).fields.items()}
    return tokenizer_from_gguf(meta)


@pytest.fixture(scope="module")
def theirs(default_gguf):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name)


def hf_ids(tokenizer, text: str) -> list[int]:
    # transformers recognises "<|im_start|>" in text; arbor never does, so compare plain text only.
    backend = tokenizer.backend_tokenizer
    backend.encode_special_tokens = True
    try:
        return backend.encode(text, add_special_tokens=False).ids
    finally:
        backend.encode_special_tokens = False


@pytest.mark.parametrize("name", SAMPLES)
def test_encode_matches_transformers(ours, theirs, name):
    assert ours.encode(SAMPLES[name]) == hf_ids(theirs, SAMPLES[name])


@pytest.mark.parametrize("name", SAMPLES)
def test_decode_inverts_encode(ours, name):
    assert ours.decode(ours.encode(SAMPLES[name])) == SAMPLES[name]


def test_space_runs_before_digits_follow_smollm_not_transformers_gguf(ours, theirs):
    """transformers' GGUF loader ignores tokenizer.ggml.pre = 'smollm' and uses GPT-2's split alone;
    llama.cpp and SmolLM2's own tokenizer.json first cut every digit off (Digits, then ByteLevel).
    The two differ only where a run of spaces precedes a digit; the model was trained on the latter."""
    from tokenizers import Tokenizer, pre_tokenizers

    original = Tokenizer.from_str(theirs.backend_tokenizer.to_str())
    original.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    text = "total:   42 and  7"
    assert ours.encode(text) == original.encode(text, add_special_tokens=False).ids
    assert ours.encode(text) != hf_ids(theirs, text)


def hf_chat_ids(tokenizer, messages, add_generation_prompt=True) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    # transformers 5 returns a BatchEncoding here; 4.x returned the list itself.
    return list(out["input_ids"] if hasattr(out, "keys") else out)


CONVERSATIONS = {
    "system_user": [{"role": "system", "content": "You are a pirate."},
                    {"role": "user", "content": "Where is the treasure?\n  Tell me 🙂"}],
    "multi_turn": [{"role": "system", "content": "Answer in one word."},
                   {"role": "user", "content": "Capital of France?"},
                   {"role": "assistant", "content": "Paris."},
                   {"role": "user", "content": "And of Japan? 東京?"}],
    "no_system": [{"role": "user", "content": "def f():\n\treturn 1"}],
}


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_encode_chat_matches_apply_chat_template(ours, theirs, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    assert ours.encode_chat(messages, add_generation_prompt) == hf_chat_ids(theirs, messages, add_generation_prompt)
    assert ours.render_chat(messages, add_generation_prompt) == theirs.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def test_transformers_reads_the_directory_save_writes(ours, tmp_path):
    from transformers import AutoTokenizer

    ours.save(tmp_path)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    for text in [*SAMPLES.values(), "total:   42"]:
        assert hf_ids(theirs, text) == ours.encode(text)
    messages = CONVERSATIONS["multi_turn"]
    assert hf_chat_ids(theirs, messages) == ours.encode_chat(messages)


def test_load_tokenizer_reads_the_directory_transformers_saves(theirs, tmp_path):
    from arbor_core.tokenizer import load_tokenizer

    theirs.save_pretrained(tmp_path)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
    loaded = load_tokenizer(tmp_path)
    for text in SAMPLES.values():
        assert loaded.encode(text) == hf_ids(theirs, text)
    messages = CONVERSATIONS["system_user"]
    assert loaded.encode_chat(messages) == hf_chat_ids(theirs, messages)
    assert (loaded.bos_id, loaded.eos_ids, loaded.add_bos) == (1, [2], False)
