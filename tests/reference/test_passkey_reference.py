"""Passkey retrieval on the default model: arbor against transformers on the same weights and prompts.

Within the trained context (8K) both run plain RoPE, so each trial must end the same way: the key
found by both or by neither.
"""

import pytest
import torch

from arbor_cli.evals import ANSWER_TOKENS, SentenceEncoder, passkey_found, passkey_prompts, run_passkey

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

# trials per length: at 3K depths 25% and 75%; at 7K one, at depth 50% (a 7K trial costs ~35 s on 2 cores in each
# engine, and the suite has 30 minutes)
TRIALS = {3072: 2, 7168: 1}
LENGTHS = tuple(TRIALS)


@pytest.fixture(scope="module")
def reference(default_gguf):
    kw = {"gguf_file": default_gguf.name}
    tok = transformers.AutoTokenizer.from_pretrained(default_gguf.parent, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(default_gguf.parent, dtype=torch.float32, **kw).eval()
    return tok, model


def transformers_found(reference, prompt) -> bool:
    tok, model = reference
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt.ids]), max_new_tokens=ANSWER_TOKENS, do_sample=False)
    return passkey_found(tok.decode(out[0, len(prompt.ids):], skip_special_tokens=True), prompt.key)


@pytest.mark.parametrize("length", LENGTHS)
def test_each_trial_ends_as_in_transformers(default_model, reference, length):
    prompts = passkey_prompts(SentenceEncoder(default_model.tokenizer), length, TRIALS[length])
    expected = [transformers_found(reference, p) for p in prompts]
    report = run_passkey(default_model, [length], ["auto"], TRIALS[length])
    got = [r.found for r in report.results]
    print(f"passkey {length}: transformers {expected}, arbor {got}")
    assert got == expected
