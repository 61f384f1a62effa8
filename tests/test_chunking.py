"""Chunking: text cut into token-budgeted parts on paragraph, sentence and word boundaries, with overlap.

The tokenizer is conftest's, one token per word or punctuation mark: `word_offsets` is the document
tokenized once, `count_words` the exact count of a chunk.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import count_words, document, word_offsets

from arbor_cli.chunking import TokenPositions, block_cuts, split_into_chunks, tokenize_in_blocks


def chunk_texts(text: str, chunks) -> list[str]:
    return [c.text_of(text) for c in chunks]


def char_offsets(text: str) -> list[tuple[int, int]]:
    """A tokenizer of one token per character."""
    return [(i, i + 1) for i in range(len(text))]


@pytest.mark.parametrize("budget", [40, 100, 333, 1000])
def test_chunks_never_exceed_the_token_budget(budget):
    text = document(30)
    for piece in chunk_texts(text, split_into_chunks(text, word_offsets(text), count_words, budget)):
        assert count_words(piece) <= budget


def test_chunks_cover_all_text_in_order():
    text = document(40)
    chunks = split_into_chunks(text, word_offsets(text), count_words, 200)
    assert chunks[0].start == 0 and chunks[-1].end == len(text)
    rebuilt = text[:chunks[0].end]
    for before, chunk in zip(chunks, chunks[1:]):
        assert chunk.start < before.end  # overlaps, never skips
        assert chunk.start + chunk.overlap == before.end
        rebuilt += text[before.end:chunk.end]
    assert rebuilt == text


def test_chunks_after_the_first_begin_with_the_end_of_the_one_before():
    text = document(40)
    chunks = split_into_chunks(text, word_offsets(text), count_words, 200, overlap=30)
    for before, chunk in zip(chunks, chunks[1:]):
        repeated = text[chunk.start:chunk.start + chunk.overlap]
        assert 0 < count_words(repeated) <= 30
        assert before.text_of(text).endswith(repeated.strip())


def test_chunks_end_on_paragraph_breaks_when_paragraphs_fit():
    text = document(20)  # paragraphs of 5 x 13 = 65 tokens
    chunks = split_into_chunks(text, word_offsets(text), count_words, 200, overlap=0)
    for chunk in chunks[:-1]:
        assert text[chunk.end - 2:chunk.end] == "\n\n"


def test_chunks_end_on_sentence_ends_when_a_paragraph_is_longer_than_a_chunk():
    text = document(3, sentences=40)  # paragraphs of 520 tokens
    chunks = split_into_chunks(text, word_offsets(text), count_words, 100)
    for piece in chunk_texts(text, chunks):
        assert piece.endswith(".")
        assert count_words(piece) <= 100


def test_a_single_giant_sentence_is_cut_between_words():
    text = " ".join(f"w{i}" for i in range(5000))  # no punctuation, no paragraph breaks
    chunks = split_into_chunks(text, word_offsets(text), count_words, 300)
    pieces = chunk_texts(text, chunks)
    assert len(chunks) >= 5000 // 300
    assert all(count_words(p) <= 300 for p in pieces)
    assert all(re.fullmatch(r"(w\d+ ?)+", p) for p in pieces)  # whole words only
    assert pieces[0].startswith("w0 ") and pieces[-1].endswith("w4999")
    assert all(c.overlap > 0 for c in chunks[1:])


def test_a_single_giant_word_is_cut_inside_it():
    text = "x" * 500
    counting_chars = len  # one token per character
    chunks = split_into_chunks(text, char_offsets(text), counting_chars, 64)
    assert all(len(p) <= 64 for p in chunk_texts(text, chunks))
    assert chunks[-1].end == len(text)


def test_a_short_text_is_one_chunk():
    text = "Bees make honey. Volcanoes erupt."
    chunks = split_into_chunks(text, word_offsets(text), count_words, 100)
    assert len(chunks) == 1 and chunks[0].text_of(text) == text


def test_token_positions_count_the_tokens_of_a_stripped_stretch():
    text = "  Bees make honey.\n\nVolcanoes, erupt!  "
    tokens = TokenPositions(text, word_offsets(text), count_words)
    between_words = [i for i in range(len(text) + 1) if not text[i - 1:i + 1].isalnum()]  # no word cut in two
    for start in between_words:
        for end in (e for e in between_words if e >= start):
            assert tokens.in_document(start, end) == tokens.alone(start, end) == count_words(text[start:end].strip())


def test_a_token_belongs_to_the_stretch_its_first_visible_character_is_in():
    text = "Bees buzz. Lava flows."
    offsets = [(0, 4), (4, 9), (9, 10), (10, 15), (15, 21), (21, 22)]  # " buzz", " Lava": spaces lead
    tokens = TokenPositions(text, offsets, lambda s: len(s.split()))
    assert tokens.in_document(0, 11) == 3 and tokens.in_document(11, len(text)) == 3


def test_a_long_line_without_whitespace_is_cut_where_tokens_begin():
    text = "x" * 100_000
    offsets = [(i, min(i + 3, len(text))) for i in range(0, len(text), 3)]  # tokens of three characters
    chunks = split_into_chunks(text, offsets, lambda s: -(-len(s) // 3), 1000)
    assert all(c.tokens <= 1000 for c in chunks)
    assert all(c.start % 3 == 0 for c in chunks)  # never inside a token
    assert chunks[0].start == 0 and chunks[-1].end == len(text)


@pytest.mark.slow
@pytest.mark.parametrize("budget", [800, 3900])
def test_with_the_real_tokenizer_each_chunk_counted_alone_fits_its_budget(default_checkpoint, budget):
    from long_document import long_document

    from arbor_core.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(default_checkpoint.path)
    text = long_document()
    _, offsets = tokenizer.encode_with_offsets(text)
    chunks = split_into_chunks(text, offsets, lambda s: len(tokenizer.encode(s)), budget)
    assert chunks[0].start == 0 and chunks[-1].end == len(text)
    for before, chunk in zip(chunks, chunks[1:]):
        assert chunk.start + chunk.overlap == before.end
    assert all(len(tokenizer.encode(c.text_of(text))) == c.tokens <= budget for c in chunks)


# ---- tokenizing a long document in blocks ------------------------------------------------------------
def test_blocks_end_just_before_a_paragraph_break_else_whitespace_else_at_the_size():
    text = "one two.\n\nthree four five.\n\nsix"
    cuts = block_cuts(text, 20)
    assert cuts and all(text[c:c + 2] == "\n\n" for c in cuts)
    assert block_cuts("alpha beta gamma delta", 10) == [5, 10, 16]  # before the last space in each window
    assert block_cuts("x" * 25, 10) == [10, 20]
    assert block_cuts("short", 10) == []


def test_tokenizing_in_blocks_reports_each_block_and_shifts_offsets():
    text = document(40)
    seen = []
    offsets = tokenize_in_blocks(lambda s: (None, word_offsets(s)), text, lambda done, total: seen.append((done, total)),
                                 block_chars=500)
    assert offsets == word_offsets(text)
    total = len(block_cuts(text, 500)) + 1
    assert total > 5 and seen == [(i, total) for i in range(total + 1)]


@pytest.mark.parametrize("block_chars", [2000, 50_000])
def test_tokenizing_in_blocks_gives_the_tokens_of_the_whole_text_with_the_real_tokenizer(default_checkpoint,
                                                                                         block_chars):
    from long_document import long_document

    from arbor_core.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(default_checkpoint.path)
    text = long_document() + "\n\n" + Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    _, whole = tokenizer.encode_with_offsets(text)
    assert tokenize_in_blocks(tokenizer.encode_with_offsets, text, block_chars=block_chars) == whole
