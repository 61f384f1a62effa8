"""The int8 KV cache and the sliding-window ring cache (torch backend), and what the planner and
chat make of them. What every backend's cache must do (int8 close to 16 bits, the ring against the
full forward, truncate) is tests/test_backend_contract.py; parity with transformers' Mistral is in
tests/reference/test_rope_parity.py; MLX against torch in tests/test_mlx_backend.py."""

import dataclasses

import numpy as np
import pytest
import torch

from arbor_core import planner
from arbor_core.config import ArborConfig
from arbor_core.errors import UsageError
from arbor_torch.cache import dequantize_int8, quantize_int8

WINDOW, CHUNK = 9, 7  # a ring of WINDOW + CHUNK - 1 = 15 slots
# int8 vs the float32 cache on the tiny model, relative error of the logits (norm of the difference
# over the norm). Each cached element moves by at most scale/2 = absmax/254 of its head vector: with
# this model's 8-dim heads (absmax ~2x the rms) that is up to ~0.4% of a K/V vector, which the
# random, sharp attention passes on to the logits about 1:1; measured 2.6e-3 here (the same at
# every chunk size, since quantization is per token). 1e-2 leaves room for other seeds; a cache
# that is not dequantized, or with a wrong scale, is off by O(1). The real model's cost is its
# perplexity (docs/long-context.md).
INT8_LOGITS_TOLERANCE = 1e-2


def rel_err(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def ids(n: int, seed: int = 3) -> list[int]:
    return torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture
def model_with(tiny_model):
    def make(kv_bits: int = 16, window: int | None = None, prefill_chunk: int = CHUNK):
        lm = tiny_model(sliding_window=window)
        lm.prefill_chunk = prefill_chunk  # sizes a window model's ring: window + chunk - 1 slots
        lm.kv_bits, lm.kv_element_bytes, lm.kv_scale_bytes = (kv_bits, (1 if kv_bits == 8 else 4),
                                                               (2 if kv_bits == 8 else 0))
        return lm
    return make


# ---- int8 ------------------------------------------------------------------------------------
def test_int8_round_trip_error_is_at_most_half_a_step_of_each_vectors_scale():
    x = torch.randn(1, 3, 50, 64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 50)[:, None]
    codes, scale = quantize_int8(x)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (1, 3, 50, 1)
    assert int(codes.abs().max()) == 127  # each vector's largest element uses the full range
    back = dequantize_int8(codes, scale, torch.float32)
    step = scale.float()
    assert torch.all((back - x).abs() <= step / 2 * (1 + 1e-3) + 1e-12)
    # relative to each vector's absmax: 1/254, plus float16's rounding of the scale (2^-11)
    amax = x.abs().amax(-1, keepdim=True)
    assert float(((back - x).abs() / amax).max()) <= 1 / 254 + 2 ** -11


def test_int8_keeps_zero_vectors_zero():
    codes, scale = quantize_int8(torch.zeros(1, 2, 4, 8))
    assert torch.all(codes == 0) and torch.all(dequantize_int8(codes, scale, torch.float32) == 0)


def test_int8_cache_is_about_a_quarter_of_float32_and_half_of_16_bits(model_with):
    full, small = model_with(16).new_cache(256), model_with(8).new_cache(256)
    head_dim = 8  # tiny_model: 48 / 6
    assert small.nbytes / full.nbytes == pytest.approx((head_dim + 2) / (head_dim * 4))
    assert small.layers[0].k.dtype == torch.int8


def test_kv_bits_other_than_8_or_16_are_refused():
    import arbor_cli

    with pytest.raises(UsageError, match="kv_bits"):
        arbor_cli.load("unused", kv_bits=4)


# ---- sliding window: the ring ------------------------------------------------------------------
@pytest.mark.parametrize("kv_bits", [16, 8])
def test_a_torch_ring_cache_is_allocated_whole_up_front_and_never_grows(model_with, kv_bits):
    lm = model_with(kv_bits, WINDOW)
    cache = lm.new_cache(256)
    before = cache.nbytes
    per_token = lm.config.kv_bytes_per_token(lm.kv_element_bytes, lm.kv_scale_bytes)
    assert before == per_token * (WINDOW + CHUNK - 1)
    assert before == planner.kv_bytes(lm.config, 256, lm.kv_element_bytes, CHUNK, lm.kv_scale_bytes)
    lm.prefill(ids(200), cache, CHUNK)
    for t in ids(30, seed=4):
        lm.decode(t, cache)
    assert cache.length == 230 and cache.nbytes == before


def test_chat_reuses_only_what_the_ring_still_holds(model_with):
    from arbor_cli.session import Session

    lm = model_with(16, WINDOW)
    session = Session(None, 128)  # only the prefix-reuse step, on a real ring cache
    session.cache, session.grain = lm.new_cache(128), CHUNK
    history = ids(60)
    lm.prefill(history, session.cache, CHUNK)
    session.hold(history, start=0)  # whole chunks of 7 up to 56
    assert session.reuse(history[:56] + [1, 2, 3]) == 56  # the window before 56 is held
    assert session.cache.length == 56 and session.ids == history[:56]
    lm.prefill([1, 2, 3], session.cache, CHUNK)
    session.hold(history[:56] + [1, 2, 3], start=56)
    assert session.reuse(history[:40] + [7, 8]) == 0  # overwritten: prefill it all again
    assert session.cache.length == 0 and session.ids == []


# ---- the planner ---------------------------------------------------------------------------------
SMOL = ArborConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192)
GIB = 1 << 30


