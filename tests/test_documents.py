"""Several documents and the user's own instruction: `arbor summarize FILE… DIR… --focus`, `arbor ask DIR QUESTION`.

The fake model (conftest) records its prompts; the real default model reads a directory of documents on
different subjects in the slow tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import FakeModel, document

from arbor_cli.summarize import WHOLE_SET_HEADING, SummaryOptions, summarize_documents
from arbor_core.errors import UsageError

SUBJECTS = {
    "bees.txt": ("Honey bees live in colonies ruled by a single queen. Worker bees collect nectar from flowers and "
                 "turn it into honey, which they store in wax combs. A strong hive holds about fifty thousand bees "
                 "in summer."),
    "volcanoes.txt": ("A volcano erupts when molten rock called magma rises through the crust. Mount Etna in Sicily "
                      "is one of the most active volcanoes on Earth. Lava flows can bury villages, and ash clouds "
                      "close airports."),
    "notes/chess.txt": ("Chess is played on a board of sixty-four squares. Each player starts with sixteen pieces, "
                        "and the game ends in checkmate when the king cannot escape capture. The world champion "
                        "Magnus Carlsen held the title for ten years."),
}


def make_folder(tmp_path, subjects=SUBJECTS):
    folder = tmp_path / "docs"
    for name, text in subjects.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text + "\n")
    return folder


# ---- summarize_documents with the fake model -------------------------------------------------------------
def test_a_set_that_fits_is_read_in_one_pass_each_document_under_its_name():
    model = FakeModel(largest=4096)
    docs = [(name, text) for name, text in SUBJECTS.items()]
    summary = summarize_documents(model, docs, SummaryOptions.build(100))
    assert len(model.prompts) == 1 and summary.chunks == 1
    for i, (name, text) in enumerate(docs, 1):
        assert f"Document {i}: {name}" in model.prompts[0] and text in model.prompts[0]
    assert [d["name"] for d in summary.documents] == list(SUBJECTS)
    assert all(d["parts"] == 1 and d["tokens"] > 0 for d in summary.documents)


def test_bullets_give_a_group_per_document_then_the_whole():
    model = FakeModel(largest=4096, answer=lambda prompt: "- " + ("honey" if "queen" in prompt else "a point"))
    docs = list(SUBJECTS.items())
    summary = summarize_documents(model, docs, SummaryOptions.build(100, "bullets"))
    groups = summary.text.split("\n\n")
    assert [g.splitlines()[0] for g in groups] == [f"{name}:" for name in SUBJECTS] + [f"{WHOLE_SET_HEADING}:"]
    assert "honey" in groups[0] and "honey" not in groups[1]
    assert "Here are summaries of several documents" in model.prompts[-1]
    assert all(f"{name}:" in model.prompts[-1] for name in SUBJECTS)  # the combination knows each one's name


def test_a_set_too_long_for_one_context_is_summarised_per_document_then_combined():
    model = FakeModel(largest=4096)
    docs = [("long-a.txt", document(150)), ("short-b.txt", document(3))]
    summary = summarize_documents(model, docs, SummaryOptions.build(100))
    a, b = summary.documents
    assert a["parts"] >= 3 and b["parts"] == 1 and summary.chunks == a["parts"] + b["parts"]
    assert "long-a.txt:" in model.prompts[-1] and "short-b.txt:" in model.prompts[-1]


def test_the_focus_is_in_every_prompt_of_a_long_run():
    model = FakeModel(largest=4096)
    focus = "Summarize the key findings about volcanoes."
    summarize_documents(model, [("a.txt", document(150)), ("b.txt", document(40))], SummaryOptions.build(100, focus=focus))
    assert len(model.prompts) > 4
    assert all(focus in prompt for prompt in model.prompts)  # every part's notes, each summary, the combination


@pytest.mark.parametrize("focus", ["", "   ", "x" * 501])
def test_an_empty_or_overlong_focus_is_a_usage_error(focus):
    with pytest.raises(UsageError, match="--focus"):
        SummaryOptions.build(100, focus=focus)


def test_ask_reads_the_documents_under_their_names_and_names_the_one_quoted(monkeypatch):
    from arbor_cli import ask as ask_module
    from arbor_cli.ask import Answer, Finding, ask_documents

    seen = {}

    def fake_ask(model, text, question, *, name_of=None, **options):
        seen["text"], seen["name_of"] = text, name_of
        start = text.index("Mount Etna")
        quote = "Mount Etna in Sicily is one of the most active volcanoes on Earth."
        return Answer(f"Mount Etna ({name_of(start)}, part 2 of 3: \u201c{quote}\u201d)", "parts", 3,
                      findings=[Finding(2, "Mount Etna", quote, start, -1.0, True, "Mount Etna")])

    monkeypatch.setattr(ask_module, "ask", fake_ask)
    answer = ask_documents(None, list(SUBJECTS.items()), "Which volcano?")
    text = seen["text"]
    assert [line for line in text.splitlines() if line.startswith("Document: ")] == [
        f"Document: {name}" for name in SUBJECTS]
    assert seen["name_of"](text.index("Worker bees")) == "bees.txt"
    assert seen["name_of"](text.index("Magnus")) == "notes/chess.txt"
    assert answer.document == "volcanoes.txt" and "volcanoes.txt, part 2 of 3" in answer.text
    assert [d["name"] for d in answer.to_json()["documents"]] == list(SUBJECTS)
    single = Answer("x", "one pass")
    assert "document" not in single.to_json()  # one document: the JSON it always had


# ---- the CLI: reading files, directories and bad input -----------------------------------------------------
def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "arbor_cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env={**os.environ, "NO_COLOR": "1"})


def test_reading_a_folder_skips_binaries_links_back_up_and_empty_files_with_one_line_each(tmp_path):
    from arbor_cli.cli.common import read_documents

    folder = make_folder(tmp_path)
    (folder / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")
    (folder / "empty.txt").write_text("")
    (folder / ".hidden.txt").write_text("not read")
    (folder / "loop").symlink_to(folder)  # a link back up the tree
    (folder / "gone.txt").symlink_to(tmp_path / "missing.txt")  # a dangling link
    docs, skipped = read_documents([str(folder)])
    assert [name for name, _ in docs] == sorted(SUBJECTS)
    assert sorted(os.path.basename(name) for name, _ in skipped) == ["empty.txt", "gone.txt", "image.png", "loop"]


def test_the_documents_library_prints_nothing_and_hands_each_skipped_file_to_warn(tmp_path, capsys):
    from arbor_cli.documents import Document, read_documents

    folder = make_folder(tmp_path)
    (folder / "empty.txt").write_text("")
    (folder / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    heard = []
    docs, skipped = read_documents([str(folder)], 1 << 20, heard.append)
    assert all(isinstance(doc, Document) for doc in docs)  # a (name, text) pair, named
    assert [doc.name for doc in docs] == sorted([*SUBJECTS, "latin1.txt"]) and len(skipped) == 1
    assert heard[0].startswith("skipped: ") and "empty.txt is empty" in heard[0]
    assert "latin1.txt is not valid UTF-8" in heard[1] and len(heard) == 2
    assert capsys.readouterr() == ("", "")


def test_documents_in_a_folder_are_named_by_their_path_below_it_wherever_it_lies(tmp_path, monkeypatch):
    """The prompt names a document `notes/chess.txt` whether the folder was given absolute, relative or as '.':
    the same folder in another place reads the same (and the user's directory layout stays out of it); with
    several sources each keeps its folder's name, so two folders' README.md stay apart."""
    from arbor_cli.cli.common import read_documents

    folder = make_folder(tmp_path)
    expected = sorted(SUBJECTS)
    assert [name for name, _ in read_documents([str(folder.resolve())])[0]] == expected
    monkeypatch.chdir(tmp_path)
    assert [name for name, _ in read_documents(["docs/"])[0]] == expected
    other = make_folder(tmp_path / "more")
    both = [name for name, _ in read_documents([str(folder), str(other)])[0]]
    assert both == [f"docs/{name}" for name in expected] * 2
    monkeypatch.chdir(folder)
    assert [name for name, _ in read_documents(["."])[0]] == expected
    assert [name for name, _ in read_documents(["bees.txt", "notes/chess.txt"])[0]] == ["bees.txt", "notes/chess.txt"]


@pytest.mark.parametrize("setup, says", [
    (lambda d: None, "no files in it"),  # an empty directory
    (lambda d: (d / "a.bin").write_bytes(b"\x00\x01\x02"), "1 skipped"),  # only binaries
])
def test_a_folder_with_no_document_is_an_error(tmp_path, setup, says):
    folder = tmp_path / "empty"
    folder.mkdir()
    setup(folder)
    done = run("summarize", str(folder))
    assert done.returncode == 1 and says in done.stderr and "Traceback" not in done.stderr


def test_a_path_that_matches_nothing_is_an_error(tmp_path):
    done = run("summarize", str(tmp_path / "*.md"), str(tmp_path))
    assert done.returncode == 1 and "no such file or directory" in done.stderr


# ---- the real default model --------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_folder_summary_covers_every_subject_and_bullets_name_them(default_checkpoint, tmp_path):
    folder = make_folder(tmp_path)
    (folder / "logo.png").write_bytes(b"\x89PNG\x00binary")
    done = run("summarize", str(folder), "--json", "--model", str(default_checkpoint.path))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    text = result["text"].lower()
    assert all(word in text for word in ("bee", "volcano", "chess")), result["text"]
    assert len(result["documents"]) == 3 and [s["name"].endswith("logo.png") for s in result["skipped"]] == [True]
    assert done.stderr.count("skipped") == 1
    bullets = run("summarize", str(folder), "--style", "bullets", "--model", str(default_checkpoint.path))
    groups = bullets.stdout.split("\n\n")
    assert len(groups) == 4 and groups[-1].startswith(f"{WHOLE_SET_HEADING}:")
    for group, word in zip(groups, ("bee", "chess", "volcan")):  # sorted: bees, notes/chess, volcanoes
        assert word in group.lower(), group


@pytest.mark.slow
def test_a_focus_pulls_its_subject_to_the_front(default_checkpoint, tmp_path):
    folder = make_folder(tmp_path)
    common = ["summarize", str(folder), "--model", str(default_checkpoint.path)]
    plain = run(*common)
    focused = run(*common, "--focus", "Only report what the documents say about chess.")
    assert plain.returncode == 0 and focused.returncode == 0, plain.stderr + focused.stderr
    assert "chess" not in plain.stdout.lower()[:100]  # left alone, the model begins elsewhere (volcanoes, bees)
    assert "chess" in focused.stdout.lower()[:100], focused.stdout


@pytest.mark.slow
def test_ask_a_folder_names_the_document_with_the_fact(default_checkpoint, tmp_path):
    folder = make_folder(tmp_path)
    done = run("ask", str(folder), "Which volcano in Sicily is one of the most active?", "--json",
               "--model", str(default_checkpoint.path))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert "Etna" in result["text"] and result["document"].endswith("volcanoes.txt")
    assert "volcanoes.txt" in result["text"]
