"""The backend contract (core/arbor_core/backend.py: LoadedModel), stated once and run on every installed backend.

Each backend loads the same tiny random checkpoint through its own `load()` and must agree with its
own full forward pass: chunked prefill and decode, cache truncate and reuse, the sliding-window ring,
the int8 cache, sampling, errors, and a cache's RoPE. torch against MLX is tests/test_mlx_backend.py;
each backend's own fast paths are in its test file (CUDA graphs, MLX's queued steps, quantization).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from tiny_transformers import tiny_transformers_checkpoint

from arbor_cli.backends import backend_module
from arbor_core import planner
from arbor_core.backend import LoadedModel, SamplingParams
from arbor_core.errors import BackendUnavailableError, ContextError, CorruptModelError
from arbor_core.rope import rope_frequencies

WINDOW, CHUNK = 9, 7  # a ring of WINDOW + CHUNK - 1 = 15 slots
# int8 vs the float32 cache, relative error of the logits: each cached element moves by at most
# absmax/254 of its head vector, which the random, sharp attention passes on about 1:1; measured
# 5.3e-3 on the checkpoint below (every weight N(0, 0.2), as the tolerance was set on; with RMSNorm
# weights near 1 the activations are larger and it is 1.4e-2). A cache that is not dequantized, or
# with a wrong scale, is off by O(1).
INT8_LOGITS_TOLERANCE = 1e-2
VOCAB = 97


def cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


BACKENDS = [
    pytest.param(("torch", "cpu"), id="torch-cpu",
                 marks=pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed")),
    pytest.param(("mlx", "cpu"), id="mlx-cpu",
                 marks=pytest.mark.skipif(importlib.util.find_spec("mlx") is None, reason="mlx not installed")),
    pytest.param(("torch", "cuda"), id="torch-cuda",
                 marks=pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")),
]


class Backend:
    """One backend on one device, and how a test hands it arrays and reads them back."""

    def __init__(self, name: str, device: str):
        self.name, self.device = name, device
        self.module = backend_module(name)
        # the CUDA graph's split-KV Triton kernel needs head_dim >= 16 (tl.dot); the tiny model's is 8
        self.checkpoint_overrides = {"head_dim": 16} if device == "cuda" else {}

    def load(self, checkpoint, kv_bits: int = 16, prefill_chunk: int | None = None) -> LoadedModel:
        lm = self.module.load(checkpoint, self.device, "float32", kv_bits=kv_bits)
        lm.set_rope(rope_frequencies(checkpoint.config, 256), 256)
        if prefill_chunk is not None:
            lm.prefill_chunk = prefill_chunk  # sizes a window model's ring: window + chunk - 1 slots
        return lm

    def array(self, values) -> object:
        """float32 logits on the device, as prefill/decode return them."""
        values = np.asarray(values, dtype=np.float32)
        if self.name == "mlx":
            import mlx.core as mx

            return mx.array(values)
        import torch

        return torch.from_numpy(values).to(self.device)

    def numpy(self, x) -> np.ndarray:
        if self.name == "mlx":
            return np.array(x)
        return x.float().cpu().numpy()

    def forward_rows(self, lm, ids: list[int], cache) -> np.ndarray:
        """Logits of every position of `ids` run at cache.length through the model (prefill returns the last)."""
        if self.name == "mlx":
            import mlx.core as mx

            return np.array(lm.model(mx.array([ids]), cache.length, cache.layers)[0].astype(mx.float32))
        import torch

        with torch.inference_mode():
            return self.numpy(lm.model(torch.tensor([ids], device=self.device), cache.length, cache.layers)[0])


@pytest.fixture(params=BACKENDS)
def backend(request) -> Backend:
    return Backend(*request.param)


@pytest.fixture
def make_checkpoint(backend, tiny_checkpoint, tmp_path):
    """conftest.py's tiny_checkpoint, in the shape `backend` runs; with `transformers`, transformers' own
    random model of `model_type` saved as a Hugging Face directory instead (tiny_transformers.py)."""
    def make(transformers: bool = False, **over):
        over = {**backend.checkpoint_overrides, **over}
        return tiny_transformers_checkpoint(tmp_path, **over) if transformers else tiny_checkpoint(**over)
    return make


def random_ids(n: int, seed: int = 3) -> list[int]:
    return np.random.default_rng(seed).integers(0, VOCAB, n).tolist()


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def cached_logits(backend: Backend, lm, tokens: list[int], capacity: int, chunk: int, prefill: int) -> np.ndarray:
    """Logits of every position: `prefill` tokens in chunks of `chunk`, the rest one decode step each."""
    cache, rows = lm.new_cache(capacity), []
    for begin in range(0, prefill, chunk):
        part = tokens[begin:min(begin + chunk, prefill)]
        rows.append(backend.forward_rows(lm, part, cache))
        cache.length += len(part)
    rows += [backend.numpy(lm.decode(t, cache))[None] for t in tokens[prefill:]]
    return np.concatenate(rows)


# ---- prefill, decode, the cache -------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 7, 64, 512])
@pytest.mark.parametrize("window", [None, 9])
def test_chunked_prefill_then_decode_matches_the_full_forward(backend, make_checkpoint, chunk, window):
    lm = backend.load(make_checkpoint(sliding_window=window))
    ids = random_ids(70)
    full = lm.logits(ids)
    cache = lm.new_cache(128)
    last = lm.prefill(ids[:60], cache, chunk)
    np.testing.assert_allclose(backend.numpy(last), full[59], rtol=1e-4, atol=1e-4)
    for pos in range(60, 70):
        step = lm.decode(ids[pos], cache)
        np.testing.assert_allclose(backend.numpy(step), full[pos], rtol=1e-4, atol=1e-4)
    assert cache.length == 70


@pytest.mark.parametrize("chunk", [4, 64])
def test_prefill_of_every_position_after_a_cache_matches_the_full_forward(backend, make_checkpoint, chunk):
    lm = backend.load(make_checkpoint())
    ids = random_ids(40)
    full = lm.logits(ids)
    cache = lm.new_cache(64)
    lm.prefill(ids[:25], cache, chunk)
    rows = backend.numpy(lm.prefill(ids[25:], cache, chunk, every=True))  # a question after a kept document
    assert rows.shape == (15, full.shape[1]) and cache.length == 40
    np.testing.assert_allclose(rows, full[25:], rtol=1e-4, atol=1e-4)


def test_cache_overflow_and_missing_rope_are_context_errors(backend, make_checkpoint):
    lm = backend.load(make_checkpoint())
    cache = lm.new_cache(8)
    with pytest.raises(ContextError, match="the context is full"):
        lm.prefill(list(range(9)), cache, 4)
    lm.set_rope(rope_frequencies(lm.config), 4)
    with pytest.raises(ContextError, match="beyond the RoPE table"):
        lm.prefill(list(range(5)), lm.new_cache(8), 4)


def greedy_run(backend: Backend, lm, runs: list[tuple[object, list[int]]], steps: int):
    """Greedy generation on several caches at once, one step on each in turn: (tokens, logits) per cache."""
    greedy, states = SamplingParams(), []
    for cache, prompt in runs:
        logits = lm.prefill(prompt, cache, 8)
        states.append(([lm.sample(logits, greedy, None)], [backend.numpy(logits)]))
    for _ in range(steps):
        for (cache, _), (tokens, rows) in zip(runs, states):
            logits = lm.decode(tokens[-1], cache)
            rows.append(backend.numpy(logits))
            tokens.append(lm.sample(logits, greedy, None))
    return [(tokens, np.stack(rows)) for tokens, rows in states]


def test_each_cache_runs_with_the_rope_it_was_built_for(backend, make_checkpoint):
    """Two caches built with different RoPE tables, prefilled and decoded in turn on one model, each
    give what the same cache gives alone on a freshly loaded model (not what the last table set gives)."""
    checkpoint = make_checkpoint()
    cfg = checkpoint.config
    plain = rope_frequencies(cfg, 128)
    linear = rope_frequencies(cfg.with_rope_scaling({"rope_type": "linear", "factor": 4.0}), 128)
    prompts = random_ids(30), random_ids(30, seed=4)
    alone = [greedy_run(backend, (fresh := backend.load(checkpoint)), [(fresh.new_cache(128, rope), prompt)], 20)[0]
             for rope, prompt in ((plain, prompts[0]), (linear, prompts[1]))]
    lm = backend.load(checkpoint)
    caches = lm.new_cache(128, plain), lm.new_cache(128, linear)
    assert caches[0].rope is plain and caches[1].rope is linear
    together = greedy_run(backend, lm, list(zip(caches, prompts)), 20)
    for (tokens, rows), (ref_tokens, ref_rows) in zip(together, alone):
        assert tokens == ref_tokens
        np.testing.assert_allclose(rows, ref_rows, rtol=1e-4, atol=1e-4)
    other = greedy_run(backend, backend.load(checkpoint), [(lm.new_cache(128, linear), prompts[0])], 20)[0]
    assert rel_err(other[1], alone[0][1]) > 1e-2  # the two tables really give different logits
    ids = random_ids(40, seed=5)
    scaled = lm.logits(ids, linear)
    reference = backend.load(checkpoint)
    reference.set_rope(linear, len(ids))
    np.testing.assert_allclose(scaled, reference.logits(ids), rtol=1e-5, atol=1e-5)
    assert rel_err(lm.logits(ids, plain), scaled) > 1e-2


# ---- int8 KV ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_int8_cache_logits_are_close_to_the_full_precision_cache(backend, make_checkpoint, chunk):
    checkpoint, tokens = make_checkpoint(norms=0.0), random_ids(70)
    ref = cached_logits(backend, backend.load(checkpoint, 16, CHUNK), tokens, 128, chunk, 60)
    lm8 = backend.load(checkpoint, 8, CHUNK)
    got = cached_logits(backend, lm8, tokens, 128, chunk, 60)
    err = rel_err(got, ref)
    assert 1e-6 < err <= INT8_LOGITS_TOLERANCE  # close, and really quantized
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
    assert lm8.new_cache(128).layers[0].bits == 8


# ---- sliding window: the ring ----------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 3, CHUNK])
def test_ring_cache_logits_match_the_full_forward(backend, make_checkpoint, chunk):
    lm = backend.load(make_checkpoint(sliding_window=WINDOW), prefill_chunk=CHUNK)
    tokens = random_ids(70)
    cache = lm.new_cache(128)
    assert cache.slots == WINDOW + CHUNK - 1 and cache.max_chunk == CHUNK
    np.testing.assert_allclose(cached_logits(backend, lm, tokens, 128, chunk, 40), lm.logits(tokens),
                               rtol=1e-4, atol=1e-4)


def test_ring_prefill_splits_chunks_larger_than_the_ring_allows(backend, make_checkpoint):
    lm = backend.load(make_checkpoint(sliding_window=WINDOW), prefill_chunk=CHUNK)
    tokens = random_ids(50)
    cache = lm.new_cache(128)
    last = lm.prefill(tokens, cache, chunk_size=512)
    np.testing.assert_allclose(backend.numpy(last), lm.logits(tokens)[-1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kv_bits", [16, 8])
def test_ring_cache_memory_stays_at_window_plus_chunk(backend, make_checkpoint, kv_bits):
    lm = backend.load(make_checkpoint(sliding_window=WINDOW), kv_bits, CHUNK)
    cache = lm.new_cache(256)
    lm.prefill(random_ids(200), cache, CHUNK)
    for t in random_ids(30, seed=4):
        lm.decode(t, cache)
    per_token = lm.config.kv_bytes_per_token(lm.kv_element_bytes, lm.kv_scale_bytes)
    assert cache.length == 230 and cache.nbytes == per_token * (WINDOW + CHUNK - 1)
    assert cache.nbytes == planner.kv_bytes(lm.config, 256, lm.kv_element_bytes, CHUNK, lm.kv_scale_bytes)


def test_a_context_within_the_ring_size_is_a_plain_cache(backend, make_checkpoint):
    cache = backend.load(make_checkpoint(sliding_window=WINDOW), prefill_chunk=CHUNK).new_cache(12)
    assert cache.slots == 12 and cache.max_chunk == 12


def test_ring_truncate_keeps_what_the_next_window_needs_and_then_matches_a_fresh_run(backend, make_checkpoint):
    lm = backend.load(make_checkpoint(sliding_window=WINDOW), prefill_chunk=CHUNK)
    first, second = random_ids(60), random_ids(30, seed=5)
    cache = lm.new_cache(128)
    lm.prefill(first, cache, CHUNK)  # holds positions 45..59
    cache.truncate(54)  # the query at 54 needs keys 46..53: all held
    assert cache.length == 54
    got = [backend.numpy(lm.prefill(second[:5], cache, CHUNK))] + [backend.numpy(lm.decode(t, cache))
                                                                   for t in second[5:]]
    full = lm.logits(first[:54] + second)
    np.testing.assert_allclose(np.stack(got), full[58:], rtol=1e-4, atol=1e-4)


def test_ring_truncate_into_overwritten_positions_keeps_nothing(backend, make_checkpoint):
    lm = backend.load(make_checkpoint(sliding_window=WINDOW), prefill_chunk=CHUNK)
    cache = lm.new_cache(128)
    lm.prefill(random_ids(60), cache, CHUNK)  # holds positions 45..59
    cache.truncate(50)  # the query at 50 needs keys 42..49: 42..44 are overwritten
    assert cache.length == 0
    tokens = random_ids(40, seed=6)  # a fresh run from position 0 is exact again
    last = lm.prefill(tokens, cache, CHUNK)
    np.testing.assert_allclose(backend.numpy(last), lm.logits(tokens)[-1], rtol=1e-4, atol=1e-4)


# ---- sampling ----------------------------------------------------------------------------------------
# ---- several sequences in one step (step_rows: continuous batching's forward) ------------------------------
def each_alone(backend: Backend, lm, prompt: list[int], follow: list[int]) -> list[np.ndarray]:
    """The logits a sequence gets alone: its prompt's prefill, then a decode step of each of `follow`."""
    cache = lm.new_cache(64)
    out = [backend.numpy(lm.prefill(prompt, cache, CHUNK))]
    return out + [backend.numpy(lm.decode(t, cache)) for t in follow]


