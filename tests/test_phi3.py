"""Phi-3 / Phi-3.5 against transformers' Phi3ForCausalLM on tiny random weights, on both backends: fused q/k/v and
gate/up weights split at load, LongRoPE within and beyond the original context, RoPE over part of each head
(Phi-4-mini's partial_rotary_factor), a window on every layer; the same models through llama.cpp's converter and
arbor's GGUF import; the configs transformers reads, and the compiled CPU decode step."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_hf import (BACKENDS, TOLERANCE, arbor_logits, gguf_import_of, greedy_through_cache, load_backend, prompt,
                     relative_error, save_tiny_model, transformers_greedy, transformers_logits)

from arbor_core.config import ArborConfig
from arbor_core.errors import CorruptModelError

ORIGINAL = 32  # the tiny models' original context: LongRoPE's long factors take over past it
TINY_PHI3 = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, original_max_position_embeddings=ORIGINAL,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2)


def longrope(pairs: int = 8) -> dict:
    """LongRoPE parameters as Phi-3.5's config.json holds them, factors unlike each other and unlike 1."""
    return {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": np.linspace(1.0, 2.0, pairs).tolist(),
            "long_factor": np.linspace(1.0, 8.0, pairs).tolist()}


VARIANTS = {
    "plain": {},
    "longrope": {"rope_parameters": longrope()},
    # Phi-4-mini rotates 3/4 of each head; half here, LongRoPE's lists one factor per rotated pair
    "partial-longrope": {"rope_parameters": {**longrope(4), "partial_rotary_factor": 0.5}},
    "windowed": {"sliding_window": 8},  # Phi-3-mini-4k's config sets one for every layer
}


def tiny_phi3(path, **over):
    transformers = pytest.importorskip("transformers")
    return save_tiny_model(transformers.Phi3Config(**{**TINY_PHI3, **over}), path)


@pytest.fixture(scope="module")
def phi3_dirs(tmp_path_factory):
    return {name: tiny_phi3(tmp_path_factory.mktemp(name), **over) for name, over in VARIANTS.items()}


