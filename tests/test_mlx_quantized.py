"""MLX runs a checkpoint's GGUF blocks as quantized layers (arbor_mlx/blocks.py): every kept type's MLX
weight equals gguf's dequantization (synthetic blocks of each type), the packing is MLX's own, the layers
compute what the float path computes, a GGUF import loads quantized by default and as floats when a dtype
is asked, and (slow, when the 491 MB file is here) the real Qwen2.5-Coder-0.5B's logits equal torch's.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
from mlx.utils import tree_flatten  # noqa: E402

from gguf_files import Q, write_tiny_gguf  # noqa: E402
from gguf_files import random_kept_blocks as random_blocks, real_gguf  # noqa: E402

import arbor_mlx  # noqa: E402
import arbor_weights  # noqa: E402
from arbor_core.errors import BackendUnavailableError  # noqa: E402
from arbor_core.rope import rope_frequencies  # noqa: E402
from arbor_mlx.blocks import GROUP, BlockEmbedding, BlockLinear, affine_blocks, pack_codes  # noqa: E402
from arbor_weights import quantized  # noqa: E402

pytestmark = pytest.mark.usefixtures("arbor_home")
# the bits and parts each kept type runs as, for random blocks (every code a type can hold)
LAYOUT = {"Q4_0": (4, 1), "Q4_1": (4, 1), "Q8_0": (8, 1), "Q5_0": (5, 1), "Q4_K": (4, 1), "Q5_K": (5, 1),
          "Q6_K": (6, 2)}
IDS = list(range(3, 40))


def mlx_weight(blocks) -> np.ndarray:
    """The float32 weight MLX computes with: mx.dequantize of the blocks, the parts added."""
    w = np.array(mx.dequantize(mx.array(blocks.weight), mx.array(blocks.scales), mx.array(blocks.biases),
                               group_size=GROUP, bits=blocks.bits))
    rows = w.shape[0] // blocks.parts
    return w if blocks.parts == 1 else w[:rows] + w[rows:]


def entries_of(kind: str, rows: int, blocks: int, seed: int = 0):
    """(a tensor's stored entries, gguf's own float32 dequantization of the same blocks)."""
    shape = (rows, blocks * quantized.BLOCK_BYTES[kind][0])
    data = random_blocks(kind, rows, blocks, seed)
    return quantized.from_gguf_blocks(data, kind, shape), gguf.quants.dequantize(data, Q[kind]).reshape(shape)


# ---- the weights: exact -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", quantized.KINDS)
@pytest.mark.parametrize("rows, blocks", [(1, 1), (5, 3), (64, 2)])
def test_every_kept_type_runs_as_gguf_dequantizes_it(kind, rows, blocks):
    """Equal values; the one bit pattern allowed to differ is a zero's sign (gguf's d * 0 is -0.0 for a
    negative d, the affine d * q + (-d * q) is +0.0): no sum of products can tell them apart."""
    entries, theirs = entries_of(kind, rows, blocks, seed=rows)
    ours_blocks = affine_blocks(entries)
    assert (ours_blocks.bits, ours_blocks.parts) == LAYOUT[kind]
    assert ours_blocks.scales.dtype == ours_blocks.biases.dtype == np.float32
    ours = mlx_weight(ours_blocks)
    assert ours.shape == theirs.shape and np.array_equal(ours, theirs)
    nonzero = theirs != 0
    assert np.array_equal(ours[nonzero].view(np.uint32), theirs[nonzero].view(np.uint32))


def test_codes_take_the_fewest_bits_that_hold_the_tensors_range():
    """A Q8_0 tensor whose codes span 16 values runs in 4 bits, still exactly (the width follows the
    codes, not the type: Q5_0 is stored as Q8_0 and needs 5)."""
    entries, _ = entries_of("Q8_0", 4, 2)
    entries["qweight"] = np.random.default_rng(1).integers(-3, 13, entries["qweight"].shape).astype(np.int8)
    blocks = affine_blocks(entries)
    assert blocks.bits == 4 and np.array_equal(mlx_weight(blocks), quantized.dequantize(entries))
    entries["qweight"][0, 0] = -4  # 17 values: 5 bits
    assert affine_blocks(entries).bits == 5


def test_q6_k_keeps_a_code_for_zero_when_no_code_is_negative():
    entries, _ = entries_of("Q6_K", 3, 1)
    entries["qweight"] = np.abs(entries["qweight"]) + np.int8(1)  # 1..33: the unused halves still need 0
    assert np.array_equal(mlx_weight(affine_blocks(entries)), quantized.dequantize(entries))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_codes_are_packed_as_mlx_packs_them(bits):
    """mx.quantize, MLX's own packer, as the reference: a matrix whose every group spans 0..2**bits - 1
    quantizes with scale +-1, so the codes it packed, (value - bias) / scale, are integers we can pack."""
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 1 << bits, (6, 4 * GROUP)).astype(np.float32)
    values[:, 0::GROUP], values[:, 1::GROUP] = 0, (1 << bits) - 1
    weight, scales, biases = mx.quantize(mx.array(values), group_size=GROUP, bits=bits)
    scales, biases = (np.repeat(np.array(a), GROUP, axis=1) for a in (scales, biases))
    assert np.all(np.abs(scales) == 1)
    codes = (values - biases) / scales
    assert np.all((codes >= 0) & (codes < 1 << bits))
    assert np.array_equal(pack_codes(codes.astype(np.uint8), bits), np.array(weight))


# ---- the layers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["Q4_1", "Q5_0", "Q4_K", "Q6_K"])
def test_a_block_linear_and_embedding_compute_what_their_float_weight_does(kind):
    entries, w = entries_of(kind, 24, 2, seed=3)
    blocks = affine_blocks(entries)
    x = np.random.default_rng(0).standard_normal((2, 5, w.shape[1])).astype(np.float32)
    bias = np.random.default_rng(1).standard_normal(w.shape[0]).astype(np.float32)
    linear = BlockLinear(blocks, mx.float32, bias=True)
    linear.bias = mx.array(bias)
    assert np.allclose(np.array(linear(mx.array(x))), x @ w.T + bias, rtol=1e-5, atol=1e-5 * np.abs(x @ w.T).max())
    table = BlockEmbedding(blocks, mx.float32)
    ids = np.array([[0, 23, 7], [7, 1, 1]])
    assert np.array_equal(np.array(table(mx.array(ids))), w[ids])  # rows looked up exactly
    assert np.allclose(np.array(table.as_linear(mx.array(x))), x @ w.T, rtol=1e-5, atol=1e-5 * np.abs(x @ w.T).max())
    assert table.num_weights() == linear.num_weights() == w.size


# ---- a GGUF import on MLX -----------------------------------------------------------------------

def tiny_import(tmp_path, qtype, **options):
    """A tiny Qwen2 GGUF (q/k/v biases) in `qtype`, imported: the checkpoint of its blocks."""
    write_tiny_gguf(tmp_path / "m.gguf", qtype=qtype, arch="qwen2", bias=True, **options)
    arbor_weights.import_gguf(tmp_path / "m.gguf", tmp_path / "out", quiet=True)
    return arbor_weights.open_checkpoint(tmp_path / "out")


def assert_same_model(quant, floats, checkpoint):
    """Every Block layer's weight, as MLX computes with it, is the float path's weight (gguf's values) exactly;
    the logits then differ by float32 rounding only. Random K-quant blocks make weights up to ~41 in a tiny
    random model, which amplifies a reordered sum's rounding: measured up to 6e-5 of max |logit| (typically
    5e-7) on the Q4_K_M mix, 1e-5 and below for one type."""
    float_weights = dict(tree_flatten(floats.model.parameters()))
    held = [(name, m) for name, m in quant.model.named_modules() if isinstance(m, (BlockLinear, BlockEmbedding))]
    assert held
    for name, module in held:
        assert np.array_equal(mlx_weight(module), np.array(float_weights[f"{name}.weight"])), name
    ours, theirs = logits(quant, checkpoint), logits(floats, checkpoint)
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


def logits(lm, checkpoint, ids=IDS):
    lm.set_rope(rope_frequencies(checkpoint.config), max(64, len(ids)))
    return np.array(lm.logits(ids))


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q5_0, Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
@pytest.mark.parametrize("tied", [True, False])
def test_a_gguf_import_runs_quantized_by_default_and_as_floats_with_a_dtype(tmp_path, qtype, tied):
    checkpoint = tiny_import(tmp_path, qtype, tied=tied)
    quant, floats = arbor_mlx.load(checkpoint, "cpu"), arbor_mlx.load(checkpoint, "cpu", "float32")
    assert (quant.quantize, quant.dtype, floats.quantize) == ("gguf-blocks", "float32", None)
    head = quant.model.model.embed_tokens if tied else quant.model.lm_head
    assert isinstance(quant.model.model.layers[1].mlp.down_proj, BlockLinear)
    assert isinstance(quant.model.model.embed_tokens, BlockEmbedding) and isinstance(head, (BlockLinear, BlockEmbedding))
    assert quant.num_parameters() == floats.num_parameters() == checkpoint.config.num_parameters()
    # held: each weight's codes plus a float32 scale and bias per 32, in each part; not float32's 32 bits
    weights = sum(m.num_weights() for _, m in quant.model.named_modules() if isinstance(m, (BlockLinear, BlockEmbedding)))
    bits, parts = LAYOUT[qtype.name]
    assert quant.weights_nbytes == floats.weights_nbytes - 4 * weights + weights * parts * (bits + 2) // 8
    assert_same_model(quant, floats, checkpoint)


def test_a_q4_k_m_mix_runs_each_tensor_in_its_own_layout(tmp_path):
    kinds = {"v_proj": Q.Q6_K, "down_proj": Q.Q6_K, "embed_tokens": Q.Q8_0, "q_proj": Q.Q5_0}
    checkpoint = tiny_import(tmp_path, Q.Q4_K, kinds=kinds)
    quant, floats = arbor_mlx.load(checkpoint, "cpu"), arbor_mlx.load(checkpoint, "cpu", "float32")
    layer = quant.model.model.layers[0]
    assert [(m.bits, m.parts) for m in (layer.self_attn.v_proj, layer.self_attn.q_proj, layer.mlp.up_proj)] == \
        [(6, 2), (5, 1), (4, 1)]
    assert quant.model.model.embed_tokens.bits == 8
    assert_same_model(quant, floats, checkpoint)


def test_blocks_compute_a_position_alike_in_any_row_count(tmp_path):
    """What exact_across_row_counts promises on the CPU (a chat turn's reuse rests on it), for blocks."""
    checkpoint = tiny_import(tmp_path, Q.Q4_K, kinds={"down_proj": Q.Q6_K, "embed_tokens": Q.Q5_0})
    lm = arbor_mlx.load(checkpoint, "cpu")
    assert lm.quantize == "gguf-blocks" and lm.exact_across_row_counts
    rope = rope_frequencies(checkpoint.config)
    whole = np.array(lm.prefill(IDS, lm.new_cache(64, rope), every=True))
    cache = lm.new_cache(64, rope)
    parts = [np.array(lm.prefill(IDS[:30], cache, every=True))]
    parts += [np.array(lm.decode(token, cache))[None] for token in IDS[30:]]
    assert np.array_equal(np.concatenate(parts), whole)


@pytest.mark.parametrize("dtype, epsilon", [(mx.bfloat16, 2 ** -8), (mx.float16, 2 ** -11)])
def test_a_16_bit_layer_uses_the_exact_weight_and_rounds_only_its_output(dtype, epsilon):
    """float32 constants in a 16-bit model: bfloat16 ones would put errors of d / 4 in every Q8_0 weight."""
    entries, w = entries_of("Q8_0", 16, 2, seed=5)
    layer = BlockLinear(affine_blocks(entries), dtype, bias=False)
    assert layer.scales.dtype == layer.biases.dtype == mx.float32 and np.array_equal(mlx_weight(layer), w)
    x16 = mx.array(np.random.default_rng(0).standard_normal((3, w.shape[1]))).astype(dtype)
    y = layer(x16)
    exact = np.array(x16.astype(mx.float32)) @ w.T  # the 16-bit input times the file's weight, in float32
    assert y.dtype == dtype and np.allclose(np.array(y.astype(mx.float32)), exact, rtol=epsilon, atol=1e-5)
    rows = BlockEmbedding(affine_blocks(entries), dtype)(mx.array([3, 0]))
    assert rows.dtype == dtype and mx.array_equal(rows, mx.array(w[[3, 0]]).astype(dtype)).item()


def test_a_16_bit_model_runs_its_blocks(tmp_path):
    checkpoint = tiny_import(tmp_path, Q.Q4_K)
    lm = arbor_mlx.MLXModel.from_checkpoint(checkpoint, "cpu", "bfloat16", blocks=True)
    assert lm.quantize == "gguf-blocks" and isinstance(lm.model.model.layers[0].mlp.down_proj, BlockLinear)
    ours, theirs = logits(lm, checkpoint), logits(arbor_mlx.load(checkpoint, "cpu", "bfloat16"), checkpoint)
    # measured: both 2.8e-3 of max |logit| from the float32 model's; they are bfloat16 sums of the same weights
    assert np.abs(ours - theirs).max() <= 1e-2 * np.abs(theirs).max()


def test_quantize_stays_refused_and_a_float_checkpoint_loads_as_floats(tmp_path, tiny_checkpoint):
    with pytest.raises(BackendUnavailableError, match="quantize='int4'"):
        arbor_mlx.load(tiny_import(tmp_path, Q.Q4_K), "cpu", quantize="int4")
    assert arbor_mlx.load(tiny_checkpoint(), "cpu").quantize is None


# ---- the real 0.5B (slow; its GGUF found, never downloaded) -------------------------------------

TEXT = ("The Python Software Foundation is a non-profit organization devoted to the Python programming "
        "language. Python is a high-level, general-purpose language whose design philosophy emphasizes code "
        "readability with the use of significant indentation. It is dynamically typed and garbage-collected, "
        "and supports multiple programming paradigms, including structured, object-oriented and functional "
        "programming. Guido van Rossum began working on Python in the late 1980s as a successor to the ABC "
        "programming language and first released it in 1991.")


@pytest.fixture(scope="module")
def qwen05(tmp_path_factory):
    path = real_gguf("qwen2.5-coder-0.5b-instruct")  # skips, saying CI does not download it, when absent
    out = tmp_path_factory.mktemp("qwen05") / "model"
    arbor_weights.import_gguf(path, out, quiet=True)
    return arbor_weights.open_checkpoint(out)


@pytest.mark.slow
def test_the_real_0_5b_runs_quantized_with_torchs_exact_float_logits(qwen05):
    """Measured: MLX quantized 2.1e-6 of max |logit| from torch's float32, MLX float 2.0e-6; same argmax."""
    pytest.importorskip("torch")
    import arbor_torch
    from arbor_core.tokenizer import load_tokenizer

    ids = load_tokenizer(qwen05.path).encode(TEXT)
    assert len(ids) >= 80
    reference = logits(arbor_torch.load(qwen05, "cpu", "float32"), qwen05, ids)
    quant = arbor_mlx.load(qwen05, "cpu")
    checkpoint_bytes = sum(f.stat().st_size for f in qwen05.weight_files)
    # measured: 655,484,416 bytes for a 644,893,664-byte weights file (Q5_0 in 5 bits where the file stores 8,
    # float32 constants where it stores float16); the float path holds 2,520,669,696
    assert quant.quantize == "gguf-blocks" and quant.weights_nbytes <= 1.05 * checkpoint_bytes
    for lm in (quant, arbor_mlx.load(qwen05, "cpu", "float32")):
        ours = logits(lm, qwen05, ids)
        assert np.abs(ours - reference).max() <= 1e-5 * np.abs(reference).max()
        assert np.array_equal(ours.argmax(-1), reference.argmax(-1))


@pytest.mark.slow
def test_the_real_0_5b_greedy_tokens_agree_with_torch(qwen05):
    pytest.importorskip("torch")
    import arbor_cli

    replies = [arbor_cli.load(str(qwen05.path), quiet=True, **options).generate(
        TEXT[:200], max_new_tokens=32, ignore_eos=True).tokens
        for options in ({"backend": "torch", "device": "cpu", "dtype": "float32"}, {"backend": "mlx", "device": "cpu"})]
    assert replies[0] == replies[1] and len(replies[0]) == 32
