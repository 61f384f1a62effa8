"""The int4-mode model of a GGUF-block checkpoint kept on disk (backends/arbor_torch/layout_cache.py): read
back it computes what a freshly built one computes, bit for bit; a damaged file is rebuilt with one line; a
changed checkpoint is a new file; old files age out. Tiny GGUFs, as test_gguf_kquants_torch.py writes them."""

from __future__ import annotations

import os

import pytest
from gguf_files import Q, write_tiny_gguf

import arbor_weights

torch = pytest.importorskip("torch")
from arbor_core.backend import SamplingParams  # noqa: E402
from arbor_torch import integer_kernels, layout_cache, load_quantized  # noqa: E402

pytestmark = pytest.mark.usefixtures("arbor_home")
MIX = {"v_proj": Q.Q6_K, "down_proj": Q.Q6_K, "embed_tokens": Q.Q8_0}  # Q4_K_M's pattern: stacked int4 + int8
CASES = {"Q4_K_M mix, tied": (Q.Q4_K, MIX, True), "Q4_0, untied head": (Q.Q4_0, None, False),
         # the 0.5B's kinds: Q5_0 layers and embedding, Q8_0 head, Q6_K / Q4_K down (every packed layer type)
         "Q5_0 + Q8_0 + K-quants, untied": (Q.Q5_0, {"down_proj": Q.Q6_K, "o_proj": Q.Q4_K, "lm_head": Q.Q8_0}, False)}
IDS = [3, 17, 42, 5, 99, 7, 64, 11]


@pytest.fixture(autouse=True)
def default_cache(monkeypatch):
    monkeypatch.delenv(layout_cache.ENV, raising=False)
    monkeypatch.delenv(layout_cache.DIR_ENV, raising=False)
    monkeypatch.setenv("ARBOR_COMPILE", "0")  # eager decode: the layout is what is compared


def import_tiny(tmp_path, qtype=Q.Q4_K, kinds=MIX, tied=True):
    tmp_path.mkdir(parents=True, exist_ok=True)
    write_tiny_gguf(tmp_path / "m.gguf", qtype=qtype, kinds=kinds, tied=tied, arch="qwen2", bias=True, scale=0.02)
    arbor_weights.import_gguf(tmp_path / "m.gguf", tmp_path / "out", quiet=True)
    return arbor_weights.open_checkpoint(tmp_path / "out")


def int4_lm(checkpoint):
    from arbor_core.rope import rope_frequencies
    from arbor_torch.runner import TorchModel

    lm = TorchModel.from_checkpoint(checkpoint, "cpu", "float32", quantize="int4")
    lm.set_rope(rope_frequencies(checkpoint.config), 512)
    return lm


def outputs(lm) -> torch.Tensor:
    """Prefill logits of every position, then three decode steps' (the int4 kernel's path)."""
    cache = lm.new_cache(64)
    rows = [torch.from_numpy(lm.logits(IDS))]
    token = lm.sample(lm.prefill(IDS, cache, 512), SamplingParams(), None)
    for _ in range(3):
        rows.append(lm.decode(token, cache).reshape(1, -1))
        token = lm.sample(rows[-1][0], SamplingParams(), None)
    return torch.cat([r.reshape(-1, rows[0].shape[-1]).float() for r in rows])


def layouts():
    return sorted(layout_cache.cache_directory().glob("layout-*.safetensors"))


def never_built(monkeypatch):
    monkeypatch.setattr(load_quantized, "load_int4", lambda *a: pytest.fail("built again instead of read"))


