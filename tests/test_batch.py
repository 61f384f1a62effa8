"""Several generations decoded together (arbor_cli/batch.py, Model.stream_many): on a tiny random float32
model on each installed backend, every prompt's answer is the one it gets alone, whatever joins or leaves the
batch beside it. The backends' step itself (logits of rows against each sequence alone) is in
tests/test_backend_contract.py."""

import importlib.util
from types import SimpleNamespace

import pytest

from arbor_cli.backends import backend_module
from arbor_cli.generate import GenerationOptions
from arbor_cli.model import Model
from arbor_core.errors import ContextError

CHUNK = 8
BACKENDS = [pytest.param(name, marks=pytest.mark.skipif(importlib.util.find_spec(name) is None,
                                                        reason=f"{name} not installed")) for name in ("torch", "mlx")]


class WordTokenizer:
    """Token ids as they are; id i is shown as "w<i> "; a chat is its messages' words' ids."""

    eos_ids = [0]

    def encode_chat(self, messages, add_generation_prompt=True):
        return [1] + [3 + sum(map(ord, w)) % 90 for m in messages for w in m["content"].split()] + [2]

    def decode(self, ids):
        return "".join(f"w{i} " for i in ids)

    def stream_decoder(self):
        return SimpleNamespace(push=lambda token: f"w{token} ", flush=lambda: "")


@pytest.fixture(params=BACKENDS)
def model(request, tiny_checkpoint):
    checkpoint = tiny_checkpoint(max_position_embeddings=4096)
    lm = backend_module(request.param).load(checkpoint, "cpu", "float32")
    return Model(checkpoint, lm, WordTokenizer(), request.param, prefill_chunk=CHUNK)


PROMPTS = [list(range(5, 25)), [30, 31], [40, 41, 42, 43, 44], list(range(50, 61)), [70, 71, 72]]


def _tokens(stream) -> list[int]:
    for _ in stream:
        pass
    return stream.result.tokens


def together(model, prompts, options, **kw) -> dict[int, object]:
    results, texts = {}, {}
    for event in model.stream_many(prompts, options, **kw):
        texts[event.index] = texts.get(event.index, "") + event.text
        if event.result is not None:
            assert event.index not in results  # one result per prompt
            results[event.index] = event.result
    for i, result in results.items():
        assert texts[i] == result.text
    return results


def test_greedy_answers_are_each_prompts_own_with_ragged_prompts_and_early_finishes(model):
    options = [GenerationOptions(max_new_tokens=n, ignore_eos=True) for n in (12, 3, 9, 1, 6)]
    want = [_tokens(model.stream(p, o)) for p, o in zip(PROMPTS, options)]
    got = together(model, PROMPTS, options)
    assert [got[i].tokens for i in range(len(PROMPTS))] == want
    assert [got[i].finish_reason for i in range(len(PROMPTS))] == ["length"] * len(PROMPTS)


def test_fewer_slots_than_prompts_reuse_freed_slots(model):
    options = GenerationOptions(max_new_tokens=5, ignore_eos=True)
    want = [_tokens(model.stream(p, options)) for p in PROMPTS]
    got = together(model, PROMPTS, options, parallel=2)
    assert [got[i].tokens for i in range(len(PROMPTS))] == want


def test_each_prompt_samples_with_its_own_options(model):
    options = [GenerationOptions(max_new_tokens=8, temperature=0.9, seed=s, ignore_eos=True) for s in (1, 2, 3)]
    want = [_tokens(model.stream(p, o)) for p, o in zip(PROMPTS, options)]
    got = together(model, PROMPTS[:3], options)
    assert [got[i].tokens for i in range(3)] == want
    assert got[0].tokens != got[1].tokens  # seeds differ


def test_a_stop_string_ends_one_sequence_and_not_the_others(model):
    plain = GenerationOptions(max_new_tokens=10, ignore_eos=True)
    first = _tokens(model.stream(PROMPTS[0], plain))
    stop = GenerationOptions(max_new_tokens=10, ignore_eos=True, stop=(f"w{first[2]} ",))
    got = together(model, PROMPTS[:2], [stop, plain])
    assert got[0].finish_reason == "stop" and got[0].tokens == first[:first.index(first[2]) + 1]
    assert got[1].tokens == _tokens(model.stream(PROMPTS[1], plain)) and got[1].finish_reason == "length"


def test_a_cancelled_sequence_leaves_at_once_and_its_slot_is_taken(model):
    options = GenerationOptions(max_new_tokens=6, ignore_eos=True)
    batch = model.batch(2, 256)
    a = batch.add(PROMPTS[0], options)
    b = batch.add(PROMPTS[1], options)
    batch.step()
    batch.step()
    batch.cancel(a)
    assert batch.free == 1 and a.cancelled and a.result is None
    c = batch.add(PROMPTS[2], options)
    assert c.session is a.session  # the freed slot
    while batch.running:
        batch.step()
    assert b.result.tokens == _tokens(model.stream(PROMPTS[1], options))
    assert c.result.tokens == _tokens(model.stream(PROMPTS[2], options))


def test_a_slot_reuses_the_prefix_its_session_holds(model):
    options = GenerationOptions(max_new_tokens=4, ignore_eos=True)
    batch = model.batch(2, 256)
    first = batch.add(PROMPTS[0], options)
    while batch.running:
        batch.step()
    follow = PROMPTS[0] + first.result.tokens + [90, 91]
    again = batch.add(follow, options)
    assert again.session is first.session
    # where rows change nothing, all it computed (the prompt and every reply token fed back); elsewhere a batched
    # step's positions are not a fresh prefill's, and the session's rule keeps none of them
    held = len(PROMPTS[0]) + len(first.result.tokens) - 1
    assert again.session.reused == (held if model.lm.exact_across_row_counts else 0)
    while batch.running:
        batch.step()
    assert again.result.tokens == _tokens(model.stream(follow, options))


def test_a_prompt_longer_than_a_slot_is_a_context_error(model):
    batch = model.batch(2, 16)
    with pytest.raises(ContextError):
        batch.add(list(range(1, 20)), GenerationOptions())
