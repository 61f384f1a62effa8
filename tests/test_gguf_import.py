"""GGUF import: dequantizing, un-permuting Q/K, the config from metadata and tensors, damaged files.

The GGUFs are written as llama.cpp's converter writes them (tests/gguf_files.py), so un-permuting
is checked against the original matrices; the real default model is checked tensor-for-tensor
against transformers' GGUF loader.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from gguf_files import HEAD_DIM, HEADS, HIDDEN, KV_HEADS, LAYERS, Q, llama_cpp_permute, write_tiny_gguf
from safetensors import safe_open
from safetensors.numpy import load_file

import arbor_weights
from arbor_core import chat_template
from arbor_core.chat_template import ChatTemplateRefusedError, check_template
from arbor_core.errors import ArborError, ConfigError, CorruptModelError
from arbor_weights import architectures, gguf_import, quantized

pytestmark = pytest.mark.usefixtures("arbor_home")


def unpermute_expected(stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What an import must produce from the stored GGUF arrays: HF row order again."""
    out = dict(stored)
    for name, w in stored.items():
        if ".q_proj." in name:
            out[name] = architectures.unpermute_rotary(w, HEADS)
        elif ".k_proj." in name:
            out[name] = architectures.unpermute_rotary(w, KV_HEADS)
    return out


# ---- the real default model ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def transformers_default_state(default_gguf):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(default_gguf.parent), gguf_file=default_gguf.name, dtype=torch.float32)
    return model.config, {k: v.detach().numpy() for k, v in model.state_dict().items()}


def test_default_model_tensors_equal_transformers_gguf_import(default_checkpoint, transformers_default_state):
    hf_config, theirs = transformers_default_state
    ours = {}
    for file in default_checkpoint.weight_files:
        ours.update(quantized.dequantize_state(load_file(file)))
    assert set(ours) == set(theirs) - {"lm_head.weight"}  # tied: transformers lists the shared tensor twice
    assert default_checkpoint.config.tie_word_embeddings and hf_config.tie_word_embeddings
    for name, value in ours.items():
        assert value.dtype == np.float32
        assert value.shape == theirs[name].shape, name
        assert np.array_equal(value, theirs[name]), f"{name}: max diff {np.abs(value - theirs[name]).max()}"


def test_default_model_config_matches_transformers(default_checkpoint, transformers_default_state):
    hf_config, _ = transformers_default_state
    ours = default_checkpoint.config
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings"):
        assert getattr(ours, field) == getattr(hf_config, field), field
    assert ours.rms_norm_eps == pytest.approx(hf_config.rms_norm_eps)
    assert ours.rope_theta == pytest.approx(hf_config.rope_parameters["rope_theta"])  # transformers 5's spelling


# ---- GGUF import -----------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                                   Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_gguf_import_dequantizes_and_unpermutes_every_tensor(tmp_path, qtype):
    _, stored = write_tiny_gguf(tmp_path / "m.gguf", qtype=qtype)
    arbor_weights.import_gguf(tmp_path / "m.gguf", tmp_path / "out", quiet=True)
    ours = quantized.dequantize_state(load_file(tmp_path / "out" / "model.safetensors"))
    expected = unpermute_expected(stored)
    assert set(ours) == set(expected)
    for name, value in ours.items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_f32_import_of_a_permuted_q_weight_is_the_original_matrix(tmp_path):
    original, _ = write_tiny_gguf(tmp_path / "m.gguf", qtype=Q.F32)
    arbor_weights.import_gguf(tmp_path / "m.gguf", tmp_path / "out", quiet=True)
    ours = load_file(tmp_path / "out" / "model.safetensors")
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        np.testing.assert_array_equal(ours[name], original[name])
    assert not np.array_equal(llama_cpp_permute(original[name], HEADS, KV_HEADS), original[name])


def test_unpermute_inverts_llama_cpp_permute_for_weights_and_biases():
    rng = np.random.default_rng(1)
    for shape in [(HEADS * HEAD_DIM, HIDDEN), (HEADS * HEAD_DIM,)]:
        w = rng.standard_normal(shape)
        np.testing.assert_array_equal(architectures.unpermute_rotary(llama_cpp_permute(w, HEADS), HEADS), w)


