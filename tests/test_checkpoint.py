"""Opening checkpoints: HF directories in place, every shard, damaged or missing safetensors, pickles refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import arbor_weights
from arbor_core.errors import CorruptModelError, ModelNotFoundError

pytestmark = pytest.mark.usefixtures("arbor_home")


def test_sharded_hf_dir_opens_in_place_with_every_shard(hf_dir):
    shards = json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"].values()
    checkpoint = arbor_weights.open_checkpoint(hf_dir)
    assert len(set(shards)) > 1
    assert checkpoint.weight_files == sorted(hf_dir / s for s in set(shards))
    assert checkpoint.config.hidden_size == 64 and checkpoint.config.num_key_value_heads == 2
    assert checkpoint.source == f"dir:{hf_dir}" and checkpoint.path == hf_dir


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
