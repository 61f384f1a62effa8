"""Cleaning the model's answer: template artefacts, preambles, repeats, cut-off sentences, list or paragraph,
and --words held within its tolerance."""

from __future__ import annotations

from arbor_cli.summary_text import clean_summary, count_words, fit_words, shape_summary, word_limit


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


def test_bare_list_numbers_are_not_taken_for_a_repeated_sentence():
    """A second numbered list ("1." again) is not a greedy loop: the text after it is kept."""
    text = "The three are:\n\n1. A cat sat.\nThe main ones:\n\n1. Bees live.\n\n2. Chess is fun."
    assert "Chess is fun." in clean_summary(text)
    assert clean_summary("Bees live. Bees live. More.") == "Bees live."


# ---- --words N: at most word_limit(N) words, whole sentences --------------------------------------------
def sentences(count: int, words: int, start: int = 0) -> list[str]:
    return [" ".join(f"s{start + i}w{w}" for w in range(words)) + "." for i in range(count)]


def test_the_word_limit_is_the_stated_tolerance():
    assert (word_limit(60), word_limit(150), word_limit(1)) == (75, 187, 1)


def test_a_summary_within_the_limit_is_untouched():
    text = " ".join(sentences(7, 10))  # 70 words for --words 60: within 75
    assert fit_words(text, 60) == text


def test_a_paragraph_over_the_limit_keeps_its_whole_sentences_that_fit():
    text = " ".join(sentences(8, 12))  # 96 words, as issue 32's 76 for 60: too long
    fitted = fit_words(text, 60)
    assert fitted == " ".join(sentences(6, 12))  # 72 words <= 75; a seventh sentence would make 84
    assert count_words(fitted) <= word_limit(60)


def test_bullets_over_the_limit_keep_whole_items_then_whole_sentences():
    items = ["- " + " ".join(sentences(2, 10, 2 * i)) for i in range(5)]  # 5 items of 20 words
    fitted = fit_words("\n".join(items), 60)
    lines = fitted.splitlines()
    assert lines[:3] == items[:3] and lines[3] == "- " + sentences(1, 10, 6)[0]  # 70 words
    assert len(lines) == 4 and count_words(fitted) == 70


def test_one_sentence_longer_than_the_limit_is_cut_after_n_words():
    text = "- " + " ".join(f"w{i}" for i in range(100)) + "."
    assert fit_words(text, 10) == "- " + " ".join(f"w{i}" for i in range(10)) + "…"


def test_list_markers_are_not_counted_as_words():
    assert count_words("- Bees make honey.\n- Lava flows.") == 5


def test_the_sentence_that_overflows_keeps_its_leading_clauses_that_fit():
    """Issue 32's long-document summary: its last sentence named chess, then ran over
    the limit in a trailing participle."""
    last = "Chess trains memory and planning over long games, which the volcano section also mentions."  # 14
    fitted = fit_words(" ".join(sentences(6, 10)) + " " + last, 60)  # 60 + 14 = 74 fits whole
    assert fitted.endswith("also mentions.")
    fitted = fit_words(" ".join(sentences(6, 11)) + " " + last, 60)  # 66 + 14 = 80: its first clause (8) fits
    assert fitted == " ".join(sentences(6, 11)) + " Chess trains memory and planning over long games…"
    assert count_words(fitted) == 74


def test_a_leading_clause_too_short_to_say_anything_is_not_kept():
    fitted = fit_words(" ".join(sentences(6, 11)) + " Chess, which trains memory and planning over long games and seas.", 60)
    assert fitted == " ".join(sentences(6, 11))
