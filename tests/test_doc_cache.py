"""A document's KV cache on disk (arbor_cli/doc_cache.py) and the backend seam under it
(LoadedModel.export_cache / import_cache), on the tiny random checkpoint, every installed CPU backend."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from arbor_cli import doc_cache
from arbor_cli.backends import backend_module
from arbor_cli.model import Model

BACKENDS = [
    pytest.param("torch", id="torch-cpu",
                 marks=pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed")),
    pytest.param("mlx", id="mlx-cpu",
                 marks=pytest.mark.skipif(importlib.util.find_spec("mlx") is None, reason="mlx not installed")),
]
VOCAB, CAPACITY = 97, 48


def ids(n: int, seed: int = 3) -> list[int]:
    return np.random.default_rng(seed).integers(0, VOCAB, n).tolist()


def host(logits) -> np.ndarray:
    to_host = getattr(logits, "cpu", None)
    return np.asarray(to_host() if callable(to_host) else logits, dtype=np.float32)


def greedy(lm, logits, cache, k: int) -> tuple[list[int], list[np.ndarray]]:
    """k greedy tokens after `logits`, decoding on `cache`: the tokens and every step's logits."""
    tokens, rows = [], []
    for _ in range(k):
        row = host(logits)
        rows.append(row)
        tokens.append(int(row.argmax()))
        logits = lm.decode(tokens[-1], cache)
    return tokens, rows


def make_model(tiny_checkpoint, backend: str, kv_bits: int = 16, dtype: str = "float32", seed: int = 0,
               **over) -> Model:
    checkpoint = tiny_checkpoint(seed=seed, **over)
    lm = backend_module(backend).load(checkpoint, "cpu", dtype, kv_bits=kv_bits)
    return Model(checkpoint, lm, None, backend)