@pytest.mark.parametrize("window", [None, WINDOW])
@pytest.mark.parametrize("kv_bits", [16, 8])
def test_rows_of_one_step_equal_each_sequence_alone(backend, make_checkpoint, window, kv_bits):
    """Ragged prompts prefilled in one step, decoded together; one leaves early, one joins mid-way into a
    freed cache (a slot reused), prefilling beside the others' decode rows: every row's logits are the ones
    its sequence gets alone (bit for bit where the backend says row counts change nothing). The caches are
    new_caches' (torch: rows of one pool, attended at once, the freed row a hole while it prefills)."""
    lm = backend.load(make_checkpoint(sliding_window=window), kv_bits=kv_bits, prefill_chunk=CHUNK)
    prompts = [random_ids(7, 1), random_ids(2, 2), random_ids(5, 3)]
    follow = random_ids(8, 4)
    late = random_ids(6, 5)
    alone = [each_alone(backend, lm, p, follow) for p in prompts] + [each_alone(backend, lm, late, follow[3:])]
    caches = lm.new_caches(len(prompts), 64)
    got: list[list[np.ndarray]] = [[] for _ in range(4)]
    running = [0, 1, 2]
    logits = backend.numpy(lm.step_rows(prompts, caches))
    for i in running:
        got[i].append(logits[i])
    for step, token in enumerate(follow):
        if step == 2:  # sequence 1 leaves; its cache, emptied, takes a new prompt beside the decode rows
            running.remove(1)
            caches[1].truncate(0)
            rows = [[token] for _ in running] + [late]
            logits = backend.numpy(lm.step_rows(rows, [caches[i] for i in running] + [caches[1]]))
            for j, i in enumerate(running):
                got[i].append(logits[j])
            got[3].append(logits[-1])
            running.append(3)
            caches.append(caches[1])
            continue
        rows = [[token] for _ in running]
        logits = backend.numpy(lm.step_rows(rows, [caches[i] for i in running]))
        for j, i in enumerate(running):
            got[i].append(logits[j])
    for i in range(4):
        want = alone[i][:len(got[i])] if i != 1 else alone[1][:3]
        assert len(got[i]) == len(want)
        for a, b in zip(got[i], want):
            if lm.exact_across_row_counts:
                np.testing.assert_array_equal(a, b)
            elif kv_bits == 8:  # a key 1e-6 off may round to the next int8 code: a code's step, as int8 vs float
                assert rel_err(a, b) < INT8_LOGITS_TOLERANCE
            else:
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_rows_of_one_step_must_share_a_rope(backend, make_checkpoint):
    from arbor_core.rope import rope_frequencies

    checkpoint = make_checkpoint()
    lm = backend.load(checkpoint)
    a, b = rope_frequencies(checkpoint.config, 64), rope_frequencies(checkpoint.config, 64)
    with pytest.raises(ValueError, match="RoPE"):
        lm.step_rows([[1], [2]], [lm.new_cache(64, a), lm.new_cache(64, b)])
    with pytest.raises(ValueError, match="non-empty"):
        lm.step_rows([[1], []], [lm.new_cache(64, a), lm.new_cache(64, a)])