def test_int8_kv_bytes_per_token_count_the_scales():
    # 2 (K, V) x 30 layers x 3 heads x (64 int8 + one float16 scale)
    assert SMOL.kv_bytes_per_token(1, 2) == 2 * 30 * 3 * 66
    assert SMOL.kv_bytes_per_token(2) / SMOL.kv_bytes_per_token(1, 2) == pytest.approx(128 / 66)


def test_int8_fits_about_twice_the_context_per_gib():
    """The KV bytes per token halve (scales included), so a budget where bfloat16 KV stops at 32K
    takes int8 KV to 64K (weights and the prefill workspace are the same either way)."""
    weights = 270 << 20  # SmolLM2-135M in bfloat16
    for context in (65536, 131072):
        budget = planner.bytes_for_context(SMOL, context, weights, 1, 2, 512, kv_scale_bytes=2)
        assert planner.choose_context(SMOL, 10**6, budget, weights, 1, 2, 512, kv_scale_bytes=2).context == context
        assert planner.choose_context(SMOL, 10**6, budget, weights, 2, 2, 512).context == context // 2
    per_gib = [GIB / SMOL.kv_bytes_per_token(2), GIB / SMOL.kv_bytes_per_token(1, 2)]
    assert per_gib[1] / per_gib[0] == pytest.approx(1.94, abs=0.01)


def test_sliding_window_kv_bytes_are_bounded_by_the_window_plus_a_chunk():
    mistral = dataclasses.replace(SMOL, sliding_window=4096, model_type="mistral")
    assert planner.kv_cache_tokens(mistral, 131072, 512) == 4096 + 511
    assert planner.kv_cache_tokens(mistral, 2048, 512) == 2048
    assert planner.kv_cache_tokens(SMOL, 131072, 512) == 131072
    big = planner.bytes_for_context(mistral, 131072, 0, 2, 2, 512)
    assert big == planner.bytes_for_context(mistral, 8192, 0, 2, 2, 512)  # nothing grows past window + chunk
    assert planner.choose_context(mistral, 10**6, 2 * GIB, 0, 2, 2, 512).context == 131072


# ---- the default model with an int8 cache ----------------------------------------------------------
@pytest.fixture(scope="module")
def default_int8(default_checkpoint):
    import arbor_cli

    return arbor_cli.load(str(default_checkpoint.path), backend="torch", device="cpu", dtype="float32", quiet=True,
                          kv_bits=8)


