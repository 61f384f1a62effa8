"""What ask works out about a document's text, kept beside its cache (arbor_cli/document_index.py): the same
parts and the same parts naming a question as working it out afresh, word counts equal to reading every
sentence, a kept file read back (and a damaged or stale one never trusted)."""

import json
import random

import pytest
from ask_door import DocModel, WordTokenizer

from arbor_cli import document_index
from arbor_cli.document_index import cut_into_parts
from arbor_cli.ask_every_part import candidates
from arbor_cli.chunking import document_token_offsets
from arbor_cli.progress import NoProgress
from arbor_cli.question_terms import QuestionTerms, SentenceCounts, holds, question_terms, root, words_of

WORDS = ("ship keeper hives ledger harbour pass key statement continue loop signed signing entries entry "
         "velvet-velvet Martha Okafor Endeavour the of and was named is in a to").split()


def random_text(rng: random.Random, sentences: int) -> str:
    """Sentences of the words above (names, compounds, numbers, plurals, -ing/-ed forms), some of them long
    enough to be cut between words, in paragraphs; now and then a word run into the next without a space."""
    out = []
    for k in range(sentences):
        n = rng.choice([4, 8, 12, 80])
        words = [rng.choice(WORDS) if rng.random() < 0.9 else str(rng.randint(1, 99999)) for _ in range(n)]
        glue = "" if rng.random() < 0.05 else " "
        sentence = glue.join(words[:2]) + " " + " ".join(words[2:])
        out.append(sentence[0].upper() + sentence[1:] + rng.choice([".", ".", "?", "!"]))
        if rng.random() < 0.2:
            out.append("\n\n")
        if rng.random() < 0.15:  # a sentence starting with a pronoun: read with the one before it
            out.append("It was " + rng.choice(WORDS) + " " + rng.choice(WORDS) + ".")
    return " ".join(out)


def questions(rng: random.Random, count: int) -> list[str]:
    forms = ["What is the {0}?", "Who was the {0} {1}?", "What does the {0} {1} do?", "What is {2}?",
             "What was {0} in {3}?", "Which {0} is \"{1}\"?"]
    picks = [w for w in WORDS if len(w) > 3]
    return [rng.choice(forms).format(rng.choice(picks), rng.choice(picks), rng.choice(["Martha Okafor",
            "the Endeavour", "velvet-velvet"]), rng.randint(1, 99999)) for _ in range(count)]


@pytest.mark.parametrize("seed", range(6))
def test_the_counts_are_those_of_reading_every_sentence(seed):
    rng = random.Random(seed)
    text = random_text(rng, 120)
    counts = SentenceCounts(text)
    sentences = [words_of(text[a:b]) for a, b in counts.spans]
    for question in questions(rng, 30):
        for term in question_terms(question):
            words = [s if term.named else [root(w) for w in s] for s in sentences]
            assert counts.count(term) == sum(1 for s in words if holds(s, term.words)), (question, term)


@pytest.mark.parametrize("seed", range(8))
def test_the_parts_naming_a_question_are_exactly_those_candidates_accepts(seed):
    rng = random.Random(seed)
    text = random_text(rng, 300)
    tokenizer = WordTokenizer()
    limit = rng.choice([128, 200, 400])
    index = document_index.build(tokenizer, text, limit, NoProgress())
    offsets = document_token_offsets(tokenizer.encode_with_offsets, text, NoProgress())
    assert index.tokens == len(offsets)
    assert [(a, text[a:b]) for a, b in index.parts] == cut_into_parts(tokenizer, text, offsets, limit)
    parts = index.texts(text)
    assert len(parts) > 3
    for question in questions(rng, 40):
        terms = QuestionTerms(question, index.counts)
        assert index.naming(text, terms) == [i for i, p in enumerate(parts, 1) if candidates(p, terms)], question


def test_a_kept_index_is_read_back_and_a_damaged_or_other_one_is_not_trusted(arbor_home, monkeypatch):
    rng = random.Random(1)
    text = random_text(rng, 200)
    model = DocModel(answer=lambda prompt: "")
    first = document_index.index_for(model, text, 128, NoProgress())
    files = list(document_index.directory().glob("*.json"))
    assert len(files) == 1
    built = []
    real_build = document_index.build
    monkeypatch.setattr(document_index, "build", lambda *a: built.append(1) or real_build(*a))
    again = document_index.index_for(model, text, 128, NoProgress())
    assert built == [] and (again.tokens, again.parts) == (first.tokens, first.parts)
    assert (again.counts.stems, again.counts.roots) == (first.counts.stems, first.counts.roots)
    # another part size, another text: other files, computed
    document_index.index_for(model, text, 256, NoProgress())
    document_index.index_for(model, text + " More.", 128, NoProgress())
    assert len(built) == 2 and len(list(document_index.directory().glob("*.json"))) == 3
    # without keeping (--no-cache): computed, neither read nor written
    document_index.index_for(model, text, 128, NoProgress(), keep=False)
    assert len(built) == 3 and len(list(document_index.directory().glob("*.json"))) == 3
    # damaged: deleted, computed again, kept again
    files[0].write_text(files[0].read_text()[:100])
    third = document_index.index_for(model, text, 128, NoProgress())
    assert len(built) == 4 and third.parts == first.parts
    assert json.loads(files[0].read_text())["parts"] == [list(p) for p in first.parts]
    # a file whose sentences are not this text's (a hash collision, a hand edit) is not used
    data = json.loads(files[0].read_text())
    data["sentences"] += 1
    files[0].write_text(json.dumps(data))
    document_index.index_for(model, text, 128, NoProgress())
    assert len(built) == 5


def test_at_most_max_files_are_kept_and_cache_clear_removes_them(arbor_home, monkeypatch):
    from typer.testing import CliRunner

    from arbor_cli.cli import app

    monkeypatch.setattr(document_index, "MAX_FILES", 3)
    model = DocModel(answer=lambda prompt: "")
    for i in range(5):
        document_index.index_for(model, f"Document {i}. The ship is named Endeavour.", 128, NoProgress())
    assert len(list(document_index.directory().glob("*.json"))) == 3
    r = CliRunner().invoke(app, ["cache", "clear"])
    assert r.exit_code == 0 and list(document_index.directory().glob("*.json")) == []
