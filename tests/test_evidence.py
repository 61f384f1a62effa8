"""The evidence an answer needs in its part's own text (arbor_cli/evidence.py): a verbatim run of its
words that says more than the question, the sentence quoted around it, and whether that sentence is
about the question at all. Pure text: no model."""

import pytest

from arbor_cli.evidence import QUOTE_CHARS, DocumentWords, anchored, common_words, evidence

QUESTION = "What is the pass key?"


@pytest.mark.parametrize("answer, part, found", [
    ("The pass key is 91644.", "filler. The  PASS key is 91644 . more", "The  PASS key is 91644"),
    ("The pass key is 1234.", "filler text. The pass key is 91644.", None),  # its number is not in the part
    ("What is the pass key?", "What is the pass key? Nobody knows.", None),  # an echo of the question
    ("It is 42.", "the answer: 42", "42"),  # one word with a digit is enough
    ("Bees make honey.", "In summer bees make honey in hives.", "bees make honey"),
])
def test_evidence_is_a_verbatim_run_that_says_more_than_the_question(answer, part, found):
    where = evidence(answer, part, QUESTION)
    assert (None if where is None else part[where.run[0]:where.run[1]]) == found


def test_one_content_word_is_evidence_but_a_run_common_in_the_document_is_not():
    part = "They sailed at dawn. The name of the ship is Endeavour. The sea was calm."
    found = evidence('The ship is the "Endeavour"', part, "What is the name of the ship?")
    assert part[found.run[0]:found.run[1]] == "Endeavour" and found.anchored
    document = DocumentWords(part + " The sea was calm." * 3)
    assert evidence("The sea was calm.", part, "What was the sea like?", document=document) is None


def test_evidence_prefers_a_run_whose_sentence_is_about_the_question_and_quotes_that_sentence():
    part = ('Deletion of slicings is passed to the primary object involved. "pass" is a null operation. '
            "It is useful as a placeholder.")
    answer = "The pass statement is a null operation that is passed to the primary object involved."
    found = evidence(answer, part, 'What is the "pass" statement?')
    assert part[found.run[0]:found.run[1]] == "is a null operation" and found.anchored
    assert part[found.sentence[0]:found.sentence[1]] == '"pass" is a null operation.'


@pytest.mark.parametrize("sentence, question, expected", [
    ("Grass grows. The pass key is 54635. Remember it.", QUESTION, True),
    ("Consecrate Aaron and his sons.", QUESTION, False),
    ("He built the first tower in 1698.", "When was the tower built?", True),
    ("It continues with the next cycle of the nearest enclosing loop.", 'What does "continue" do?', True),  # stems
    ("It is what it is.", "What is it?", False),  # function words tie nothing
])
def test_a_sentence_is_anchored_when_it_shares_a_word_with_the_question(sentence, question, expected):
    assert anchored(sentence, question) is expected


def test_a_word_found_in_most_parts_anchors_nothing():
    parts = ["The statement here.", "A statement there.", "Statement and the pass key.", "No such word."]
    common = common_words(parts)
    assert "statement" in common and "pass" not in common
    assert not anchored("The statement is long.", "What is the pass statement?", common)
    assert anchored("The pass key.", "What is the pass statement?", common)


def test_a_long_sentence_is_quoted_around_the_evidence():
    part = "Words " * 100 + "the pass key is 91644 and " + "more words " * 100 + "."
    where = evidence("The pass key is 91644.", part, QUESTION)
    lo, hi = where.sentence
    assert hi - lo <= QUOTE_CHARS and lo <= where.run[0] and where.run[1] <= hi
    assert not part[lo].isspace() and part[lo - 1] == " " and part[hi] == " "  # cut between words


def test_a_cut_quote_is_widened_to_its_whole_sentence_when_only_that_answers():
    part = ("A compilation of a covered work with other separate and independent works, which are not by their "
            "nature extensions of the covered work, and which are not combined with it such as to form a larger "
            "program, in or on a volume of a storage or distribution medium, is called an \"aggregate\" if the "
            "compilation and its resulting copyright are not used to limit the access or legal rights. More.")
    found = evidence("A compilation of a covered work with other separate and independent works", part,
                     'When is a compilation called an "aggregate"?')
    assert found.anchored and part[found.sentence[0]:found.sentence[1]].endswith("legal rights.")
    assert found.sentence[1] - found.sentence[0] > QUOTE_CHARS


def test_a_sentence_starting_with_a_pronoun_is_quoted_with_the_one_before():
    part = "The lighthouse keeper was named Henry Winstanley. He built the first tower in 1698. The sea rose."
    found = evidence("He built the first tower in 1698.", part, "When did Henry Winstanley build the tower?")
    assert found.support.answers
    assert part[found.sentence[0]:found.sentence[1]] == ("The lighthouse keeper was named Henry Winstanley. "
                                                         "He built the first tower in 1698.")


def test_the_values_that_must_be_quoted_are_those_of_the_answers_sentence_with_the_run():
    part = "See clause 1.8 of the licence. Grass grows. The pass key is 72077. Remember it."
    found = evidence("Clause 1.8. The pass key is 72077.", part, QUESTION)
    assert part[found.run[0]:found.run[1]] == "The pass key is 72077" and found.support.answers
    wrong = evidence("The pass key is 72077, see 1.9.", part, QUESTION)  # a value of its own sentence, unquoted
    assert not wrong.support.answers and wrong.support.lacks == ("value:1.9",)