@pytest.fixture
def tiny_lm(backend, make_checkpoint):
    return backend.load(make_checkpoint())


def test_sampling_is_reproducible_with_a_seed_and_respects_top_k(backend, tiny_lm):
    lm = tiny_lm
    values = np.random.default_rng(0).normal(size=VOCAB)
    logits = backend.array(values)
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=3)
    assert len({lm.sample(logits, params, lm.new_rng(42)) for _ in range(5)}) == 1
    rng = lm.new_rng(7)
    first = [lm.sample(logits, params, rng) for _ in range(10)]
    rng = lm.new_rng(7)
    assert [lm.sample(logits, params, rng) for _ in range(10)] == first
    many = {lm.sample(logits, params, lm.new_rng(s)) for s in range(200)}
    top3 = set(np.argsort(-values)[:3].tolist())
    assert many <= top3 and len(many) > 1


def test_unseeded_rngs_differ(backend, tiny_lm):
    logits = backend.array(np.zeros(VOCAB))
    params = SamplingParams(temperature=1.0)
    assert len({tiny_lm.sample(logits, params, tiny_lm.new_rng(None)) for _ in range(20)}) > 1


def test_top_p_keeps_only_the_nucleus(backend, tiny_lm):
    lm = tiny_lm
    values = np.full(VOCAB, -10.0)
    values[5], values[6] = 5.0, 4.0  # p(5) ~ 0.73: top_p 0.5 keeps token 5 alone
    params = SamplingParams(temperature=1.0, top_p=0.5, top_k=0)
    assert {lm.sample(backend.array(values), params, lm.new_rng(s)) for s in range(50)} == {5}
    wider = SamplingParams(temperature=1.0, top_p=0.9, top_k=0)
    assert {lm.sample(backend.array(values), wider, lm.new_rng(s)) for s in range(100)} == {5, 6}