# ---- the backend seam --------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kv_bits,dtype", [(16, "float32"), (8, "float32"), (16, "bfloat16")])
def test_an_imported_cache_decodes_exactly_as_the_original(tiny_checkpoint, backend, kv_bits, dtype):
    model = make_model(tiny_checkpoint, backend, kv_bits, dtype)
    lm, rope = model.lm, model.rope_tables(CAPACITY)
    original = lm.new_cache(CAPACITY, rope)
    last = lm.prefill(ids(21), original, 8)
    arrays = lm.export_cache(original)
    c = model.config
    assert int(arrays["length"][0]) == 21
    assert arrays["k"].shape == (c.num_hidden_layers, c.num_key_value_heads, 21, c.head_dim)
    assert arrays["k"].dtype == {8: np.int8, 16: np.uint16 if dtype == "bfloat16" else np.float32}[kv_bits]
    assert ("k_scale" in arrays) == (kv_bits == 8)
    copy = lm.import_cache(arrays, CAPACITY, rope)
    assert copy.length == 21 and copy.capacity == CAPACITY
    expected_tokens, expected_rows = greedy(lm, last, original, 6)
    tokens, rows = greedy(lm, last, copy, 6)
    assert tokens == expected_tokens
    for row, expected in zip(rows, expected_rows):
        np.testing.assert_array_equal(row, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_import_refuses_arrays_of_another_shape_or_kv_bits(tiny_checkpoint, backend):
    model16 = make_model(tiny_checkpoint, backend, 16)
    model8 = make_model(tiny_checkpoint, backend, 8)
    cache = model16.new_cache(CAPACITY)
    model16.lm.prefill(ids(5), cache, 8)
    arrays = model16.lm.export_cache(cache)
    with pytest.raises(ValueError):
        model8.lm.import_cache(arrays, CAPACITY, model8.rope_tables(CAPACITY))
    with pytest.raises(ValueError):
        model16.lm.import_cache({**arrays, "length": np.array([4], dtype=np.int64)}, CAPACITY)
    with pytest.raises(ValueError):
        model16.lm.import_cache(arrays, 4)  # more positions than the new cache holds


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_ring_cache_is_not_supported_yet(tiny_checkpoint, backend):
    model = make_model(tiny_checkpoint, backend, sliding_window=9)
    model.lm.prefill_chunk = 7
    cache = model.lm.new_cache(CAPACITY)
    assert cache.slots < cache.capacity
    with pytest.raises(NotImplementedError, match="ring"):
        model.lm.export_cache(cache)


# ---- the store ---------------------------------------------------------------------------------
@pytest.fixture
def store(arbor_home, monkeypatch):
    monkeypatch.delenv("ARBOR_DOC_CACHE_MB", raising=False)
    return arbor_home / "doc-cache"


@pytest.fixture
def torch_model(tiny_checkpoint):
    pytest.importorskip("torch")
    return make_model(tiny_checkpoint, "torch")


def prefilled(model: Model, doc: list[int], context: int = CAPACITY):
    cache = model.new_cache(context)
    logits = model.lm.prefill(doc, cache, 8)
    return cache, logits


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kv_bits,dtype", [(16, "float32"), (8, "float32"), (16, "bfloat16")])
def test_save_then_load_gives_the_continuation_of_the_document_as_kept(store, tiny_checkpoint, backend, kv_bits,
                                                                        dtype):
    """The first question reads the document as it is kept (as_kept), so a later one, loading it, continues
    exactly as the first did; in 16 bits, close to the float32 prefill."""
    model = make_model(tiny_checkpoint, backend, kv_bits, dtype)
    doc, question = ids(30), ids(4, seed=9)
    key = doc_cache.key_for(model, doc, CAPACITY, "auto")
    assert doc_cache.load(model, key, CAPACITY) is None
    cache, _ = prefilled(model, doc)
    held, arrays = doc_cache.as_kept(model, cache)
    assert doc_cache.save(model, key, held, arrays=arrays)
    assert (store / f"{doc_cache.entry_name(key)}.safetensors").is_file()
    loaded = doc_cache.load(model, key, CAPACITY)
    assert loaded is not None and loaded.length == 30
    expected = greedy(model.lm, model.lm.prefill(question, held, 8), held, 4)
    got = greedy(model.lm, model.lm.prefill(question, loaded, 8), loaded, 4)
    assert got[0] == expected[0]
    np.testing.assert_array_equal(np.stack(got[1]), np.stack(expected[1]))
    fresh, _ = prefilled(model, doc)  # `cache` is `held` where keeping did not narrow it, and ran on
    original = greedy(model.lm, model.lm.prefill(question, fresh, 8), fresh, 4)
    assert got[0] == original[0]
    np.testing.assert_allclose(np.stack(got[1]), np.stack(original[1]), atol=2e-2 if dtype == "float32" else 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kv_bits,dtype,kept", [(16, "float32", np.float16), (8, "float32", np.int8),
                                                (16, "bfloat16", np.uint16)])
def test_keys_and_values_are_kept_in_16_bits_or_as_compact_as_exported(store, tiny_checkpoint, backend, kv_bits,
                                                                        dtype, kept):
    model = make_model(tiny_checkpoint, backend, kv_bits, dtype)
    doc = ids(30)
    cache, _ = prefilled(model, doc)
    exported = model.export_cache(cache)
    held, arrays = doc_cache.as_kept(model, cache)
    assert arrays["k"].dtype == arrays["v"].dtype == kept
    assert (held is not cache) == (kept == np.float16)  # a new cache only where keeping narrowed it
    if kept == np.float16:
        np.testing.assert_array_equal(arrays["k"], exported["k"].astype(np.float16))
        assert model.export_cache(held)["k"].dtype == np.float32  # the cache is float32 still, holding 16-bit values
        np.testing.assert_array_equal(model.export_cache(held)["k"], arrays["k"].astype(np.float32))
    else:
        for name in exported:
            np.testing.assert_array_equal(arrays[name], exported[name])
    key = doc_cache.key_for(model, doc, CAPACITY, "auto")
    assert doc_cache.save(model, key, cache)  # without arrays: kept the same way
    path = store / f"{doc_cache.entry_name(key)}.safetensors"
    metadata, on_disk = doc_cache.read_mapped(path)
    assert on_disk["k"].dtype == kept and metadata["checksum"] == doc_cache.checksum(arrays)
    tensor_bytes = sum(a.nbytes for a in on_disk.values())
    assert tensor_bytes == sum(a.nbytes for a in arrays.values())
    assert tensor_bytes - 8 == doc_cache.kept_bytes_per_token(model) * len(doc)  # what the cap is checked against
    if kept == np.float16:
        assert tensor_bytes < 0.51 * sum(a.nbytes for a in exported.values())


