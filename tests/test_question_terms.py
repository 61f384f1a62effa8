"""The distinguishing-terms rule (arbor_cli/question_terms.py): what a quote must carry to answer a question,
and the answer's values it must hold; pure text, then through ask on the word-level fake model."""

import re

import pytest
from ask_door import DocModel, kjv_like, planted

from arbor_cli.ask import NOT_FOUND, ask
from arbor_cli.evidence import common_words
from arbor_cli.question_terms import QuestionTerms, SentenceCounts, answer_values, question_terms, words_of

RULER_QUESTION = "What is the special magic number for velvet-velvet mentioned in the provided text?"


@pytest.mark.parametrize("question, named, content", [
    (RULER_QUESTION, ["velvet-velvet"], ["special", "magic"]),
    ('What is the "pass" statement?', ["pass"], ["statement"]),
    ("What serial does the register give for Ilse Varga?", ["Ilse Varga"], ["serial", "register"]),
    ("What happened in 1698 at Eddystone?", ["1698", "Eddystone"], ["happened"]),
    ("How fast does qwen2.5-coder decode?", ["qwen2.5-coder"], ["fast", "decode"]),
    ("What is the pass key?", [], ["pass", "key"]),
    ("What is this document about?", [], []),
    ("How many times did anyone sign the guest book?", [], ["sign", "guest", "book"]),  # no "anyone", "times"
])
def test_named_terms_are_known_by_their_form_and_generic_words_are_no_terms(question, named, content):
    terms = question_terms(question)
    assert [t.text for t in terms if t.named] == named
    assert [t.text for t in terms if not t.named] == content


def test_content_words_meet_their_inflections_and_named_terms_do_not():
    terms = QuestionTerms("How many times did anyone sign the guest book?")
    assert terms.support("Guest book: Ada Quill signed on page 4.").anchored  # "signed" meets "sign"
    named = QuestionTerms('What is the "pass" statement?')
    assert "pass" not in named.support("Deletion is passed to the primary object.").carried


def test_a_quote_naming_another_key_does_not_answer():
    terms = QuestionTerms(RULER_QUESTION)
    other = terms.support("One of the special magic numbers for jasper-thistle is: 3978290.",
                          "The special magic number for velvet-velvet is 3978290.")
    assert not other.anchored and not other.answers and "term:velvet-velvet" in other.lacks
    right = terms.support("One of the special magic numbers for velvet-velvet is: 1417320.",
                          "The special magic number for velvet-velvet is 1417320.")
    assert right.anchored and right.answers and right.coverage == 1.0


def test_the_answer_value_must_be_inside_the_quote():
    terms = QuestionTerms(RULER_QUESTION)
    wrong_value = terms.support("One of the special magic numbers for velvet-velvet is: 1417320.",
                                "The special magic number for velvet-velvet is 3978290.")
    assert wrong_value.anchored and not wrong_value.answers and wrong_value.lacks == ("value:3978290",)


def test_the_answer_values_are_its_numbers_and_codes_the_question_lacks():
    asked = set(words_of(RULER_QUESTION))
    values = answer_values("The magic number for velvet-velvet is XK-48213, or 17.", asked)
    assert [v.text for v in values] == ["XK-48213", "17"]


def test_a_word_found_in_every_other_sentence_weighs_little_and_a_rare_one_much():
    text = " ".join(f"The statement number {i} is simple." for i in range(40)) + " The pass statement is a null operation."
    terms = QuestionTerms('What does the pass statement do?', SentenceCounts(text))
    assert terms.support("The pass statement is a null operation.").anchored
    assert not terms.support("The statement number 3 is simple.").anchored  # "statement" alone: little weight
    uniform = QuestionTerms('What does the pass statement do?')
    assert uniform.support("The statement number 3 is simple.").coverage == 0.5


def test_a_two_sentence_document_still_has_terms_that_anchor():
    """The 2-part failure (docs/performance.md): every question word was in both parts, so "common", and a
    right quote was thrown away. Weights come from sentences, so a short document keeps its words."""
    text = "With arbor, decode runs at 165.7 tokens per second on the CPU. Prefill of 512 tokens takes 0.42 seconds."
    terms = QuestionTerms("How fast does arbor decode on the CPU?", SentenceCounts(text))
    support = terms.support("With arbor, decode runs at 165.7 tokens per second on the CPU.", "It decodes at 165.7 tok/s.")
    assert support.answers and "fast" not in support.carried  # the question's own word weighs nothing


def test_a_question_whose_words_the_document_never_uses_is_off_its_topic():
    text = "Floating point numbers are approximations. Integers have unlimited precision."
    terms = QuestionTerms("What is the boiling point of mercury?", SentenceCounts(text))
    assert not terms.support("Floating point numbers are approximations.").anchored


