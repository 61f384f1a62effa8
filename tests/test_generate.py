"""Generation options, stop strings and the decode loop, on a fake backend and tokenizer."""

import pytest
from conftest import FakeCache, FakeRuntime

from arbor_cli.generate import GenerationOptions, GenerationStream, StopFilter, stream_generation
from arbor_core.errors import UsageError


@pytest.mark.parametrize("bad", [
    dict(max_new_tokens=0), dict(max_new_tokens=-5), dict(max_new_tokens=10**9), dict(temperature=-0.1),
    dict(temperature=float("nan")), dict(temperature=1e9), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
    dict(seed=-3), dict(stop=[""]),
])
def test_bad_sampling_values_are_usage_errors(bad):
    with pytest.raises(UsageError):
        GenerationOptions.build(**bad)


def test_stop_filter_holds_back_a_possible_stop_prefix():
    f = StopFilter(("</end>",))
    assert f.push("hello </") == "hello "
    assert f.push("en") == ""
    assert f.push("x more") == "</enx more"
    assert f.push(" and </end> tail") == " and "
    assert f.stopped


def test_stop_filter_picks_the_earliest_stop():
    f = StopFilter(("B", "A"))
    assert f.push("xxAyyB") == "xx"


class LetterTokenizer:
    """Token t decodes to the t-th letter; 0 is the end of sequence."""

    eos_ids = [0]

    class Decoder:
        def push(self, t):
            return chr(ord("a") + t - 1)

        def flush(self):
            return ""

    def stream_decoder(self):
        return self.Decoder()


def run(script, opts, capacity=100):
    done = {}
    pieces = list(stream_generation(FakeRuntime(script), LetterTokenizer(), FakeCache(capacity), [9, 9], opts,
                                    on_done=lambda r: done.setdefault("r", r)))
    return "".join(pieces), done["r"]


def test_generation_ends_at_eos_without_emitting_it():
    text, r = run([1, 2, 3, 0, 4], GenerationOptions())
    assert text == "abc" and r.finish_reason == "eos" and r.tokens == [1, 2, 3]


def test_ignore_eos_generates_through_it():
    text, r = run([1, 0, 2, 3], GenerationOptions(max_new_tokens=4, ignore_eos=True))
    assert r.tokens == [1, 0, 2, 3] and r.finish_reason == "length"


def test_max_new_tokens_is_exact():
    text, r = run([1] * 10, GenerationOptions(max_new_tokens=4))
    assert r.tokens == [1, 1, 1, 1] and r.finish_reason == "length"


def test_stop_string_ends_generation_and_is_not_returned():
    text, r = run([1, 2, 3, 4, 5], GenerationOptions(stop=("cd",)))
    assert text == "ab" and r.text == "ab" and r.finish_reason == "stop"


def test_cache_room_bounds_generation():
    text, r = run([1] * 20, GenerationOptions(max_new_tokens=50), capacity=7)
    assert len(r.tokens) == 5 and r.finish_reason == "length"


def test_timings_are_reported():
    _, r = run([1, 2, 0], GenerationOptions())
    assert r.timings["prompt_tokens"] == 2 and r.timings["generated_tokens"] == 2


def test_a_stream_can_be_peeked_then_read_on():
    tokens: list[int] = []
    stream = GenerationStream(stream_generation(FakeRuntime([1, 2, 3, 0]), LetterTokenizer(), FakeCache(100), [9, 9],
                                                GenerationOptions(), generated=tokens), tokens)
    first = next(iter(stream))
    rest = "".join(stream)
    assert first + rest == "abc" and stream.result.text == "abc" and stream.tokens == [1, 2, 3]
