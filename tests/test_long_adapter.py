"""The long-context adapter shipped with arbor: a built-in model merged from the default model and
adapters/smollm2-135m-instruct-long, and the model --rope auto loads beyond the trained context when an
adapter is marked for it."""

import json

import pytest

from arbor_core.errors import PullError


def test_the_shipped_adapter_is_whole_and_names_its_base_and_recipe():
    from arbor_weights.registry import KNOWN_ADAPTERS, LONG_VARIANTS
    from arbor_weights.store import sha256_of_file

    [adapter] = KNOWN_ADAPTERS.values()
    assert adapter.base == "smollm2-135m-instruct"
    # measured better than the plain model with YaRN beyond 8K (docs/long-context.md): --rope auto loads it there
    assert adapter.rope_auto and LONG_VARIANTS == {"smollm2-135m-instruct": "smollm2-135m-instruct-long"}
    assert sha256_of_file(adapter.directory / "adapter.safetensors") == adapter.sha256
    meta = json.loads((adapter.directory / "adapter.json").read_text())
    assert meta["base"] == adapter.base and meta["rope_scaling"]["rope_type"] == "yarn"
    assert meta["train"]["seq_len"] == 32768 and meta["rank"] == 16 and meta["rope_scaling"]["factor"] == 16
    assert (adapter.directory / "adapter.safetensors").stat().st_size < 10 << 20  # a few MB


@pytest.mark.slow
def test_the_long_model_is_the_default_model_with_the_adapter_merged(default_checkpoint, arbor_home):
    import numpy as np

    import arbor_weights
    from arbor_weights.adapter import merged_state, read_adapter
    from arbor_weights.grow import read_float_state

    long = arbor_weights.resolve("smollm2-135m-instruct-long", quiet=True)
    assert long.config.rope_scaling == {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 8192}
    adapter = arbor_weights.KNOWN_ADAPTERS["smollm2-135m-instruct-long"]
    expected = merged_state(read_float_state(default_checkpoint), *read_adapter(adapter.directory))
    got = read_float_state(long)
    name = "model.layers.7.self_attn.q_proj.weight"
    assert np.array_equal(got[name], expected[name])
    assert not np.array_equal(got[name], read_float_state(default_checkpoint)[name])  # the adapter did something


@pytest.mark.slow
def test_rope_auto_beyond_the_trained_context_loads_an_adapter_marked_for_it(default_checkpoint, arbor_home,
                                                                              monkeypatch):
    import arbor_cli
    import arbor_weights

    # the shipped adapter is marked: --rope auto beyond 8K loads it, 8K and --rope yarn keep the plain model
    assert arbor_cli.load(context=16384, quiet=True).checkpoint.name == "smollm2-135m-instruct-long"
    assert arbor_cli.load(context=8192, quiet=True).checkpoint.name == "smollm2-135m-instruct"
    assert arbor_cli.load(context=16384, rope="yarn", quiet=True).checkpoint.name == "smollm2-135m-instruct"
    # a model without a marked adapter runs plain with YaRN there
    monkeypatch.delitem(arbor_weights.LONG_VARIANTS, "smollm2-135m-instruct")
    plain = arbor_cli.load(context=16384, quiet=True)
    assert plain.checkpoint.name == "smollm2-135m-instruct"
    assert plain.rope_scaling_for(16384)["rope_type"] == "yarn"


def test_a_changed_adapter_file_is_refused(tmp_path, arbor_home, monkeypatch):
    import shutil

    import arbor_weights
    from arbor_weights import registry

    adapter = registry.KNOWN_ADAPTERS["smollm2-135m-instruct-long"]
    copy = tmp_path / "adapters" / adapter.name
    shutil.copytree(adapter.directory, copy)
    with open(copy / "adapter.safetensors", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x00")
    monkeypatch.setattr(type(adapter), "directory", property(lambda self: copy))
    with pytest.raises(PullError, match="missing or changed"):
        arbor_weights.resolve(adapter.name, quiet=True)