def test_a_value_beyond_float16_keeps_its_array_in_float32(torch_model, monkeypatch):
    cache, _ = prefilled(torch_model, ids(20))
    real = torch_model.export_cache

    def huge(c):
        arrays = real(c)
        arrays["k"][0, 0, 0, 0] = 1e6
        return arrays

    monkeypatch.setattr(torch_model, "export_cache", huge)
    arrays, narrowed = doc_cache.kept(torch_model, cache)
    assert arrays["k"].dtype == np.float32 and arrays["k"][0, 0, 0, 0] == 1e6
    assert arrays["v"].dtype == np.float16 and narrowed


def test_an_entry_is_read_memory_mapped(store, torch_model):
    doc = ids(20)
    key = doc_cache.key_for(torch_model, doc, CAPACITY, "auto")
    assert doc_cache.save(torch_model, key, prefilled(torch_model, doc)[0])
    metadata, arrays = doc_cache.read_mapped(store / f"{doc_cache.entry_name(key)}.safetensors")
    import mmap

    for a in arrays.values():
        assert not a.flags.writeable and not a.flags.owndata
        base = a
        while isinstance(base, np.ndarray):
            base = base.base
        assert isinstance(getattr(base, "obj", base), mmap.mmap)  # a view of the file's pages, not a copy
    assert metadata["format_version"] == str(doc_cache.FORMAT_VERSION)


def test_another_document_model_or_context_is_another_entry(store, tiny_checkpoint, torch_model):
    doc = ids(20)
    key = doc_cache.key_for(torch_model, doc, CAPACITY, "auto")
    other_model = make_model(tiny_checkpoint, "torch", seed=1)
    others = [doc_cache.key_for(torch_model, ids(20, seed=4), CAPACITY, "auto"),
              doc_cache.key_for(torch_model, doc, 64, "auto"),
              doc_cache.key_for(torch_model, doc, CAPACITY, "linear"),
              doc_cache.key_for(other_model, doc, CAPACITY, "auto"),
              doc_cache.key_for(make_model(tiny_checkpoint, "torch", kv_bits=8), doc, CAPACITY, "auto")]
    names = {doc_cache.entry_name(k) for k in [key, *others]}
    assert len(names) == 6
    assert doc_cache.key_for(torch_model, list(doc), CAPACITY, "auto") == key  # the same inputs: the same key
    cache, _ = prefilled(torch_model, doc)
    assert doc_cache.save(torch_model, key, cache)
    for k in others[:2]:
        assert doc_cache.load(torch_model, k, k["context"]) is None
    assert doc_cache.load(torch_model, key, CAPACITY) is not None
    with pytest.raises(ValueError):  # a cache that is not the key's document is the caller's mistake
        doc_cache.save(torch_model, others[1], cache)


def test_a_truncated_file_is_a_notice_and_is_deleted(store, torch_model, capsys):
    doc = ids(20)
    key = doc_cache.key_for(torch_model, doc, CAPACITY, "auto")
    assert doc_cache.save(torch_model, key, prefilled(torch_model, doc)[0])
    path = store / f"{doc_cache.entry_name(key)}.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    capsys.readouterr()
    assert doc_cache.load(torch_model, key, CAPACITY) is None
    err = capsys.readouterr().err
    assert "unreadable" in err and "rebuilding" in err and len(err.strip().splitlines()) == 1
    assert not path.exists()
    path.write_bytes(b"not a safetensors file")
    assert doc_cache.load(torch_model, key, CAPACITY) is None
    assert not path.exists()


def tensor_bytes(path) -> tuple[int, int]:
    """Where an entry's tensor bytes begin and end in its file (after safetensors' 8-byte length and header)."""
    data = path.read_bytes()
    return 8 + int.from_bytes(data[:8], "little"), len(data)