def test_q_and_k_biases_are_unpermuted_and_set_attention_bias(tmp_path):
    original, _ = write_tiny_gguf(tmp_path / "m.gguf", qtype=Q.F32, bias=True)
    arbor_weights.import_gguf(tmp_path / "m.gguf", tmp_path / "out", quiet=True)
    ours = load_file(tmp_path / "out" / "model.safetensors")
    for name in ("q_proj.bias", "k_proj.bias", "v_proj.bias"):
        np.testing.assert_array_equal(ours[f"model.layers.0.self_attn.{name}"],
                                      original[f"model.layers.0.self_attn.{name}"])
    config = arbor_weights.open_checkpoint(tmp_path / "out").config
    assert config.attention_bias and not config.attention_out_bias


def test_qwen2_gguf_is_not_unpermuted(tmp_path):
    original, _ = write_tiny_gguf(tmp_path / "q.gguf", qtype=Q.F32, arch="qwen2", bias=True)
    arbor_weights.import_gguf(tmp_path / "q.gguf", tmp_path / "out", quiet=True)
    ours = load_file(tmp_path / "out" / "model.safetensors")
    for name, value in original.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)
    assert arbor_weights.open_checkpoint(tmp_path / "out").config.model_type == "qwen2"


def test_untied_gguf_keeps_lm_head_and_config_says_so(tmp_path):
    original, _ = write_tiny_gguf(tmp_path / "m.gguf", qtype=Q.F32, tied=False)
    arbor_weights.import_gguf(tmp_path / "m.gguf", tmp_path / "out", quiet=True)
    ours = load_file(tmp_path / "out" / "model.safetensors")
    np.testing.assert_array_equal(ours["lm_head.weight"], original["lm_head.weight"])
    checkpoint = arbor_weights.open_checkpoint(tmp_path / "out")
    assert not checkpoint.config.tie_word_embeddings
    assert checkpoint.config.vocab_size == original["model.embed_tokens.weight"].shape[0]


