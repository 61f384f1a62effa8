"""Whole-document questions (arbor_cli/ask_every_part.py): which questions read every part, that every
answering finding is kept (and the sentences of its kind), once per sentence across overlapping parts, and
the answer lists them, a count first when asked. A word-level fake model; the real model's test is slow."""

import re

import pytest
from ask_door import DocModel, kjv_like, planted

from arbor_cli.ask import NOT_FOUND, ask
from arbor_cli.ask_every_part import alike, shape, whole_document_question


@pytest.mark.parametrize("question, every", [
    ("What are all the access codes for amber-falcon?", True),
    ("List every locker number that woolen-saddle keeps.", True),
    ("How many ledger entries are there?", True),
    ("Which sections mention the pass key?", True),
    ("Which serials does the register list for Ilse Varga?", True),
    ("What is the access code for amber-falcon?", False),
    ("Which access code does the text give for amber-falcon?", False),
    ("Which process starts first?", False),  # "process" is no plural
    ("What is the pass key?", False),
    ("How many days after the notice may a violation be cured?", False),  # a quantity the text states
    ("How many times did the keeper light the lamp?", True),
    ("How is each licensee addressed?", False),  # each one alike: a fact
])
def test_questions_for_all_of_something_read_every_part(question, every):
    assert whole_document_question(question) is every


def test_records_of_one_kind_share_a_shape_and_prose_does_not():
    a = shape("Ledger entry: Mara Quill paid 48 shillings.")
    assert alike(a, shape("Ledger entry: Ivo Marsh paid 7 shillings.")) == 1.0
    assert alike(a, shape("The grass is green and the sky is blue today.")) < 0.2


def copies(pattern: str):
    """A small model's habit: it copies the first sentence of the kind asked for, and invents one where its
    part has none."""
    def answer(prompt: str) -> str:
        found = re.search(pattern, prompt)
        return found.group() if found else "The access code for amber - falcon is 1111111 ."
    return answer


CODES = {10: "The access code for amber-falcon is 1234567.", 12: "The access code for amber-falcon is 2345678.",
         50: "The access code for cobalt-heron is 7654321.", 100: "The access code for amber-falcon is 5555555."}


def test_every_value_of_a_key_is_listed_and_no_other_keys():
    result = ask(DocModel(answer=copies(r"The access code for [^.]*\.")), planted(CODES),
                 "What are all the access codes for amber-falcon?", keep=False)
    assert result.path == "every part" and result.parts > 2
    assert len(result.answered) == 2  # every part searched; the two that name amber-falcon read and answered
    assert result.text.startswith("3 found:")
    for value in ("1234567", "2345678", "5555555"):  # two of them in one part: the second found by its kind
        assert value in result.text
    assert "7654321" not in result.text and "1111111" not in result.text
    assert [f.answer for f in result.findings if f.answers] == ["1234567", "2345678", "5555555"]


def test_how_many_counts_each_record_once_though_overlapping_parts_read_it_twice():
    records = {i: f"Ledger entry: Payer{i} paid {i} shillings." for i in (5, 6, 40, 41, 42, 80, 117)}
    text = planted(records)
    result = ask(DocModel(answer=copies(r"Ledger entry : \w+ paid \d+ shillings .")), text,
                 "How many ledger entries are there?", keep=False)
    assert result.text.splitlines()[0] == "7."
    assert len(result.text.splitlines()) == 8 and len({f.start for f in result.findings if f.answers}) == 7


def test_a_reply_that_runs_on_past_a_record_is_narrowed_to_the_record():
    records = {i: f"Ledger entry: Payer{i} paid {i} shillings." for i in (5, 40, 80)}
    result = ask(DocModel(answer=copies(r"Ledger entry : \w+ paid \d+ shillings \.\s+p\d+s0w0 p\d+s0w1")), planted(records),
                 "How many ledger entries are there?", keep=False)
    assert result.text.splitlines()[0] == "3."
    assert all(f.quote.startswith("Ledger entry:") and f.quote.endswith("shillings.") for f in result.findings if f.answers)


def test_all_forces_every_part_and_nothing_found_says_so():
    text = planted({60: "The access code for cobalt-heron is 7654321."})
    result = ask(DocModel(answer=copies(r"The access code for [^.]*\.")), text,
                 "What is the access code for velvet-velvet?", keep=False, every_part=True)
    assert result.path == "every part" and result.text == NOT_FOUND
    assert result.answered == []  # no part names velvet-velvet: none can answer, none is read
    closest = result.findings[0]  # the closest sentence, marked as not answering
    assert closest.quote == "The access code for cobalt-heron is 7654321." and not closest.answers
    assert "term:velvet-velvet" in closest.lacks


def test_a_whole_document_question_about_a_short_document_reads_it_as_one_part():
    text = "The access code for amber-falcon is 1234567. The access code for amber-falcon is 7654321."
    result = ask(DocModel(answer=copies(r"The access code for [^.]*\.")), text,
                 "List every access code for amber-falcon.", keep=False)
    assert result.path == "every part" and result.parts == 1
    assert "1234567" in result.text and "7654321" in result.text


def test_a_part_whose_reply_points_at_nothing_has_its_sentences_judged_by_the_model():
    text = planted({30: "The access code for amber-falcon is 1234567.", 70: "The access code for amber-falcon is 2345678."})
    confident = DocModel(answer=lambda p: "I cannot tell.", judge=lambda p: -3.0 if "nothing in particular" in p else 0.0)
    result = ask(confident, text, "What are all the access codes for amber-falcon?", keep=False)
    assert [f.answer for f in result.findings if f.answers] == ["1234567", "2345678"]
    doubtful = DocModel(answer=lambda p: "I cannot tell.", judge=lambda p: 0.0)  # the quotes make the question no likelier
    assert ask(doubtful, text, "What are all the access codes for amber-falcon?", keep=False).text == NOT_FOUND
    alone = planted({30: "The access code for amber-falcon is 1234567."})  # the model's pick, with none of its kind
    assert ask(confident, alone, "What are all the access codes for amber-falcon?", keep=False).text == NOT_FOUND


@pytest.mark.slow
def test_the_default_model_lists_every_value_of_a_key(default_model_here):
    paragraphs = kjv_like(24)  # ~1,400 tokens: 2 parts of the default model's 1,024
    for at, line in sorted({3: "Note that amber-falcon keeps locker number 4417203.",
                            9: "Note that cobalt-heron keeps locker number 8820931.",
                            15: "Note that amber-falcon keeps locker number 6631458."}.items(), reverse=True):
        paragraphs.insert(at, line)
    result = ask(default_model_here, "\n\n".join(paragraphs), "List every locker number that amber-falcon keeps.")
    assert result.path == "every part"
    assert "4417203" in result.text and "6631458" in result.text and "8820931" not in result.text