@pytest.mark.parametrize("length", [20, 48], ids=["within-original", "beyond-original"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tiny_phi3_has_transformers_logits(phi3_dirs, backend, variant, length):
    ids = prompt(length)
    assert relative_error(arbor_logits(phi3_dirs[variant], backend, ids), transformers_logits(phi3_dirs[variant], ids)) \
        <= TOLERANCE


@pytest.mark.parametrize("backend", BACKENDS)
def test_longrope_takes_the_long_factors_beyond_the_original_context(phi3_dirs, backend):
    ids = prompt(48)
    ref = transformers_logits(phi3_dirs["longrope"], ids)
    assert relative_error(arbor_logits(phi3_dirs["longrope"], backend, ids, context=ORIGINAL), ref) > 1e-2


@pytest.mark.parametrize("variant", ["longrope", "windowed"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tiny_phi3_decodes_greedily_as_transformers_through_its_cache(phi3_dirs, backend, variant):
    lm = load_backend(phi3_dirs[variant], backend)
    lm.prefill_chunk = 4  # the windowed model's rings wrap
    ids = prompt(36)  # past the original context from the start: transformers' long factors throughout
    assert greedy_through_cache(lm, ids, 64, 4, 16) == transformers_greedy(phi3_dirs[variant], ids, 16)


def test_the_fused_weights_are_split_by_the_rows_the_config_implies(phi3_dirs, tmp_path):
    from safetensors.numpy import load_file, save_file

    weights = load_file(str(phi3_dirs["plain"] / "model.safetensors"))
    assert "model.layers.0.self_attn.qkv_proj.weight" in weights and "model.layers.0.mlp.gate_up_proj.weight" in weights
    lm = load_backend(phi3_dirs["plain"], "torch")
    a = lm.model.model.layers[0].self_attn
    np.testing.assert_array_equal(a.k_proj.weight.detach().numpy(),
                                  weights["model.layers.0.self_attn.qkv_proj.weight"][64:96])
    (tmp_path / "config.json").write_bytes((phi3_dirs["plain"] / "config.json").read_bytes())
    weights["model.layers.0.self_attn.qkv_proj.weight"] = weights["model.layers.0.self_attn.qkv_proj.weight"][:-1]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(CorruptModelError, match="qkv_proj.weight has 127 rows.*implies 128"):
        load_backend(tmp_path, "torch")


@pytest.mark.parametrize("variant", ["plain", "longrope", "partial-longrope"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_phi3_gguf_from_llama_cpps_converter_imports_to_transformers_logits(phi3_dirs, tmp_path, backend, variant):
    hf_dir = phi3_dirs[variant]
    checkpoint = gguf_import_of(hf_dir, 97, tmp_path / "imported")
    config = ArborConfig.from_json_file(checkpoint / "config.json")
    hf = ArborConfig.from_json_file(hf_dir / "config.json")
    assert config.model_type == "phi3" and config.rotary_dim == hf.rotary_dim and config.sliding_window is None
    if variant != "plain":
        for name in ("long_factor", "short_factor", "original_max_position_embeddings"):
            np.testing.assert_allclose(config.rope_scaling[name], hf.rope_scaling[name], rtol=1e-7)
    for length in (20, 48):
        ids = prompt(length)
        ref = transformers_logits(hf_dir, ids)
        assert relative_error(arbor_logits(checkpoint, backend, ids), ref) <= TOLERANCE
        # the config.json the import wrote is one transformers reads the same: it runs the imported model alike (given
        # a pad id inside the tiny vocabulary: Phi3Config's default is 32,000, and the import records none)
        assert relative_error(transformers_logits(checkpoint, ids, pad_token_id=0), ref) <= TOLERANCE


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_q8_0_phi3_gguf_keeps_its_fused_blocks_and_splits_them_exactly(phi3_dirs, tmp_path, backend):
    """llama.cpp's Q8_0 of the fused attn_qkv is kept as its blocks under HF's fused name; at load its rows become
    q, k and v, each exactly gguf's own dequantization of those rows."""
    import gguf
    from safetensors.numpy import load_file

    checkpoint = gguf_import_of(phi3_dirs["plain"], 97, tmp_path / "imported", outtype="q8_0")
    assert "model.layers.0.self_attn.qkv_proj.qweight" in load_file(str(checkpoint / "model.safetensors"))
    stored = next(t for t in gguf.GGUFReader(checkpoint.with_suffix(".gguf")).tensors if t.name == "blk.0.attn_qkv.weight")
    qkv = gguf.quants.dequantize(stored.data, stored.tensor_type).reshape(128, 64)
    attention = load_backend(checkpoint, backend).model.model.layers[0].self_attn
    for name, rows in (("q_proj", slice(0, 64)), ("k_proj", slice(64, 96)), ("v_proj", slice(96, 128))):
        weight = getattr(attention, name).weight
        np.testing.assert_array_equal(weight.detach().numpy() if hasattr(weight, "detach") else np.array(weight), qkv[rows])


def test_longrope_frequencies_are_transformers():
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from arbor_core.rope import rope_frequencies

    theirs = transformers.Phi3Config(**TINY_PHI3, rope_parameters={**longrope(4), "partial_rotary_factor": 0.5})
    ours = ArborConfig.from_dict(theirs.to_dict())
    assert ours.rotary_dim == 8 and ours.rope_type == "longrope"
    for seq_len in (ORIGINAL, ORIGINAL + 1, 128):
        inv_freq, factor = ROPE_INIT_FUNCTIONS["longrope"](theirs, "cpu", seq_len=seq_len)
        tables = rope_frequencies(ours, seq_len)
        np.testing.assert_allclose(tables.inv_freq, inv_freq.numpy(), rtol=1e-6)
        assert tables.attention_factor == pytest.approx(factor, rel=1e-12) and factor > 1.1


def test_the_first_phi3_128k_config_form_reads_as_transformers_reads_it():
    transformers = pytest.importorskip("transformers")
    # Phi-3-mini-128k-instruct's config.json as first published: "su" scaling, the original context outside it
    raw = {**TINY_PHI3, "model_type": "phi3", "rope_theta": 10000.0, "original_max_position_embeddings": 24,
           "rope_scaling": {"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}}
    theirs = transformers.Phi3Config(**{k: v for k, v in raw.items() if k != "model_type"})
    ours = ArborConfig.from_dict(raw)
    assert ours.rope_type == theirs.rope_parameters["rope_type"] == "longrope"
    assert ours.rope_scaling["original_max_position_embeddings"] == 24 == ours.trained_context
    again = ArborConfig.from_dict(ours.to_dict())
    assert again.rope_scaling == ours.rope_scaling and again.to_dict()["original_max_position_embeddings"] == 24


def test_longrope_that_does_not_fit_the_heads_is_one_config_error():
    from arbor_core.errors import ConfigError

    raw = {**TINY_PHI3, "model_type": "phi3", "rope_scaling": {**longrope(8), "original_max_position_embeddings": 32}}
    with pytest.raises(ConfigError, match="long_factor must list 4 positive numbers"):
        ArborConfig.from_dict({**raw, "partial_rotary_factor": 0.5})  # half the head: 4 pairs rotate, not 8
    with pytest.raises(ConfigError, match="partial_rotary_factor must rotate an even number"):
        ArborConfig.from_dict({**raw, "rope_scaling": None, "partial_rotary_factor": 0.2})  # 3.2 dims of 16


def test_a_gguf_with_long_factors_alone_is_one_config_error():
    from types import SimpleNamespace

    from arbor_core.errors import ConfigError
    from arbor_weights.gguf_import import longrope_scaling

    meta = {"general.architecture": "phi3", "phi3.rope.scaling.original_context_length": 4096}
    factors = {"rope_factors_long.weight": SimpleNamespace(data=np.ones(48, dtype=np.float32))}
    with pytest.raises(ConfigError, match="long factors without the short ones"):
        longrope_scaling(meta, factors)


def test_the_compiled_decode_step_runs_phi3_as_eager_does(phi3_dirs):
    """The compiled CPU step's function (decode_step.DecodeStep, before compiling) on the partial, LongRoPE model:
    its logits and the new token's K/V against the eager decode's."""
    torch = pytest.importorskip("torch")
    from arbor_core.rope import rope_frequencies
    from arbor_torch.arch import family
    from arbor_torch.decode_step import DecodeStep

    lm = load_backend(phi3_dirs["partial-longrope"], "torch")
    assert "compiled_cpu" in family(lm.config).decode_strategies(lm.config)
    cache = lm.new_cache(64, rope_frequencies(lm.config, 64))
    lm.prefill(prompt(40), cache, 16)
    m = lm.model
    with torch.no_grad():
        logits, k, v = DecodeStep(m)(torch.tensor([7]), cache.stacked_k, cache.stacked_v, m.rope_cos, m.rope_sin,
                                     torch.zeros(40, dtype=torch.long))
    eager = lm.decode(7, cache)
    torch.testing.assert_close(logits, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, cache.stacked_k[:, :, 40], rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_the_compiled_decode_step_gives_phi3s_eager_tokens(tmp_path, monkeypatch):
    """The step compiled (AOTInductor, ~30 s on 2 cores) for an int4 Phi-3 with LongRoPE over half of each head."""
    import shutil

    torch = pytest.importorskip("torch")
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("needs a C++ compiler")
    from arbor_core.backend import SamplingParams
    from arbor_core.rope import rope_frequencies
    from arbor_torch.model import Transformer
    from arbor_torch.runner import TorchModel

    monkeypatch.setenv("ARBOR_COMPILE_DIR", str(tmp_path))
    # int4-tileable shapes: every projection's rows a multiple of 64, its inputs of 32
    config = ArborConfig(model_type="phi3", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         partial_rotary_factor=0.5, rope_scaling={**longrope(4), "original_max_position_embeddings": 32})
    runs = []
    for compiled in ("sync", "0"):
        monkeypatch.setenv("ARBOR_COMPILE", compiled)
        torch.manual_seed(0)
        model = Transformer(config)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.2)
        lm = TorchModel(model, "cpu", "float32", quantize="int4")
        assert (lm.compiled is not None) == (compiled == "sync")
        cache, tokens = lm.new_cache(64, rope_frequencies(config, 64)), []
        logits = lm.prefill(prompt(36, vocab=128), cache, 16)
        for _ in range(12):
            tokens.append(lm.sample(logits, SamplingParams(), None))
            logits = lm.decode(tokens[-1], cache)
        runs.append(tokens)
        assert compiled == "0" or lm.compiled.run is not None  # it really ran compiled
    assert runs[0] == runs[1]