@pytest.mark.parametrize("damage", ["middle third 0xFF", "one bit", "a float16 value changed"])
def test_a_damaged_entry_is_a_notice_deleted_and_rebuilt(store, torch_model, capsys, damage):
    """Issue 31: a damaged entry whose header still reads was trusted (its NaNs answered `<|endoftext|>`)."""
    doc = ids(20)
    key = doc_cache.key_for(torch_model, doc, CAPACITY, "auto")
    assert doc_cache.save(torch_model, key, prefilled(torch_model, doc)[0])
    path = store / f"{doc_cache.entry_name(key)}.safetensors"
    begin, end = tensor_bytes(path)
    data = bytearray(path.read_bytes())
    third = (end - begin) // 3
    if damage == "middle third 0xFF":
        data[begin + third:begin + 2 * third] = b"\xff" * third
    elif damage == "one bit":
        data[begin + (end - begin) // 2] ^= 0x01
    else:  # a finite value, so no NaN check could see it
        metadata, arrays = doc_cache.read_mapped(path)
        k = np.array(arrays["k"])
        k[0, 0, 5, 3] = np.float16(k[0, 0, 5, 3] + 1)
        at = path.read_bytes().index(arrays["k"].tobytes())
        data[at:at + k.nbytes] = k.tobytes()
    path.write_bytes(bytes(data))
    capsys.readouterr()
    assert doc_cache.load(torch_model, key, CAPACITY) is None
    err = capsys.readouterr().err
    assert "is damaged (its checksum does not match); rebuilding" in err and len(err.strip().splitlines()) == 1
    assert not path.exists()
    assert doc_cache.save(torch_model, key, prefilled(torch_model, doc)[0])  # the next question keeps it again
    assert doc_cache.load(torch_model, key, CAPACITY) is not None


def test_an_entry_of_the_float32_format_is_rebuilt_with_a_notice(store, torch_model, capsys):
    """Format 1 kept float32 arrays and no checksum, under the name of its key: found, named, never read."""
    import hashlib

    from safetensors.numpy import save_file

    doc = ids(20)
    key = doc_cache.key_for(torch_model, doc, CAPACITY, "auto")
    old_key = {**key, "format": 1}
    old_name = hashlib.sha256(json.dumps(old_key, sort_keys=True).encode()).hexdigest()[:16]  # format 1's entry_name
    assert doc_cache.entry_name(key) == old_name
    store.mkdir(parents=True)
    path = store / f"{old_name}.safetensors"
    save_file(torch_model.export_cache(prefilled(torch_model, doc)[0]), str(path),
              metadata={"format_version": "1", **{k: json.dumps(v, sort_keys=True) for k, v in old_key.items()}})
    capsys.readouterr()
    assert doc_cache.load(torch_model, key, CAPACITY) is None
    err = capsys.readouterr().err
    assert "was written by another version of arbor (format 1, this one reads 2); rebuilding" in err
    assert len(err.strip().splitlines()) == 1 and not path.exists()


def test_a_damaged_cache_never_condemns_the_compiled_decode_step(tmp_path, monkeypatch, capfd):
    """Issue 31: NaNs from a damaged cache made the compiled step's first check fail and its file deleted. A
    check whose eager reference is not finite judges nothing: that step runs eager, the file stays, and the
    library is checked (and used) at the first step with finite inputs. No compiler needed: the library here
    is the eager step itself."""
    pytest.importorskip("torch")
    from test_compiled_decode import quantized_tiny

    monkeypatch.setenv("ARBOR_COMPILE", "sync")  # checked at the first step
    lm = quantized_tiny()
    compiled = lm.compiled
    assert compiled is not None
    library = tmp_path / "decode-test.pt2"
    library.write_bytes(b"the compiled step")
    calls = []

    def run(inputs):
        calls.append(1)
        return compiled.step_module(*inputs[len(compiled.weight_list):])

    monkeypatch.setattr(compiled, "_prepare", lambda inputs: (run, library))
    damaged = lm.new_cache(64)
    lm.prefill([3, 17, 42, 5], damaged, 512)
    damaged.stacked_k[:, :, 1:3] = float("nan")  # what 0xFF bytes read as
    capfd.readouterr()
    lm.decode(7, damaged)
    assert library.exists() and not compiled.off and compiled.run is None and not calls
    assert "failed its check" not in capfd.readouterr().err
    good = lm.new_cache(64)
    lm.prefill([3, 17, 42, 5], good, 512)
    lm.decode(7, good)
    assert compiled.run is run and library.exists() and calls  # checked on finite inputs, then used


def test_a_file_with_a_foreign_key_is_a_notice_and_is_deleted(store, torch_model, capsys):
    doc, other = ids(20), ids(20, seed=5)
    key, foreign = (doc_cache.key_for(torch_model, d, CAPACITY, "auto") for d in (doc, other))
    assert doc_cache.save(torch_model, foreign, prefilled(torch_model, other)[0])
    path = store / f"{doc_cache.entry_name(key)}.safetensors"
    os.replace(store / f"{doc_cache.entry_name(foreign)}.safetensors", path)  # another document under this name
    capsys.readouterr()
    assert doc_cache.load(torch_model, key, CAPACITY) is None
    err = capsys.readouterr().err
    assert "another model/document" in err and len(err.strip().splitlines()) == 1
    assert not path.exists()


def test_an_unwritable_directory_is_a_warning_not_an_error(store, torch_model, capsys, monkeypatch):
    doc = ids(20)
    key = doc_cache.key_for(torch_model, doc, CAPACITY, "auto")
    cache, _ = prefilled(torch_model, doc)
    store.mkdir(parents=True)
    if os.geteuid() == 0:  # root writes through a 0o500 directory: a full disk instead
        def full(*_):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(doc_cache.os, "replace", full)
    else:
        store.chmod(0o500)
    try:
        assert doc_cache.save(torch_model, key, cache) is False
    finally:
        store.chmod(0o700)
    err = capsys.readouterr().err.strip()
    assert err.startswith("arbor: could not keep the document's cache (") and len(err.splitlines()) == 1
    assert "the next question prefills it again" in err
    assert doc_cache.entries() == [] and list(store.iterdir()) == []


@pytest.mark.parametrize("how", ["a file where the directory goes", "safetensors' own I/O error"])
def test_a_failed_write_is_a_warning_not_an_error(store, torch_model, capsys, monkeypatch, how):
    import safetensors.numpy
    from safetensors import SafetensorError

    doc = ids(20)
    key = doc_cache.key_for(torch_model, doc, CAPACITY, "auto")
    cache, _ = prefilled(torch_model, doc)
    if how.startswith("a file"):
        store.parent.mkdir(parents=True)
        store.write_text("in the way")
    else:
        def full(arrays, filename, metadata=None):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28) "
                                  f"at path {filename}")
        monkeypatch.setattr(safetensors.numpy, "save_file", full)
    assert doc_cache.save(torch_model, key, cache) is False
    err = capsys.readouterr().err.strip()
    assert err.startswith("arbor: could not keep the document's cache (") and len(err.splitlines()) == 1
    if not how.startswith("a file"):
        assert "(No space left on device (os error 28));" in err
    assert doc_cache.entries() == [] and doc_cache.load(torch_model, key, CAPACITY) is None