@pytest.mark.slow
def test_default_model_generates_greedily_with_an_int8_cache(default_model, default_int8):
    prompt = "The capital of France is"
    full = default_model.generate(prompt, max_new_tokens=16)
    small = default_int8.generate(prompt, max_new_tokens=16)
    assert small.text.strip() and "Paris" in small.text
    assert small.text.split()[:4] == full.text.split()[:4]  # the same opening words
    cache = default_int8._scratch_cache
    assert cache.layers[0].k.dtype == torch.int8
    assert cache.nbytes < default_model._scratch_cache.nbytes / 3  # vs float32 on CPU: (64 + 2) / 256


@pytest.mark.slow
def test_chat_with_an_int8_cache_reuses_the_history_and_holds_what_a_fresh_prefill_computes(default_int8, monkeypatch):
    """Reuse works as with 16 bits: only what the session holds of whole prefill chunks is kept (chunks of
    16 here, so that some are), the rest is prefilled, and the cache then holds what a fresh prefill of the
    same tokens computes. Keys computed by decode steps and by one prefill differ by float rounding (~1e-6),
    and int8 can turn that into one code step (~0.4% of a head's absmax) in a few elements."""
    from arbor_cli.chat import ChatSession
    from arbor_cli.generate import GenerationOptions

    lm = default_int8.lm
    monkeypatch.setattr(default_int8, "prefill_chunk", 16)
    session = ChatSession(default_int8, options=GenerationOptions(max_new_tokens=8), context=2048)
    "".join(session.send("Name a fruit that is yellow."))
    first_prompt = len(default_int8.tokenizer.encode_chat(session.messages[:1]))
    assert "".join(session.send("And one that is red?")).strip()
    prefilled = session.last_result.timings["prompt_tokens"]
    full = len(default_int8.tokenizer.encode_chat(session.messages[:-1]))
    assert prefilled == full - first_prompt // 16 * 16  # the whole chunks of the first prompt were reused
    held, cache = session.session.ids, session.session.cache
    assert cache.length == len(held)
    cache.truncate(len(held) - 1)  # re-run the last position over the reused cache
    reused = lm.decode(held[-1], cache).numpy()
    fresh = lm.prefill(held, default_int8.new_cache(2048), default_int8.prefill_chunk).numpy()
    # 3x the logits tolerance: the flipped codes above compound over the reused turns (measured 1.4e-2
    # on an H100 host's CPU)
    assert rel_err(reused, fresh) < 3 * INT8_LOGITS_TOLERANCE and reused.argmax() == fresh.argmax()


@pytest.mark.parametrize("value", ["4", "eight"])
def test_kv_bits_option_other_than_8_or_16_is_a_one_line_usage_error(value):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "arbor_cli", "info", "--kv-bits", value], capture_output=True, text=True,
                       timeout=60)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("arbor: error:") and "kv" in lines[0]
    assert r.stdout == ""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_int8_cache_on_cuda_stays_close_to_16_bits(tiny_model):
    from arbor_core.rope import rope_frequencies
    from arbor_torch.runner import TorchModel

    model = tiny_model().model.to("cuda", torch.bfloat16)
    lm16, lm8 = TorchModel(model, "cuda", "bfloat16"), TorchModel(model, "cuda", "bfloat16", kv_bits=8)
    assert lm8.use_cuda_graphs  # the split-KV graph reads int8 caches too (tests/test_cuda.py checks it)
    lm16.use_cuda_graphs = lm8.use_cuda_graphs = False  # eager against eager: only the cache differs
    lm8.set_rope(rope_frequencies(model.config), 256)
    tokens, rows = ids(70), {}
    for lm in (lm16, lm8):
        cache = lm.new_cache(128)
        out = [lm.prefill(tokens[:60], cache, 16)] + [lm.decode(t, cache) for t in tokens[60:]]
        rows[lm.kv_bits] = torch.stack(out).cpu().numpy()
    assert rel_err(rows[8], rows[16]) < 3e-2  # bfloat16 compute: int8's error and bf16's rounding are alike
