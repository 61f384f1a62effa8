"""arbor ask's logic on the fake model (no weights): which path runs, and that a part's answer is kept
only with evidence from that part's own text. Real-model retrieval figures belong to issue 13's
measurements (docs/long-context.md), not to this file."""

import pytest

from arbor_cli.ask import NOT_FOUND, ask, evidence
from arbor_cli.errors import UsageError
from conftest import FakeModel, document

KEY = "The pass key is 91644."


def needle_document(paragraphs: int, at: int) -> str:
    parts = document(paragraphs).split("\n\n")
    parts.insert(at, KEY)
    return "\n\n".join(parts)


def answers_from_the_part(prompt: str) -> str:
    """A small model's habit: every part answers, most of them wrongly."""
    return "The pass key is 91644." if "91644" in prompt else "The pass key is 1234."


def test_a_short_document_is_asked_in_one_pass():
    model = FakeModel(answer=lambda prompt: "It says p1s2w3.")
    result = ask(model, document(3), "What is the third word of the second sentence?")
    assert result.path == "one pass" and result.parts == 1 and result.text == "It says p1s2w3."
    [prompt] = model.prompts
    assert "p2s4w11" in prompt and prompt.endswith("What is the third word of the second sentence?")


def test_a_long_document_is_asked_part_by_part_and_only_the_part_with_evidence_counts():
    text = needle_document(120, at=70)  # ~7,900 words: past the one-pass length
    model = FakeModel(answer=answers_from_the_part)
    result = ask(model, text, "What is the pass key?")
    assert result.path == "parts" and result.parts == len(model.prompts) >= 2
    assert [f.quote for f in result.findings] == ["The pass key is 91644"]
    finding = result.findings[0]
    assert text[finding.start:finding.start + len(finding.quote)] == finding.quote
    assert "91644" in model.prompts[finding.part - 1]
    assert result.text.startswith("The pass key is 91644.") and f"part {finding.part} of {result.parts}" in result.text
    assert all(p.startswith("There is an important piece of information hidden in this text, part ")
               for p in model.prompts)


def test_a_part_quoting_text_found_all_over_the_document_is_not_a_finding():
    filler = "The grass is green. The sky is blue. " * 600  # ~4,800 words of repeated filler, one key
    text = filler + KEY + " " + filler

    def quoting(prompt: str) -> str:
        return KEY if "91644" in prompt else "The pass key is the phrase 'The grass is green.'"

    result = ask(FakeModel(answer=quoting), text, "What is the pass key?")
    assert [f.quote for f in result.findings] == ["The pass key is 91644"]
    assert result.text.startswith(KEY)


def test_no_part_with_evidence_says_so_instead_of_guessing():
    model = FakeModel(answer=lambda prompt: "The pass key is 1234.")
    result = ask(model, document(120), "What is the pass key?")
    assert result.path == "parts" and result.findings == [] and result.text == NOT_FOUND


@pytest.mark.parametrize("answer, part, found", [
    ("The pass key is 91644.", "filler. The  PASS key is 91644 . more", "The  PASS key is 91644"),
    ("The pass key is 1234.", "filler text. The pass key is 91644.", None),  # its number is not in the part
    ("What is the pass key?", "What is the pass key? Nobody knows.", None),  # an echo of the question
    ("It is 42.", "the answer: 42", "42"),  # one word with a digit is enough
    ("Bees make honey.", "In summer bees make honey in hives.", "bees make honey"),
])
def test_evidence_is_a_verbatim_run_that_says_more_than_the_question(answer, part, found):
    where = evidence(answer, part, "What is the pass key?")
    assert (None if where is None else part[where[0]:where[1]]) == found


def test_empty_document_or_question_is_a_usage_error():
    with pytest.raises(UsageError, match="document is empty"):
        ask(FakeModel(), "  \n", "Why?")
    with pytest.raises(UsageError, match="question is empty"):
        ask(FakeModel(), "Some text.", " ")


@pytest.mark.slow
def test_arbor_ask_answers_a_short_file_in_one_pass_and_prints_only_the_answer(default_checkpoint, tmp_path):
    import json
    import subprocess
    import sys

    doc = tmp_path / "keeper.txt"
    doc.write_text("The lighthouse keeper was named Henry Winstanley. He built the first tower in 1698.\n")
    done = subprocess.run([sys.executable, "-m", "arbor_cli", "ask", str(doc), "In which year was the first tower "
                           "built?", "--json", "--max-input-mb", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)  # stdout is only the answer
    assert answer["path"] == "one pass" and answer["parts"] == 1 and answer["text"]
    missing = subprocess.run([sys.executable, "-m", "arbor_cli", "ask", str(tmp_path / "nope.txt"), "Why?"],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "no such file" in missing.stderr


@pytest.mark.slow
def test_a_second_question_loads_the_documents_cache_and_a_changed_document_does_not(default_checkpoint, arbor_home,
                                                                                      monkeypatch):
    import arbor_cli
    from arbor_cli import doc_cache

    model = arbor_cli.load(str(default_checkpoint.path), quiet=True)
    prefilled = []
    real = model.prefill
    monkeypatch.setattr(model, "prefill", lambda ids, cache: (prefilled.append(len(ids)), real(ids, cache))[1])
    text = document(6)  # ~2,000 tokens: the one-pass path
    first = ask(model, text, "What is the first word of the text?")
    assert first.path == "one pass" and len(prefilled) == 1 and prefilled[0] > 1000
    assert len(doc_cache.entries()) == 1
    again = ask(model, text, "What is the first word of the text?")
    assert len(prefilled) == 1  # the document came from disk: only the question was prefilled
    assert again.text == first.text
    changed = ask(model, text.replace("p0s0w0", "changed", 1), "What is the first word of the text?")
    assert len(prefilled) == 2 and len(doc_cache.entries()) == 2  # a fresh cache, not the old one
    assert changed.path == "one pass"


@pytest.mark.slow
def test_chat_doc_answers_each_message_about_the_document(default_checkpoint, tmp_path):
    import os
    import subprocess
    import sys

    doc = tmp_path / "keeper.txt"
    doc.write_text("The lighthouse keeper was named Henry Winstanley. He built the first tower in 1698.\n")
    env = {**os.environ, "ARBOR_HOME": str(tmp_path / "home")}  # the document's cache goes there
    done = subprocess.run([sys.executable, "-m", "arbor_cli", "chat", "--doc", str(doc), "--model",
                           str(default_checkpoint.path)], input="Who was the lighthouse keeper?\n",
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and "arbor:" not in done.stdout
    assert list((tmp_path / "home" / "doc-cache").glob("*.safetensors"))  # kept for the next question