def test_greedy_is_argmax(backend, tiny_lm):
    values = np.random.default_rng(1).normal(size=VOCAB)
    assert tiny_lm.sample(backend.array(values), SamplingParams(), None) == int(np.argmax(values))
    top1 = SamplingParams(temperature=0.7, top_k=1)
    assert tiny_lm.sample(backend.array(values), top1, None) == int(np.argmax(values))


def test_repetition_penalty_discourages_recent_tokens(backend, tiny_lm):
    lm = tiny_lm
    values = np.zeros(VOCAB)
    values[10], values[11] = 2.0, 1.9
    logits = backend.array(values)
    assert lm.sample(logits, SamplingParams(), None, [10]) == 10
    penalised = SamplingParams(repetition_penalty=1.2)
    assert lm.sample(logits, penalised, None, [10]) == 11  # 2.0 / 1.2 < 1.9
    assert lm.sample(logits, penalised, None, [5]) == 10
    assert float(backend.numpy(logits)[10]) == 2.0  # the caller's logits are untouched
    negative = np.full(VOCAB, -3.0)
    negative[20], negative[21] = -1.0, -1.1
    assert lm.sample(backend.array(negative), penalised, None, [20]) == 21  # negatives are multiplied: -1.2 < -1.1


# ---- loading ---------------------------------------------------------------------------------------------
def test_the_loaded_model_reports_what_the_planner_and_info_read(backend, make_checkpoint):
    checkpoint = make_checkpoint()
    lm16, lm8 = backend.load(checkpoint, 16), backend.load(checkpoint, 8)
    assert (lm16.kv_bits, lm16.kv_element_bytes, lm16.kv_scale_bytes) == (16, 4, 0)
    assert (lm8.kv_bits, lm8.kv_element_bytes, lm8.kv_scale_bytes) == (8, 1, 2)
    assert lm16.quantize is None and lm16.act_element_bytes == 4 and lm16.prefill_chunk > 0
    assert lm16.weights_nbytes == 4 * checkpoint.config.num_parameters() == 4 * lm16.num_parameters()
    assert (lm16.device, lm16.dtype) == (backend.device, "float32")
    assert isinstance(backend.module.QUANTIZE_MODES, tuple)


