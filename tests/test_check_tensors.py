"""check_tensors: a checkpoint's tensors against the shapes its config implies (both backends load through it)."""

import numpy as np
import pytest

from arbor_core.errors import CorruptModelError
from arbor_weights.checkpoint import IGNORED_KEYS, check_tensors

EXPECTED = {"model.embed_tokens.weight": (10, 4), "model.norm.weight": (4,), "lm_head.weight": (10, 4)}


def full_state() -> dict:
    return {name: np.zeros(shape, dtype=np.float32) for name, shape in EXPECTED.items()}


def test_matching_tensors_pass_through():
    state = full_state()
    assert check_tensors(state, EXPECTED, "/m", tie_word_embeddings=False).keys() == EXPECTED.keys()


def test_derived_tensors_are_dropped():
    state = full_state()
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(2)
    assert IGNORED_KEYS == ("rotary_emb.inv_freq",)
    assert check_tensors(state, EXPECTED, "/m", tie_word_embeddings=False).keys() == EXPECTED.keys()


def test_a_tied_head_is_popped_and_not_required():
    state = full_state()
    kept = check_tensors(state, EXPECTED, "/m", tie_word_embeddings=True)
    assert "lm_head.weight" not in kept
    del state["lm_head.weight"]
    assert check_tensors(state, EXPECTED, "/m", tie_word_embeddings=True).keys() == kept.keys()


def test_a_missing_tensor_is_a_corrupt_model():
    state = full_state()
    del state["model.norm.weight"]
    with pytest.raises(CorruptModelError, match=r"weights in /m do not match its config.json \(missing "
                                                r"\['model.norm.weight'\]\); re-convert or re-download"):
        check_tensors(state, EXPECTED, "/m", tie_word_embeddings=False)


def test_an_unexpected_tensor_is_a_corrupt_model():
    state = full_state()
    state["model.extra.weight"] = np.zeros(3)
    with pytest.raises(CorruptModelError, match=r"\(unexpected \['model.extra.weight'\]\)"):
        check_tensors(state, EXPECTED, "/m", tie_word_embeddings=False)


def test_a_wrong_shape_is_a_corrupt_model():
    state = full_state()
    state["model.norm.weight"] = np.zeros(7)
    with pytest.raises(CorruptModelError, match=r"model.norm.weight has shape \(7,\) in /m, config.json implies "
                                                r"\(4,\); re-convert the model"):
        check_tensors(state, EXPECTED, "/m", tie_word_embeddings=False)
