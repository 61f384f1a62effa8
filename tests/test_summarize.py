"""Summarize: chunking, the one-pass / map-reduce decision, recursive reduce, OOM retry, JSON shape.

A fake tokenizer (one token per word or punctuation mark) and a fake model that records its
prompts keep these fast; the real default model is exercised in test_cli_summarize.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from arbor_cli.errors import ContextError, OutOfMemoryError, UsageError
from arbor_cli.generate import GenerationResult
from arbor_cli.planner import BUCKETS
from arbor_cli.summarize import (Summary, SummaryOptions, clean_summary, shape_summary, split_into_chunks, summarize,
                                 tokens_for_words)

WORD = re.compile(r"\w+|[^\w\s]")


def count_words(text: str) -> int:
    return len(WORD.findall(text))


class FakeTokenizer:
    """One token per word or punctuation mark; chat messages cost their words plus 4 per message."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [1] * count_words(text)

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
        return [1] * sum(count_words(m["content"]) + 4 for m in messages)


@dataclass
class FakePlan:
    context: int
    needed_tokens: int
    trained_context: int = 4096


class FakeModel:
    """Plans like the real planner over BUCKETS up to `largest`; chat answers from a script and records prompts."""

    def __init__(self, largest: int = 4096, answer=None, oom_above: int | None = None, context: int | None = None):
        self.tokenizer = FakeTokenizer()
        self.largest = largest
        self.context = context
        self.answer = answer or (lambda prompt: "Bees make honey. Volcanoes erupt.")
        self.oom_above = oom_above
        self.prompts: list[str] = []
        self.max_new: list[int] = []
        self.plans: list[tuple[int, int | None]] = []
        self.notices: list[str] = []
        self.notify = self.notices.append

    def plan(self, needed_tokens: int, requested: int | None = None) -> FakePlan:
        requested = self.context if requested is None else requested
        self.plans.append((needed_tokens, requested))
        if requested is not None:
            return FakePlan(requested, needed_tokens)
        fitting = [b for b in BUCKETS if b <= self.largest]
        holding = [b for b in fitting if b >= needed_tokens]
        return FakePlan(holding[0] if holding else fitting[-1], needed_tokens)

    def rope_scaling_for(self, context: int):
        return {"rope_type": "linear", "factor": context / 4096} if context > 4096 else None

    def chat(self, messages, stream=False, max_new_tokens=256, temperature=0.0, **_):
        prompt = messages[-1]["content"]
        needed = sum(count_words(m["content"]) + 4 for m in messages) + max_new_tokens
        capacity = self.context or self.plan(needed).context
        assert needed <= capacity, f"a prompt of {needed} tokens overflows a {capacity}-token context"
        if self.oom_above is not None and capacity > self.oom_above:
            raise OutOfMemoryError("out of memory (fake)")
        assert temperature == 0.0
        self.prompts.append(prompt)
        self.max_new.append(max_new_tokens)
        text = self.answer(prompt)
        timings = {"prompt_tokens": needed - max_new_tokens, "generated_tokens": count_words(text),
                   "prefill_s": 0.01, "decode_s": 0.02}
        return GenerationResult(text, [1] * count_words(text), "eos", timings, capacity)


def document(paragraphs: int, sentences: int = 5, words: int = 12) -> str:
    """Paragraphs of numbered sentences, so any piece of text says where it came from."""
    out = []
    for p in range(paragraphs):
        out.append(" ".join(" ".join(f"p{p}s{s}w{w}" for w in range(words)) + "." for s in range(sentences)))
    return "\n\n".join(out)


def chunk_texts(text: str, chunks) -> list[str]:
    return [c.text_of(text) for c in chunks]


# ---- chunking -----------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [40, 100, 333, 1000])
def test_chunks_never_exceed_the_token_budget(budget):
    text = document(30)
    for piece in chunk_texts(text, split_into_chunks(text, count_words, budget)):
        assert count_words(piece) <= budget


def test_chunks_cover_all_text_in_order():
    text = document(40)
    chunks = split_into_chunks(text, count_words, 200)
    assert chunks[0].start == 0 and chunks[-1].end == len(text)
    rebuilt = text[:chunks[0].end]
    for before, chunk in zip(chunks, chunks[1:]):
        assert chunk.start < before.end  # overlaps, never skips
        assert chunk.start + chunk.overlap == before.end
        rebuilt += text[before.end:chunk.end]
    assert rebuilt == text


def test_chunks_after_the_first_begin_with_the_end_of_the_one_before():
    text = document(40)
    chunks = split_into_chunks(text, count_words, 200, overlap=30)
    for before, chunk in zip(chunks, chunks[1:]):
        repeated = text[chunk.start:chunk.start + chunk.overlap]
        assert 0 < count_words(repeated) <= 30
        assert before.text_of(text).endswith(repeated.strip())


