"""Cleaning the model's answer: template artefacts, preambles, repeats, cut-off sentences, list or paragraph."""

from __future__ import annotations

from arbor_cli.summary_text import clean_summary, shape_summary


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
