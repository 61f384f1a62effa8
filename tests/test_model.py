"""Model (arbor_cli/model.py), the one door: generation entry points, context and RoPE as arguments,
the out-of-memory fallback."""

import pytest

from arbor_cli.chat import ChatSession
from arbor_cli.generate import GenerationOptions


@pytest.mark.slow
def test_out_of_memory_retries_once_at_the_next_smaller_context_and_says_so(default_model, monkeypatch):
    from arbor_core.errors import OutOfMemoryError

    lm, notices = default_model.lm, []
    real_new_cache = lm.new_cache

    def new_cache(capacity, rope=None):
        if capacity > 4096:
            raise OutOfMemoryError("out of memory (simulated)")
        return real_new_cache(capacity, rope)

    monkeypatch.setattr(lm, "new_cache", new_cache)
    monkeypatch.setattr(default_model, "_scratch_cache", None, raising=False)
    monkeypatch.setattr(default_model, "notify", notices.append)
    # 5,000 answer tokens plan an 8K context; it fails, 4K is tried, and the answer ends where 4K does
    r = default_model.generate("The capital of France is", max_new_tokens=5000, stop=["."])
    assert r.context == 4096 and "Paris" in r.text
    assert len(notices) == 1 and "retrying once at 4,096" in notices[0]
    default_model.context = 4096  # a context the user chose is not silently changed
    try:
        monkeypatch.setattr(lm, "new_cache", lambda capacity, rope=None: (_ for _ in ()).throw(OutOfMemoryError("oom")))
        default_model._scratch_cache = None
        with pytest.raises(OutOfMemoryError):
            default_model.generate("The capital of France is", max_new_tokens=8)
    finally:
        default_model.context = None


@pytest.mark.slow
def test_a_generate_at_another_context_does_not_change_a_live_chats_rope(default_model):
    """A cache knows the RoPE it was built for: a one-shot generation at a scaled context (linear x2
    at 16K) between two chat turns leaves the chat's second turn exactly as without it."""
    opts = GenerationOptions(max_new_tokens=24, ignore_eos=True)
    plain = ChatSession(default_model, options=opts, context=4096)
    "".join(plain.send("Name a fruit that is yellow."))
    expected = "".join(plain.send("And one that is red?"))
    mixed = ChatSession(default_model, options=opts, context=4096)
    "".join(mixed.send("Name a fruit that is yellow."))
    default_model.generate("The capital of France is", max_new_tokens=4, context=16384, rope="linear")
    assert "".join(mixed.send("And one that is red?")) == expected
    assert mixed.last_result.tokens == plain.last_result.tokens


@pytest.mark.slow
def test_score_prompt_gives_the_full_forwards_log_probabilities_of_the_continuation(default_model):
    from arbor_cli.model import negative_log_likelihood

    ids = default_model.tokenizer.encode("The lighthouse keeper lit the lamp. What did the keeper light?")
    full = default_model.logits(ids, context=4096)  # the scoring context's RoPE: plain within 8K
    session = default_model.session(4096)
    default_model.prefill(ids[:8], session)
    scored = default_model.score_prompt(ids[8:], session)
    expected = [-negative_log_likelihood(full[i], ids[i + 1]) for i in range(8, len(ids) - 1)]
    assert len(scored) == len(ids) - 9 and session.cache.length == len(ids) and session.ids == ids
    assert max(abs(a - b) for a, b in zip(scored, expected)) < 1e-3  # the same kernels, rows split differently
