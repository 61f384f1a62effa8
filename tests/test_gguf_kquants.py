"""GGUF K-quants (Q4_K, Q5_K, Q6_K) and Q5_0 kept quantized in the checkpoint, beside Q4_0/Q4_1/Q8_0:
every kept type's dequantize equal to gguf.quants.dequantize bit for bit (random blocks, and every
tensor of the two real Qwen files when they are here), the stored layout and its size, the import of
tiny K-quant GGUFs (one type, and Q4_K_M's mix), and the one-line refusal of types arbor does not read.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf_files import REAL_FILES, Q, random_kept_blocks, real_gguf, write_tiny_gguf
from safetensors.numpy import load_file

import arbor_weights
from arbor_core.errors import ConfigError
from arbor_weights import gguf_import, quantized
from arbor_weights.safetensors_file import read_safetensors_header

pytestmark = pytest.mark.usefixtures("arbor_home")


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint32)


def assert_dequantizes_as_gguf(data: np.ndarray, kind: str, shape: tuple[int, int]) -> None:
    ours = quantized.dequantize(quantized.from_gguf_blocks(data, kind, shape))
    theirs = gguf.quants.dequantize(data, Q[kind]).reshape(shape)
    assert ours.dtype == np.float32 and ours.shape == shape
    assert np.array_equal(bits(ours), bits(theirs)), f"{kind}: {np.count_nonzero(bits(ours) != bits(theirs))} differ"


# ---- numpy: exact dequantizing, the layout ------------------------------------------------------

@pytest.mark.parametrize("kind", quantized.KINDS)
@pytest.mark.parametrize("rows, blocks", [(1, 1), (5, 3), (64, 2)])
def test_every_kept_type_dequantizes_bit_for_bit_as_gguf(kind, rows, blocks):
    shape = (rows, blocks * quantized.BLOCK_BYTES[kind][0])
    assert_dequantizes_as_gguf(random_kept_blocks(kind, rows, blocks, seed=rows), kind, shape)


@pytest.mark.parametrize("kind", quantized.KINDS)
def test_entries_have_the_documented_layout_and_read_back_their_kind(kind):
    shape = (4, 2 * quantized.BLOCK_BYTES[kind][0])
    entries = quantized.from_gguf_blocks(random_kept_blocks(kind, *shape[:1], 2), kind, shape)
    layout = quantized.entry_layout(kind, shape)
    assert {s: (a.shape, a.dtype.name) for s, a in entries.items()} == layout
    assert quantized.kind_of(entries) == quantized.STORED_AS.get(kind, kind)


def test_q5_0_is_q8_0s_layout_with_codes_q_minus_16():
    """Q5_0's w = d * (q - 16) is Q8_0's float32 product d * q on the codes q - 16: stored as Q8_0, exactly."""
    data = random_kept_blocks("Q5_0", 8, 4)
    entries = quantized.from_gguf_blocks(data, "Q5_0", (8, 128))
    assert entries["qweight"].min() >= -16 and entries["qweight"].max() <= 15
    assert entries["qweight"].min() == -16 and entries["qweight"].max() == 15  # all 5 bits are read
    d = data.reshape(8, 4, 22)[..., :2].copy().view(np.float16)[..., 0]
    assert np.array_equal(entries["scales"], d)


@pytest.mark.parametrize("kind", ["Q4_K", "Q5_K"])
def test_k_sub_scales_are_the_6_bit_pairs_gguf_unpacks(kind):
    data = random_kept_blocks(kind, 6, 3).reshape(6, 3, -1)
    entries = quantized.from_gguf_blocks(data.reshape(6, -1), kind, (6, 768))
    sc, m = gguf.quants.Q4_K.get_scale_min(data[..., 4:16].reshape(-1, 12))
    assert np.array_equal(entries["sub_scales"][..., 0].reshape(-1, 8), sc)
    assert np.array_equal(entries["sub_scales"][..., 1].reshape(-1, 8), m)
    assert entries["sub_scales"].max() == 63  # 6 bits


def test_code_ranges_are_the_types_own():
    q4k, q5k, q6k = (quantized.from_gguf_blocks(random_kept_blocks(kind, 16, 4), kind, (16, 1024))["qweight"]
                     for kind in ("Q4_K", "Q5_K", "Q6_K"))
    assert np.array_equal(np.unique(quantized.unpack_nibbles(q4k)), np.arange(16))
    assert np.array_equal(np.unique(q5k), np.arange(32))
    assert np.array_equal(np.unique(q6k), np.arange(-32, 32))


@pytest.mark.parametrize("kind, stored_bits, file_bits", [
    ("Q4_K", 4.625, 4.5), ("Q5_K", 8.625, 5.5), ("Q6_K", 8.5625, 6.5625), ("Q5_0", 8.5, 5.5)])
def test_stored_bits_per_weight(kind, stored_bits, file_bits):
    shape = (64, 4096)
    stored = sum(np.prod(s) * np.dtype(d).itemsize for s, d in quantized.entry_layout(kind, shape).values())
    block, size = quantized.BLOCK_BYTES[kind]
    assert (8 * stored / np.prod(shape), 8 * size / block) == (stored_bits, file_bits)


# ---- the import ---------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q5_0], ids=lambda q: q.name)
def test_import_keeps_the_blocks_and_records_them(tmp_path, qtype):
    _, stored = write_tiny_gguf(tmp_path / "m.gguf", qtype=qtype, arch="qwen2", bias=True)
    arbor_weights.import_gguf(tmp_path / "m.gguf", tmp_path / "out", quiet=True)
    checkpoint = arbor_weights.open_checkpoint(tmp_path / "out")
    header = read_safetensors_header(checkpoint.weight_files[0])
    entries = {name.rpartition(".")[2] for name in header if name.startswith("model.layers.0.mlp.down_proj.")}
    assert entries == set(quantized.entry_layout(qtype.name, (256, 256)))
    assert checkpoint.quantization["tensors"] == {qtype.name: 15}
    ours = quantized.dequantize_state(load_file(checkpoint.weight_files[0]))
    assert ours.keys() == stored.keys()
    for name, value in ours.items():
        assert np.array_equal(bits(value), bits(stored[name])), name


def test_a_q4_k_m_mix_imports_each_tensor_in_its_own_type(tmp_path):
    kinds = {"v_proj": Q.Q6_K, "down_proj": Q.Q6_K, "embed_tokens": Q.Q8_0}
    _, stored = write_tiny_gguf(tmp_path / "m.gguf", qtype=Q.Q4_K, arch="qwen2", bias=True, kinds=kinds)
    arbor_weights.import_gguf(tmp_path / "m.gguf", tmp_path / "out", quiet=True)
    checkpoint = arbor_weights.open_checkpoint(tmp_path / "out")
    assert checkpoint.quantization["tensors"] == {"Q4_K": 10, "Q6_K": 4, "Q8_0": 1}
    assert quantized.layer_bits(checkpoint) == 4
    state = load_file(checkpoint.weight_files[0])
    kinds_read = {base: quantized.kind_of(entries) for base, entries in quantized.split_state(state)[1].items()}
    assert kinds_read["model.layers.1.self_attn.v_proj"] == "Q6_K" and kinds_read["model.layers.1.mlp.up_proj"] == "Q4_K"
    ours = quantized.dequantize_state(state)
    assert all(np.array_equal(bits(value), bits(stored[name])) for name, value in ours.items())


@pytest.mark.parametrize("qtype", [Q.IQ4_NL, Q.IQ2_XXS, Q.TQ2_0], ids=lambda q: q.name)
def test_a_type_arbor_does_not_read_is_one_line_before_anything_is_written(tmp_path, qtype):
    write_tiny_gguf(tmp_path / "m.gguf", qtype=Q.Q4_K, kinds={"down_proj": qtype})
    with pytest.raises(ConfigError) as error:
        arbor_weights.import_gguf(tmp_path / "m.gguf", tmp_path / "out", quiet=True)
    message = str(error.value)
    assert "\n" not in message
    assert f"tensor blk.0.ffn_down.weight is stored as {qtype.name}, which arbor does not read" in message
    assert ", ".join(gguf_import.READ_TYPES) in message and "Q4_K" in message
    assert not (tmp_path / "out").exists()


def test_a_type_arbor_does_not_read_leaves_nothing_installed(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", qtype=Q.IQ4_NL)
    with pytest.raises(ConfigError, match="stored as IQ4_NL"):
        arbor_weights.resolve(str(tmp_path / "m.gguf"), quiet=True)
    assert not any(arbor_weights.store.models_dir().iterdir())


# ---- the real Qwen files (found, never downloaded: 1.6 GB) -------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", REAL_FILES)
def test_every_kept_tensor_of_the_real_files_dequantizes_bit_for_bit(name):
    path = real_gguf(name)
    kinds = set()
    for tensor in gguf_import.open_gguf(path).tensors:
        kind, shape = tensor.tensor_type.name, tuple(int(d) for d in reversed(tensor.shape.tolist()))
        if not quantized.keeps_quantized(kind, shape):
            continue
        rows, columns = shape
        kinds.add(kind)
        data = np.asarray(tensor.data).view(np.uint8).reshape(rows, -1)
        for start in range(0, rows, 8192):  # rows are independent: bounded memory for the 151,936-row tables
            part = data[start:start + 8192]
            assert_dequantizes_as_gguf(part, kind, (part.shape[0], columns))
    assert kinds >= {"Q4_K", "Q6_K"}


@pytest.mark.slow
@pytest.mark.parametrize("name", REAL_FILES)
def test_the_real_files_import_to_at_most_1_35x_their_size(name, tmp_path):
    path = real_gguf(name)
    arbor_weights.import_gguf(path, tmp_path / "out", quiet=True)
    stored = sum(f.stat().st_size for f in (tmp_path / "out").rglob("*") if f.is_file())
    assert stored <= 1.35 * path.stat().st_size
    checkpoint = arbor_weights.open_checkpoint(tmp_path / "out")
    assert set(checkpoint.quantization["tensors"]) <= set(quantized.KINDS) and quantized.layer_bits(checkpoint)