def test_chunks_end_on_paragraph_breaks_when_paragraphs_fit():
    text = document(20)  # paragraphs of 5 x 13 = 65 tokens
    chunks = split_into_chunks(text, count_words, 200, overlap=0)
    for chunk in chunks[:-1]:
        assert text[chunk.end - 2:chunk.end] == "\n\n"


def test_chunks_end_on_sentence_ends_when_a_paragraph_is_longer_than_a_chunk():
    text = document(3, sentences=40)  # paragraphs of 520 tokens
    chunks = split_into_chunks(text, count_words, 100)
    for piece in chunk_texts(text, chunks):
        assert piece.endswith(".")
        assert count_words(piece) <= 100


def test_a_single_giant_sentence_is_cut_between_words():
    text = " ".join(f"w{i}" for i in range(5000))  # no punctuation, no paragraph breaks
    chunks = split_into_chunks(text, count_words, 300)
    pieces = chunk_texts(text, chunks)
    assert len(chunks) >= 5000 // 300
    assert all(count_words(p) <= 300 for p in pieces)
    assert all(re.fullmatch(r"(w\d+ ?)+", p) for p in pieces)  # whole words only
    assert pieces[0].startswith("w0 ") and pieces[-1].endswith("w4999")
    assert all(c.overlap > 0 for c in chunks[1:])


def test_a_single_giant_word_is_cut_inside_it():
    text = "x" * 500
    counting_chars = len  # one token per character
    chunks = split_into_chunks(text, counting_chars, 64)
    assert all(len(p) <= 64 for p in chunk_texts(text, chunks))
    assert chunks[-1].end == len(text)


def test_a_short_text_is_one_chunk():
    text = "Bees make honey. Volcanoes erupt."
    chunks = split_into_chunks(text, count_words, 100)
    assert len(chunks) == 1 and chunks[0].text_of(text) == text


# ---- options ------------------------------------------------------------------------------
@pytest.mark.parametrize("words, style", [(0, "paragraph"), (-3, "paragraph"), (10**6, "paragraph"),
                                          (True, "paragraph"), (100, "poem"), (100, "")])
def test_bad_words_or_style_are_usage_errors(words, style):
    with pytest.raises(UsageError):
        SummaryOptions.build(words, style)


def test_answer_length_follows_words_and_stays_bounded():
    assert tokens_for_words(10) < tokens_for_words(100) < tokens_for_words(1000)
    assert tokens_for_words(100) <= 200


# ---- one pass or map-reduce ---------------------------------------------------------------
def test_a_document_that_fits_is_summarised_in_one_pass():
    model = FakeModel(largest=4096)
    text = document(10)  # ~650 tokens
    summary = summarize(model, text, SummaryOptions.build(100))
    assert summary.chunks == 1
    assert len(model.prompts) == 1
    assert text.strip() in model.prompts[0]
    assert summary.context == 4096


def test_a_document_that_does_not_fit_is_mapped_then_reduced():
    model = FakeModel(largest=4096)
    text = document(150)  # ~9,750 tokens
    summary = summarize(model, text, SummaryOptions.build(100))
    assert summary.chunks >= 3
    maps = [p for p in model.prompts if "part " in p and " of " in p]
    assert len(maps) == summary.chunks
    assert f"part 1 of {summary.chunks}" in maps[0] and f"part {summary.chunks} of {summary.chunks}" in maps[-1]
    assert "notes on the parts" in model.prompts[-1]
    assert len(model.prompts) == summary.chunks + 1


def test_the_planner_picks_a_bigger_context_for_one_pass_when_memory_allows():
    model = FakeModel(largest=16384)
    summary = summarize(model, document(150), SummaryOptions.build(100))
    assert summary.chunks == 1 and summary.context == 16384
    assert summary.rope_scaling == {"rope_type": "linear", "factor": 4.0}


def test_a_requested_context_forces_map_reduce():
    model = FakeModel(largest=131072, context=4096)
    summary = summarize(model, document(150), SummaryOptions.build(100))
    assert summary.context == 4096 and summary.chunks > 1
    assert model.context == 4096


def test_notes_that_do_not_fit_one_context_are_reduced_in_groups_recursively():
    long_notes = " ".join(f"n{i}" for i in range(80)) + "."
    model = FakeModel(context=2048, answer=lambda prompt: long_notes)
    text = document(500)  # ~32,500 tokens: ~18 chunks, ~1,500 tokens of notes
    summary = summarize(model, text, SummaryOptions.build(500))  # a 500-word answer leaves ~1,200 for notes
    reduces = [p for p in model.prompts if "notes on the parts" in p]
    assert len(reduces) > 1
    assert summary.reduce_rounds >= 2
    assert model.max_new[-1] == tokens_for_words(500)