def test_a_named_term_the_document_uses_everywhere_is_not_required():
    text = " ".join(f"Python line {i} says something about Python." for i in range(30)) + " Indentation is significant."
    terms = QuestionTerms("Is indentation significant in Python?", SentenceCounts(text))
    assert [t.text for t in terms.required] == []
    assert terms.support("Indentation is significant.").anchored


def test_a_question_without_terms_ties_nothing():
    assert not QuestionTerms("What is this document about?").support("It is about ships.").anchored


# ---- through ask, on the word-level fake model --------------------------------------------------------------
KEYS = {20: "The access code for amber-falcon is 1234567.", 45: "The access code for cobalt-heron is 7654321.",
        70: "The access code for jasper-thistle is 3978290.", 95: "The access code for orchid-willow is 1417320."}


def quotes_the_part_about(key: str):
    """A small model's habit: it answers with the key asked for and whatever code its part holds."""
    def answer(prompt: str) -> str:
        code = re.search(r"is (\d{7})", prompt)
        return f"The access code for {key} is {code.group(1) if code else '1111111'}."
    return answer


def test_an_absent_key_answers_not_found_and_lists_the_distractors_as_not_answering():
    text = planted(KEYS)
    result = ask(DocModel(answer=quotes_the_part_about("velvet-velvet")), text,
                 "What is the access code for velvet-velvet?", keep=False)
    assert result.path == "parts" and result.text == NOT_FOUND
    assert "The access code for jasper-thistle is 3978290." in [f.quote for f in result.findings]  # found, rejected
    assert all(not f.answers and "term:velvet-velvet" in f.lacks for f in result.findings)


def test_a_distractor_only_quote_is_rejected_in_one_pass_too():
    text = "The access code for jasper-thistle is 3978290. The access code for amber-falcon is 1234567."
    result = ask(DocModel(answer=lambda p: "The access code for velvet-velvet is 3978290."), text,
                 "What is the access code for velvet-velvet?", keep=False)
    assert result.path == "one pass" and result.text == NOT_FOUND
    [found] = result.findings
    assert found.quote == "The access code for jasper-thistle is 3978290." and not found.answers


def test_the_asked_key_is_answered_among_distractors():
    text = planted(KEYS)
    result = ask(DocModel(answer=quotes_the_part_about("jasper-thistle"),
                          score=lambda p: 0.0 if "jasper" in p else -9.0),  # the right part ranks first
                 text, "What is the access code for jasper-thistle?", keep=False)
    assert result.text.startswith("The access code for jasper-thistle is 3978290.")
    assert "“The access code for jasper-thistle is 3978290.”" in result.text


def test_a_two_part_document_whose_answer_is_in_one_part_is_answered():
    """Every question word is in both parts: the part-count rule called them all common and threw the right
    answer away (Qwen on docs/performance.md, 2 parts)."""
    filler = " ".join(f"Note {i}: arbor can decode on the CPU or the GPU, and decode speed on a CPU varies."
                      for i in range(40))
    answer_line = "On this CPU arbor decodes 165.7 tokens per second with its compiled step."
    text = filler + "\n\n" + answer_line + " " + filler
    model = DocModel(answer=lambda p: "arbor decodes 165.7 tokens per second" if "165 . 7" in p else "It varies.",
                     score=lambda p: 0.0 if "165 . 7" in p else -9.0)
    result = ask(model, text, "How fast does arbor decode on the CPU?", keep=False, part_tokens=1024)
    assert result.path == "parts" and result.parts == 2
    assert common_words([text[:len(text) // 2], text[len(text) // 2:]]) == frozenset()  # 2 parts: nothing common
    assert result.text.startswith("arbor decodes 165.7 tokens per second") and answer_line in result.text


@pytest.mark.slow
def test_the_default_model_answers_a_present_key_and_not_found_for_an_absent_one(default_model_here):
    paragraphs = kjv_like(30)  # ~1,800 tokens: 2 parts of the default model's 1,024
    for at in sorted(KEYS, reverse=True):
        paragraphs.insert(at * 30 // 120, KEYS[at])
    text = "\n\n".join(paragraphs)
    present = ask(default_model_here, text, "What is the access code for jasper-thistle?")
    assert present.path == "parts" and "3978290" in present.text and present.findings[0].answers
    absent = ask(default_model_here, text, "What is the access code for velvet-velvet?")
    assert absent.text == NOT_FOUND
    assert not any(code in absent.text for code in ("1234567", "7654321", "3978290", "1417320"))
