"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers loading the same file."""

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea, there lived",
    "Photosynthesis is the process by which plants",
]


@pytest.fixture(scope="module")
def reference(default_gguf):
    kw = dict(gguf_file=default_gguf.name)
    tok = transformers.AutoTokenizer.from_pretrained(default_gguf.parent, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(default_gguf.parent, dtype=torch.float32, **kw).eval()
    return tok, model


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_match_transformers(default_model, reference, prompt):
    tok, ref = reference
    ids = tok(prompt, add_special_tokens=False).input_ids
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].numpy()
    got = default_model.logits(ids)
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) <= 1e-4


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_32_tokens_match_transformers(default_model, reference, prompt):
    tok, ref = reference
    ids = tok(prompt, add_special_tokens=False).input_ids
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
    eos = ref.config.eos_token_id
    if eos in out:  # transformers keeps the end-of-sequence token; arbor stops before it
        out = out[:out.index(eos)]
    got = default_model.generate(prompt, max_new_tokens=32, add_special_tokens=False)
    assert got.tokens == out
    assert got.text == tok.decode(out)


def test_chat_answers_the_capital_of_france(default_model):
    r = default_model.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=32)
    assert "Paris" in r.text
    assert r.finish_reason == "eos"


def test_config_and_parameter_count(default_model):
    assert default_model.config.trained_context == 8192
    assert default_model.num_parameters() == 134_515_008