def test_many_notes_are_merged_a_few_at_a_time_in_document_order():
    """Nine or more parts: merges of at most three consecutive notes, then of their results."""
    def answer(prompt: str) -> str:
        part = re.search(r"part (\d+) of", prompt)
        return f"Note on part {part.group(1)}." if part else "Merged."

    model = FakeModel(context=4096, answer=answer)
    summary = summarize(model, document(9 * 60), SummaryOptions.build(60))
    reduces = [p for p in model.prompts if "notes on the parts" in p]
    first_round = [[int(n) for n in re.findall(r"part (\d+)\.", p)] for p in reduces if "Note on part" in p]
    assert summary.chunks >= 9
    assert [n for group in first_round for n in group] == list(range(1, summary.chunks + 1))  # each once, in order
    assert all(1 < len(group) <= 3 for group in first_round)
    assert all(p.count("Merged.") <= 3 for p in reduces)
    assert summary.reduce_rounds >= 2


def test_words_too_long_for_the_context_is_a_context_error():
    model = FakeModel(context=2048)
    with pytest.raises(ContextError):
        summarize(model, document(150), SummaryOptions.build(2000))


# ---- out of memory ------------------------------------------------------------------------
def test_out_of_memory_retries_once_at_the_next_smaller_context():
    model = FakeModel(largest=16384, oom_above=8192)
    summary = summarize(model, document(150), SummaryOptions.build(100))
    assert summary.context == 8192
    assert summary.chunks > 1  # the smaller context needs more chunks than the one pass it first tried
    assert any("retrying" in n and "8192" in n for n in model.notices)


def test_out_of_memory_twice_gives_up():
    model = FakeModel(largest=16384, oom_above=4096)
    with pytest.raises(OutOfMemoryError):
        summarize(model, document(150), SummaryOptions.build(100))


def test_out_of_memory_with_a_requested_context_retries_smaller_and_restores_it():
    model = FakeModel(largest=16384, context=8192, oom_above=4096)
    summary = summarize(model, document(100), SummaryOptions.build(100))
    assert summary.context == 4096
    assert model.context == 8192


def test_an_interrupt_propagates_and_returns_no_summary():
    def interrupt(prompt):
        raise KeyboardInterrupt

    model = FakeModel(largest=4096, answer=interrupt, context=8192)
    with pytest.raises(KeyboardInterrupt):
        summarize(model, document(150))
    assert model.context == 8192


# ---- progress and output ------------------------------------------------------------------
def test_progress_sees_each_chunk_and_the_reduce():
    events = []

    class Recorder:
        def begin(self, phase, total):
            events.append(("begin", phase, total))

        def advance(self):
            events.append(("advance",))

    summary = summarize(FakeModel(largest=4096), document(150), progress=Recorder())
    assert events[0] == ("begin", f"reading {summary.chunks} parts", summary.chunks)
    assert events.count(("advance",)) == summary.chunks + 1


def test_json_has_text_chunks_context_rope_scaling_and_timings():
    summary = summarize(FakeModel(largest=4096), document(150))
    data = summary.to_json()
    assert set(data) == {"text", "chunks", "context", "rope_scaling", "timings"}
    assert isinstance(data["text"], str) and data["text"]
    assert data["chunks"] == summary.chunks and data["context"] == 4096 and data["rope_scaling"] is None
    for key in ("split_s", "map_s", "reduce_s", "total_s", "prefill_tokens_per_s", "decode_tokens_per_s"):
        assert isinstance(data["timings"][key], float)
    assert isinstance(Summary("x", 1, 4096, None).to_json()["timings"], dict)


def test_greedy_and_short_notes_in_the_map_phase():
    model = FakeModel(largest=4096)
    summarize(model, document(150), SummaryOptions.build(300))
    assert max(model.max_new[:-1]) < model.max_new[-1] == tokens_for_words(300)


# ---- cleaning the answer ------------------------------------------------------------------
def test_template_artefacts_and_preambles_are_stripped():
    raw = "<|im_start|>assistant\nHere is a summary of the document:\nSummary: Bees make honey.<|im_end|>"
    assert clean_summary(raw) == "Bees make honey."


def test_a_repeating_answer_stops_at_the_first_repeat():
    raw = "Bees make honey. Volcanoes erupt. Bees make honey. Bees make honey."
    assert clean_summary(raw) == "Bees make honey. Volcanoes erupt."


def test_an_answer_cut_at_the_token_limit_loses_its_unfinished_sentence():
    assert clean_summary("Bees make honey. Volcanoes erupt and", truncated=True) == "Bees make honey."
    assert clean_summary("- Bees make honey.\n- Volcanoes erupt and", truncated=True) == "- Bees make honey."


def test_bullets_style_gives_one_item_per_line():
    assert shape_summary("Bees make honey. Volcanoes erupt.", "bullets") == "- Bees make honey.\n- Volcanoes erupt."
    assert shape_summary("* Bees.\n2. Lava.", "bullets") == "- Bees.\n- Lava."


def test_paragraph_style_joins_list_items():
    assert shape_summary("- Bees make honey.\n- Volcanoes erupt.", "paragraph") == \
        "Bees make honey. Volcanoes erupt."
