"""Hugging Face Hub pulls: a snapshot installed once, and what the user is told when it cannot be."""

from __future__ import annotations

import sys

import pytest

import arbor_weights
from arbor_core.errors import ArborError, PullError
from arbor_weights import hub

pytestmark = pytest.mark.usefixtures("arbor_home")


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