def test_an_unsupported_quantize_mode_is_refused(backend, make_checkpoint):
    with pytest.raises(BackendUnavailableError, match="quantize"):
        backend.module.load(make_checkpoint(), backend.device, "float32", quantize="int3")


def test_weights_that_do_not_match_the_config_are_a_corrupt_model(backend, make_checkpoint):
    from safetensors.numpy import load_file, save_file

    checkpoint = make_checkpoint()
    weights = load_file(str(checkpoint.weight_files[0]))
    weights["model.norm.weight"] = np.ones(7, dtype=np.float32)
    save_file(weights, str(checkpoint.weight_files[0]))
    with pytest.raises(CorruptModelError, match="model.norm.weight has shape"):
        backend.module.load(checkpoint, backend.device, "float32")
    del weights["model.norm.weight"]
    save_file(weights, str(checkpoint.weight_files[0]))
    with pytest.raises(CorruptModelError, match="missing"):
        backend.module.load(checkpoint, backend.device, "float32")


def test_an_unreadable_weights_file_is_a_corrupt_model(backend, make_checkpoint):
    checkpoint = make_checkpoint()
    data = checkpoint.weight_files[0].read_bytes()
    checkpoint.weight_files[0].write_bytes(data[:len(data) // 2])
    with pytest.raises(CorruptModelError):
        backend.module.load(checkpoint, backend.device, "float32")


# ---- every architecture --------------------------------------------------------------------------------
# One tiny checkpoint per model_type the config accepts, each with what sets its block apart. Adding an
# architecture is its block in each backend (backends/*/arch/), its GGUF entry (arbor_weights/architectures.py)
# and its entry here.
ARCHITECTURE_CHECKPOINTS = {
    "llama": {},
    "mistral": dict(model_type="mistral", sliding_window=WINDOW),
    "qwen2": dict(model_type="qwen2", attention_bias=True),
    # a sliding layer then a global one, a query scale and a local RoPE base unlike the defaults
    "gemma3_text": dict(model_type="gemma3_text", norms=0.0, sliding_window=WINDOW, rope_local_base_freq=100.0,
                        layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=24),
    # built by transformers (its weight names are the reference): q/k norms and a head_dim not hidden / heads;
    # NoPE on every second layer
    "qwen3": dict(transformers=True, model_type="qwen3", head_dim=16),
    "smollm3": dict(transformers=True, model_type="smollm3", no_rope_layer_interval=2),
    # alternating layers by default, soft caps small enough to bend every score and logit
    "gemma2": dict(model_type="gemma2", norms=0.0, sliding_window=WINDOW, query_pre_attn_scalar=24,
                   attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    # RoPE on half of each head (Phi-4-mini rotates 3/4) and a window on every layer (Phi-3-mini-4k's 2047)
    "phi3": dict(model_type="phi3", partial_rotary_factor=0.5, sliding_window=WINDOW),
}


def test_every_model_type_the_config_accepts_has_an_architecture_entry():
    from arbor_core.config import LLAMA_FAMILY

    assert set(ARCHITECTURE_CHECKPOINTS) == set(LLAMA_FAMILY)


@pytest.mark.parametrize("model_type", ARCHITECTURE_CHECKPOINTS)
def test_every_architecture_prefills_and_decodes_as_its_full_forward(backend, make_checkpoint, model_type):
    lm = backend.load(make_checkpoint(**ARCHITECTURE_CHECKPOINTS[model_type]), prefill_chunk=CHUNK)
    assert lm.config.model_type == model_type
    tokens = random_ids(50)
    np.testing.assert_allclose(cached_logits(backend, lm, tokens, 64, CHUNK, 35), lm.logits(tokens),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", ARCHITECTURE_CHECKPOINTS)
def test_every_architecture_runs_rows_of_one_step_as_each_sequence_alone(backend, make_checkpoint, model_type):
    """Each family's block over packed rows (its RoPE per token, local tables, NoPE layers, soft caps, windows):
    two ragged prompts in one step, then decode steps of both, equal to each sequence alone."""
    lm = backend.load(make_checkpoint(**ARCHITECTURE_CHECKPOINTS[model_type]), prefill_chunk=CHUNK)
    prompts, follow = [random_ids(7, 6), random_ids(3, 7)], random_ids(12, 8)
    alone = [each_alone(backend, lm, p, follow) for p in prompts]
    caches = lm.new_caches(2, 64)
    got = [backend.numpy(lm.step_rows(prompts, caches))]
    got += [backend.numpy(lm.step_rows([[t], [t]], caches)) for t in follow]
    for i in range(2):
        np.testing.assert_allclose(np.stack([g[i] for g in got]), np.stack(alone[i]), rtol=1e-4, atol=1e-4)