def llama_cpp_rope_factors(factor, low, high, original, head_dim, theta):
    """convert_hf_to_gguf.py's Llama 3 rope_freqs computation, as it is written there."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            out.append(1)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_llama3_rope_freqs_become_llama3_rope_scaling(tmp_path):
    factors = llama_cpp_rope_factors(8.0, 1.0, 4.0, 8192, HEAD_DIM, 10000.0)
    write_tiny_gguf(tmp_path / "m.gguf", qtype=Q.F32, extra={"rope_freqs.weight": factors})
    arbor_weights.import_gguf(tmp_path / "m.gguf", tmp_path / "out", quiet=True)
    rope = arbor_weights.open_checkpoint(tmp_path / "out").config.rope_scaling
    assert rope == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}
    assert "rope_freqs.weight" not in load_file(tmp_path / "out" / "model.safetensors")


def test_unknown_rope_freqs_are_refused_not_ignored(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", qtype=Q.F32, extra={"rope_freqs.weight": np.linspace(1, 3, HEAD_DIM // 2,
                                                                                              dtype=np.float32)})
    with pytest.raises(ConfigError, match="rope_freqs"):
        arbor_weights.import_gguf(tmp_path / "m.gguf", tmp_path / "out", quiet=True)


def test_import_writes_config_provenance_and_opens(tmp_path, tiny_gguf):
    arbor_weights.import_gguf(tiny_gguf, tmp_path / "out", quiet=True)
    checkpoint = arbor_weights.open_checkpoint(tmp_path / "out")
    assert checkpoint.config.num_hidden_layers == LAYERS and checkpoint.config.num_key_value_heads == KV_HEADS
    assert checkpoint.source == f"gguf:{tiny_gguf}"
    record = json.loads((tmp_path / "out" / "arbor.json").read_text())
    assert record["sha256"] == arbor_weights.store.sha256_of_file(tiny_gguf)
    with safe_open(str(checkpoint.weight_files[0]), "np") as f:  # the reference reader accepts our writer
        assert f.get_tensor("model.norm.weight").shape == (HIDDEN,)


def test_read_gguf_metadata_gives_python_values(tiny_gguf):
    meta = arbor_weights.read_gguf_metadata(tiny_gguf)
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == LAYERS
    assert meta["tokenizer.ggml.tokens"][:2] == ["<|endoftext|>", "<|im_start|>"]
    assert meta["tokenizer.ggml.merges"] == ["h e"]


# ---- the config from GGUF metadata -----------------------------------------------------------

def test_from_gguf_metadata():
    meta = {"general.architecture": "llama", "llama.block_count": 30, "llama.context_length": 8192,
            "llama.embedding_length": 576, "llama.feed_forward_length": 1536, "llama.attention.head_count": 9,
            "llama.attention.head_count_kv": 3, "llama.rope.freq_base": 100000.0,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.rope.dimension_count": 64,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    cfg = gguf_import.config_from_metadata(meta, tie_word_embeddings=True, vocab_size=49152)
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.trained_context) == (64, 3, 8192)
    assert cfg.num_parameters() == 134_515_008  # SmolLM2-135M, as transformers counts it


def test_gguf_missing_key_is_named():
    with pytest.raises(ConfigError, match="embedding_length"):
        gguf_import.config_from_metadata({"general.architecture": "llama"}, tie_word_embeddings=True)



def test_every_gguf_architecture_imports_to_a_model_type_the_backends_run():
    from arbor_core.config import LLAMA_FAMILY

    assert {arch.model_type for arch in architectures.ARCHITECTURES.values()} == set(LLAMA_FAMILY)
    with pytest.raises(ConfigError, match="'falcon' is not supported; arbor runs gemma2, gemma3, llama, mistral, phi3, "
                                          "qwen2"):
        gguf_import.config_from_metadata({"general.architecture": "falcon"}, tie_word_embeddings=True)

# ---- damaged files ---------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [0.5, 0.9, 0.01])
def test_truncated_gguf_is_a_corrupt_model_error(tmp_path, tiny_gguf, keep):
    data = tiny_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CorruptModelError, match="truncated or not a GGUF file.*download it again"):
        arbor_weights.import_gguf(cut, tmp_path / "out", quiet=True)


def test_garbage_files_are_corrupt_model_errors(tmp_path):
    garbage = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    for name in ("garbage.gguf", "garbage"):
        (tmp_path / name).write_bytes(garbage)
        with pytest.raises(CorruptModelError, match="not a GGUF file"):
            arbor_weights.resolve(str(tmp_path / name), quiet=True)
    assert issubclass(CorruptModelError, ArborError)
    assert arbor_weights.list_models() == []


@pytest.mark.parametrize("content, starts", [(b"root:x:0:0:root:/root:/bin/bash\n", "it starts with b'root'"),
                                             (b"", "it is empty"), (b"PK\x03\x04rest", "it starts with b'PK")])
def test_a_file_that_is_not_gguf_is_not_told_to_download_again(tmp_path, content, starts):
    path = tmp_path / "model"
    path.write_bytes(content)
    with pytest.raises(CorruptModelError, match=f"is not a GGUF file \\({starts}") as caught:
        arbor_weights.resolve(str(path), quiet=True)
    assert "not a model arbor can read" in str(caught.value) and "download it again" not in str(caught.value)


def test_a_gguf_cut_inside_its_magic_is_truncated(tmp_path):
    (tmp_path / "cut.gguf").write_bytes(b"GG")
    with pytest.raises(CorruptModelError, match="truncated or not a GGUF file.*download it again"):
        arbor_weights.resolve(str(tmp_path / "cut.gguf"), quiet=True)


def test_import_refuses_a_gguf_whose_template_never_finishes_before_converting(tmp_path, monkeypatch):
    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 0.3)
    hostile = tmp_path / "hostile.gguf"
    write_tiny_gguf(hostile, chat_template="{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                                           "{% endfor %}")
    with pytest.raises(ChatTemplateRefusedError, match="of hostile.gguf did not finish.*hostile.gguf was not installed"):
        arbor_weights.import_gguf(hostile, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_import_keeps_a_template_that_refuses_only_some_conversations(tmp_path):
    no_system = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                 "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    path = tmp_path / "gemma-like.gguf"
    write_tiny_gguf(path, chat_template=no_system)
    arbor_weights.import_gguf(path, tmp_path / "out", quiet=True)
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"] == no_system


def test_default_model_template_passes_the_install_check(smol):
    check_template(smol.encode_chat)