def test_ctrl_c_during_the_write_leaves_no_entry(store, torch_model, monkeypatch):
    import safetensors.numpy

    doc = ids(20)
    key = doc_cache.key_for(torch_model, doc, CAPACITY, "auto")
    cache, _ = prefilled(torch_model, doc)
    real = safetensors.numpy.save_file

    def interrupted(arrays, filename, metadata=None):
        real(arrays, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(64)  # half written
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.numpy, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        doc_cache.save(torch_model, key, cache)
    assert list(store.iterdir()) == []
    assert doc_cache.load(torch_model, key, CAPACITY) is None


def test_eviction_keeps_the_most_recently_used_under_the_cap(store, torch_model, monkeypatch):
    docs = [ids(20, seed=s) for s in range(4)]
    keys = [doc_cache.key_for(torch_model, d, CAPACITY, "auto") for d in docs]
    for d, k in zip(docs[:2], keys):
        assert doc_cache.save(torch_model, k, prefilled(torch_model, d)[0])
    size = (store / f"{doc_cache.entry_name(keys[0])}.safetensors").stat().st_size
    names = [doc_cache.entry_name(k) for k in keys]
    old = os.stat(store / f"{names[0]}.safetensors").st_mtime - 100
    os.utime(store / f"{names[0]}.safetensors", (old, old))
    os.utime(store / f"{names[1]}.safetensors", (old + 10, old + 10))
    assert doc_cache.load(torch_model, keys[0], CAPACITY) is not None  # used: now the newest of the two
    monkeypatch.setenv("ARBOR_DOC_CACHE_MB", str(2.5 * size / 1e6))  # room for two entries
    assert doc_cache.save(torch_model, keys[2], prefilled(torch_model, docs[2])[0])
    assert sorted(e["name"] for e in doc_cache.entries()) == sorted([names[0], names[2]])
    monkeypatch.setenv("ARBOR_DOC_CACHE_MB", str(0.5 * size / 1e6))  # smaller than one entry: the new one stays
    assert doc_cache.save(torch_model, keys[3], prefilled(torch_model, docs[3])[0])
    assert [e["name"] for e in doc_cache.entries()] == [names[3]]


def test_eviction_spares_the_entries_of_the_document_being_read(store, torch_model, monkeypatch):
    """A document whose parts fit the cap only just: keeping its last part evicts another document's entry,
    never its own first part (LRU alone would, and every later question would prefill the document again)."""
    docs = [ids(20, seed=s) for s in range(3)]
    keys = [doc_cache.key_for(torch_model, d, CAPACITY, "auto") for d in docs]
    names = [doc_cache.entry_name(k) for k in keys]
    assert doc_cache.save(torch_model, keys[0], prefilled(torch_model, docs[0])[0])  # another document, older
    assert doc_cache.save(torch_model, keys[1], prefilled(torch_model, docs[1])[0])  # this document's part 1
    size = (store / f"{names[0]}.safetensors").stat().st_size
    old = os.stat(store / f"{names[0]}.safetensors").st_mtime
    os.utime(store / f"{names[1]}.safetensors", (old - 100, old - 100))  # part 1 is now the least recently used
    monkeypatch.setenv("ARBOR_DOC_CACHE_MB", str(2.5 * size / 1e6))  # room for two entries
    assert doc_cache.save(torch_model, keys[2], prefilled(torch_model, docs[2])[0], in_use={names[1]})
    assert sorted(e["name"] for e in doc_cache.entries()) == sorted([names[1], names[2]])


def test_entries_remove_and_clear(store, torch_model):
    doc = ids(20)
    key = doc_cache.key_for(torch_model, doc, CAPACITY, "auto")
    assert doc_cache.entries() == [] and doc_cache.clear() == 0
    assert doc_cache.save(torch_model, key, prefilled(torch_model, doc)[0])
    [row] = doc_cache.entries()
    assert row["name"] == doc_cache.entry_name(key)
    assert row["document"] == key["document_sha256"][:12]
    assert (row["model"], row["tokens"], row["context"], row["kv_bits"]) == (key["model"], 20, CAPACITY, 16)
    assert row["bytes"] > 0 and row["last_used"].endswith("Z")
    assert doc_cache.remove("nope") is False and doc_cache.remove("../x") is False
    assert doc_cache.remove(row["name"]) is True and doc_cache.entries() == []
    assert doc_cache.save(torch_model, key, prefilled(torch_model, doc)[0])
    assert doc_cache.clear() == 1 and doc_cache.entries() == []


# ---- `arbor cache` -----------------------------------------------------------------------------
def test_arbor_cache_ls_rm_clear(store, torch_model):
    from arbor_cli.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["cache", "ls"])
    assert result.exit_code == 0 and "no document caches" in result.output
    doc = ids(20)
    key = doc_cache.key_for(torch_model, doc, CAPACITY, "auto")
    assert doc_cache.save(torch_model, key, prefilled(torch_model, doc)[0])
    name = doc_cache.entry_name(key)
    result = runner.invoke(app, ["cache", "ls"])
    assert result.exit_code == 0 and name in result.output and key["document_sha256"][:12] in result.output
    result = runner.invoke(app, ["cache", "ls", "--json"])
    assert result.exit_code == 0 and [r["name"] for r in json.loads(result.stdout)] == [name]
    result = runner.invoke(app, ["cache", "rm", "nope"])
    assert result.exit_code == 1 and "no document cache named 'nope'" in result.output
    result = runner.invoke(app, ["cache", "rm", name])
    assert result.exit_code == 0 and doc_cache.entries() == []
    assert doc_cache.save(torch_model, key, prefilled(torch_model, doc)[0])
    result = runner.invoke(app, ["cache", "clear"])
    assert result.exit_code == 0 and "removed 1" in result.output and doc_cache.entries() == []
