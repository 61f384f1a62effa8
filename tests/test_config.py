"""ArborConfig: HF config.json in both rope spellings, validation naming the field."""

import json

import pytest

from arbor_core.config import ArborConfig
from arbor_core.errors import ConfigError

BASE = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0, model_type="llama")


def test_old_and_new_rope_spellings_agree():
    old = ArborConfig.from_dict({**BASE, "rope_scaling": {"type": "linear", "factor": 4.0}})
    new_params = {k: v for k, v in BASE.items() if k != "rope_theta"}
    new = ArborConfig.from_dict({**new_params, "rope_parameters": {"rope_type": "linear", "factor": 4.0,
                                                                   "rope_theta": 10000.0}})
    assert old.rope_scaling == new.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert old.rope_theta == new.rope_theta == 10000.0


def test_default_rope_parameters_mean_no_scaling():
    cfg = ArborConfig.from_dict({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert cfg.rope_scaling is None and cfg.rope_theta == 5e5


def test_roundtrip_through_config_json(tmp_path):
    cfg = ArborConfig.from_dict({**BASE, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}, "custom_key": 7})
    cfg.save(tmp_path / "config.json")
    again = ArborConfig.from_json_file(tmp_path / "config.json")
    assert again == cfg and again.extra["custom_key"] == 7
    assert again.rope_scaling["original_max_position_embeddings"] == 4096
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_transformers_reads_our_config_json(tmp_path):
    transformers = pytest.importorskip("transformers")
    ArborConfig.from_dict({**BASE, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}).save(tmp_path / "config.json")
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf.num_key_value_heads == 2 and hf.hidden_size == 64


@pytest.mark.parametrize("field,value", [
    ("hidden_size", 0), ("num_attention_heads", -1), ("num_key_value_heads", 3), ("rope_theta", 0),
    ("rms_norm_eps", 2.0), ("vocab_size", "many"), ("sliding_window", 0), ("model_type", "gpt_neox"),
])
def test_invalid_fields_are_named(field, value):
    with pytest.raises(ConfigError, match=field):
        ArborConfig.from_dict({**BASE, field: value})


@pytest.mark.parametrize("scaling,field", [
    ({"rope_type": "wavy", "factor": 2.0}, "rope_type"),
    ({"rope_type": "linear", "factor": 0.5}, "factor"),
    ({"rope_type": "llama3", "factor": 8.0}, "low_freq_factor"),
])
def test_invalid_rope_scaling_is_named(scaling, field):
    with pytest.raises(ConfigError, match=field):
        ArborConfig.from_dict({**BASE, "rope_scaling": scaling})


def test_missing_required_field_is_named():
    raw = dict(BASE)
    del raw["intermediate_size"]
    with pytest.raises(ConfigError, match="intermediate_size"):
        ArborConfig.from_dict(raw)


def test_qwen2_has_qkv_bias_and_window_only_when_enabled():
    cfg = ArborConfig.from_dict({**BASE, "model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False})
    assert cfg.attention_bias and not cfg.attention_out_bias and cfg.sliding_window is None