@pytest.mark.parametrize("case", CASES)
def test_an_int4_model_read_from_the_cache_computes_what_one_built_fresh_does(tmp_path, case, monkeypatch, capfd):
    checkpoint = import_tiny(tmp_path, *CASES[case])
    monkeypatch.setenv(layout_cache.ENV, "0")
    fresh_lm = int4_lm(checkpoint)
    fresh = outputs(fresh_lm)
    assert layouts() == []  # off: nothing written
    monkeypatch.delenv(layout_cache.ENV)
    first = outputs(int4_lm(checkpoint))  # built, then written
    assert len(layouts()) == 1
    never_built(monkeypatch)
    cached = int4_lm(checkpoint)
    assert torch.equal(first, fresh) and torch.equal(outputs(cached), fresh)
    assert capfd.readouterr().err == ""
    # the same module kinds as a built model, and a tied head still shared with the embedding
    kinds = [type(m).__name__ for m in cached.model.modules()]
    assert kinds == [type(m).__name__ for m in fresh_lm.model.modules()]
    if case.startswith("Q5_0") and integer_kernels.available():  # every layer type of arbor's integer kernels
        assert {"Q5Linear", "Q6KLinear", "Q4KLinear", "Q8Linear"} <= set(kinds)
    assert (cached.model.model.embed_tokens.codes is cached.model.lm_head) == CASES[case][2]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "another key", "a tensor missing"])
def test_a_damaged_cache_file_is_rebuilt_with_one_line(tmp_path, damage, monkeypatch, capfd):
    checkpoint = import_tiny(tmp_path)
    fresh = outputs(int4_lm(checkpoint))
    (path,) = layouts()
    whole = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(whole[:len(whole) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 64 + whole[64:])
    elif damage == "a tensor missing":  # well-formed, its record whole: found while filling the model
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(layout_cache.PAD)}
        del tensors[next(k for k in tensors if k.startswith("model.layers.1.mlp.down_proj."))]
        layout_cache.save_aligned(tensors, tmp_path / "damaged", metadata)  # not in place: the tensors map `path`
        os.replace(tmp_path / "damaged", path)
    else:  # a well-formed file that says it was built for something else, under this key's name
        other = import_tiny(tmp_path / "other", Q.Q4_0, None)
        outputs(int4_lm(other))
        (other_path,) = [p for p in layouts() if p != path]
        os.replace(other_path, path)
    capfd.readouterr()
    rebuilt = outputs(int4_lm(checkpoint))
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "damaged" in err[0] and path.name in err[0] and "rebuilding" in err[0]
    assert torch.equal(rebuilt, fresh) and path.read_bytes() == whole
    int4_lm(checkpoint)
    assert capfd.readouterr().err == ""  # read back whole: silent


def test_a_changed_checkpoint_is_a_new_file_and_old_ones_age_out(tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(layout_cache, "KEEP", 2)
    checkpoint = import_tiny(tmp_path)
    int4_lm(checkpoint)
    first = layouts()
    for n in range(1, 3):  # the weights rewritten (same size): not the cached model any more
        stat = checkpoint.weight_files[0].stat()
        os.utime(checkpoint.weight_files[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + n * 10**9))
        int4_lm(checkpoint)
    now = layouts()
    assert len(now) == 2 and first[0] not in now  # the least recently used went
    assert capfd.readouterr().err == ""


def test_a_checkpoint_without_blocks_writes_nothing(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", qtype=Q.F16, arch="qwen2", bias=True, scale=0.02)
    arbor_weights.import_gguf(tmp_path / "m.gguf", tmp_path / "out", quiet=True)
    int4_lm(arbor_weights.open_checkpoint(tmp_path / "out"))  # float layers quantized at load, as before
    assert layouts() == []


def test_a_cache_that_cannot_be_written_costs_one_line_not_the_load(tmp_path, monkeypatch, capfd):
    checkpoint = import_tiny(tmp_path)
    fresh = outputs(int4_lm(checkpoint))
    (tmp_path / "a file").write_text("not a directory")
    monkeypatch.setenv(layout_cache.DIR_ENV, str(tmp_path / "a file" / "layouts"))
    capfd.readouterr()
    assert torch.equal(outputs(int4_lm(checkpoint)), fresh)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not keeping the model's CPU layout" in err[0]
