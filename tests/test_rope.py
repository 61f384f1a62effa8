"""The RoPE policy (arbor_cli/rope.py): which method runs at a context, and what it amounts to.
The tables themselves are checked against transformers in tests/reference/test_rope_parity.py."""

from types import SimpleNamespace

from arbor_core.rope import AUTO_METHOD, describe_scaling, method_for_context


def test_auto_is_plain_rope_within_the_trained_context_and_the_chosen_method_beyond():
    config = SimpleNamespace(trained_context=8192, rope_scaling=None)
    assert method_for_context(config, 8192) == "none"
    assert method_for_context(config, 16384) == AUTO_METHOD
    assert describe_scaling(config, 16384, "yarn") == "yarn x2"
    assert describe_scaling(config, 4096, "linear") == "none"
