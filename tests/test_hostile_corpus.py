"""A corpus of nasty documents and models through every command, as real processes with a time limit
each: every case ends with exit 0, 1 or 2, never a traceback, nothing on stdout when it fails, and
the model cache exactly as it was."""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from gguf_files import Q, write_tiny_gguf

ARBOR = [sys.executable, "-m", "arbor_cli"]
CASE_SECONDS = 90
NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

pytestmark = pytest.mark.slow  # ~60 processes


def documents(root: Path) -> dict[str, Path]:
    rng = random.Random(0)
    d = root / "documents"
    d.mkdir()
    files = {
        "binary": bytes(rng.randrange(256) for _ in range(20_000)),
        "nul bytes": b"a perfectly ordinary sentence\x00 with a NUL in it.\n" * 50,
        "nested markup": ("[bold]" * 400 + "[/x] [link=file:///etc/passwd]click[/link] " + "[/bold]" * 400
                          + "\n\nA last [red]sentence[/red].").encode(),
        "no whitespace": "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=6_000)).encode(),  # the tiny model: a token a byte
        "mixed encodings": ("Caf\u00e9 na\u00efve. ".encode() + "r\xe9sum\xe9 latin-1. ".encode("latin-1")
                            + b"\xff\xfe broken \xc3 utf-8. " + "\u4e2d\u6587 text.".encode()) * 40,
        "huge": b"word " * 300_000,  # 1.5 MB, over the 1 MB limit these runs set
        "empty": b"  \n\n\t",
    }
    paths = {}
    for name, data in files.items():
        paths[name] = d / (name.replace(" ", "_") + ".txt")
        paths[name].write_bytes(data)
    paths["a device"] = Path("/dev/zero")
    paths["a directory"] = d
    return paths


def models(root: Path) -> dict[str, Path]:
    d = root / "models"
    d.mkdir()
    broken, truncated, hostile, good = d / "broken.gguf", d / "truncated.gguf", d / "hostile.gguf", d / "good.gguf"
    broken.write_bytes(b"GGUF" + bytes(random.Random(1).randrange(256) for _ in range(5000)))
    write_tiny_gguf(good, qtype=Q.Q8_0, chat_template=CHATML)
    truncated.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    write_tiny_gguf(hostile, qtype=Q.Q8_0, chat_template=NESTED_LOOPS)
    not_a_model = d / "passwd"
    not_a_model.write_text("root:x:0:0:root:/root:/bin/bash\n")
    garbage_dir = d / "garbage-dir"
    garbage_dir.mkdir()
    (garbage_dir / "config.json").write_text("{not json")
    return {"broken gguf": broken, "truncated gguf": truncated, "hostile template": hostile,
            "not a model": not_a_model, "garbage directory": garbage_dir, "good": good}


# per-machine builds derived from a model, never from the input: the compiled decode step and the CPU weight
# layout. A command may build one before it meets the bad input (written whole: a temp name, then renamed), so
# their finished files are not compared; a temp file left in them still is
BUILDS = ("compiled", "layouts")


def snapshot(home: Path) -> dict[str, tuple[int, int] | str]:
    """Every file of the cache with its size and mtime, and every folder (a leftover empty temp or lock
    folder counts; a folder's own mtime changes when a failed install cleans up after itself); of BUILDS,
    only a leftover temp file (a name starting with ".")."""
    def kept(p: Path) -> bool:
        parts = p.relative_to(home).parts
        return not (parts[0] in BUILDS and len(parts) > 1 and not p.name.startswith("."))
    return {str(p.relative_to(home)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "folder"
            for p in sorted(home.rglob("*")) if kept(p)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    home = root / "arbor-home"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("ARBOR_")},  # none of the shell's settings
           "ARBOR_HOME": str(home), "ARBOR_MAX_INPUT_MB": "1", "NO_COLOR": "1",
           # the suite's compile policy (conftest: built in the command, never by a detached process)
           "ARBOR_COMPILE": os.environ.get("ARBOR_COMPILE", "sync")}
    paths = models(root)
    done = subprocess.run([*ARBOR, "pull", str(paths["good"])], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    installed = next(p for p in (home / "models").iterdir() if p.is_dir())
    # the good model answers before any case (and its BUILDS are made here, not in whichever case comes first)
    # 24 tokens: past the eager first steps (compiled_decode.EAGER_FIRST), so the compiled step is built here
    warm = subprocess.run([*ARBOR, "generate", "hi", "--model", installed.name, "--max-tokens", "24"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert warm.returncode == 0, warm.stderr
    hanging = root / "hanging-template"  # a model directory (installed before templates were checked) whose
    shutil.copytree(installed, hanging)  # template never finishes: bounded at chat time
    (hanging / "chat_template.jinja").write_text(NESTED_LOOPS)
    paths["hanging template"] = hanging
    return {"root": root, "home": home, "env": env, "documents": documents(root), "models": paths,
            "good": installed.name}


def run_case(corpus, args: list[str], stdin: str = "", shell_stdin: str | None = None):
    """`arbor ARGS` with `stdin` as its input, or `shell_stdin` a shell redirection or producer
    ("< FILE", "yes |"); checks what every case must show and returns the result."""
    before = snapshot(corpus["home"])
    if shell_stdin is None:
        command = [*ARBOR, *args]
    else:
        line = " ".join(map(shlex.quote, [*ARBOR, *args]))
        command = ["sh", "-c", f"{shell_stdin} {line}" if shell_stdin.endswith("|") else f"{line} {shell_stdin}"]
    result = subprocess.run(command, env=corpus["env"], capture_output=True, text=True, timeout=CASE_SECONDS,
                            input=stdin if shell_stdin is None else None,
                            stdin=subprocess.DEVNULL if shell_stdin is not None and "<" not in shell_stdin else None)
    assert result.returncode in (0, 1, 2), (args, result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, (args, result.stderr[-2000:])
    if result.returncode != 0:
        assert result.stdout == "", (args, result.stdout[:500])
        assert result.stderr.strip().splitlines()[-1].startswith("arbor: error:"), (args, result.stderr[-500:])
    assert snapshot(corpus["home"]) == before, args
    return result


DOCUMENT_COMMANDS = {
    "summarize": lambda doc, model: (["summarize", str(doc), "--model", model, "--words", "20"], None),
    "generate < FILE": lambda doc, model: (["generate", "-", "--model", model, "--max-tokens", "4"], f"< {doc}"),
    "eval ppl": lambda doc, model: (["eval", "ppl", str(doc), "--model", model, "--lengths", "256",
                                     "--window", "16"], None),
}
GOOD_DOCUMENTS = ["nested markup", "no whitespace", "mixed encodings"]
BAD_DOCUMENTS = ["binary", "nul bytes", "huge", "empty", "a device", "a directory"]


@pytest.mark.parametrize("command, document", [
    (command, document) for command in sorted(DOCUMENT_COMMANDS) for document in GOOD_DOCUMENTS + BAD_DOCUMENTS
    if not (command == "generate < FILE" and document == "a directory")  # a shell cannot redirect a directory
    and not (command == "summarize" and document == "a directory")])  # summarize reads directories: below
def test_a_nasty_document_through_each_command(corpus, command, document):
    args, shell_stdin = DOCUMENT_COMMANDS[command](corpus["documents"][document], corpus["good"])
    r = run_case(corpus, args, shell_stdin=shell_stdin)
    assert r.returncode == (1 if document in BAD_DOCUMENTS else 0), (command, document, r.stderr[-500:])


def test_summarize_reads_the_good_files_of_a_hostile_directory_and_names_each_bad_one_once(corpus):
    """The corpus directory mixes readable documents with binary, NUL-filled, huge and empty files:
    the good ones are summarised (exit 0) and every bad one is named in exactly one warning line."""
    directory = corpus["documents"]["a directory"]
    r = run_case(corpus, ["summarize", str(directory), "--model", str(corpus["good"]), "--words", "20", "--json"])
    assert r.returncode == 0, r.stderr[-500:]
    result = json.loads(r.stdout)
    read = {Path(d["name"]).name for d in result["documents"]}
    skipped = {Path(s["name"]).name for s in result["skipped"]}
    assert read == {corpus["documents"][name].name for name in GOOD_DOCUMENTS}
    assert skipped == {corpus["documents"][name].name for name in ("binary", "nul bytes", "huge", "empty")}
    warnings = [line for line in r.stderr.splitlines() if line.startswith("arbor: warning:")]
    for name in skipped:
        assert sum(name in line for line in warnings) == 1, (name, warnings)


@pytest.mark.parametrize("command", ["summarize -", "generate -", "chat"])
def test_an_endless_pipe_stops_at_the_input_limit(corpus, command):
    args = [*command.split(), "--model", corpus["good"]]
    r = run_case(corpus, args, shell_stdin="yes 'all work and no play' |")
    assert r.returncode == 1 and "larger than the 1 MB input limit" in r.stderr


MODEL_COMMANDS = {
    "pull": lambda model: ["pull", model],
    "info": lambda model: ["info", "--model", model],
    "generate": lambda model: ["generate", "hi", "--model", model, "--max-tokens", "2"],
    "chat": lambda model: ["chat", "--model", model, "--max-tokens", "2"],
    "summarize": lambda model: ["summarize", str(Path(__file__).parents[1] / "README.md"), "--model", model],
    "bench": lambda model: ["bench", "--model", model, "--contexts", "256", "--tokens", "2"],
}


@pytest.mark.parametrize("command", sorted(MODEL_COMMANDS))
@pytest.mark.parametrize("model", ["broken gguf", "truncated gguf", "hostile template", "not a model",
                                   "garbage directory"])
def test_a_broken_or_hostile_model_through_each_command(corpus, command, model):
    r = run_case(corpus, MODEL_COMMANDS[command](str(corpus["models"][model])), stdin="hi")
    assert r.returncode == 1, (command, model, r.stderr[-500:])


def test_chat_with_a_model_whose_template_never_finishes(corpus):
    r = run_case(corpus, ["chat", "--model", str(corpus["models"]["hanging template"]), "--max-tokens", "2"],
                 stdin="hello")
    assert r.returncode == 1 and "did not finish" in r.stderr


def test_the_good_model_still_answers_after_the_corpus(corpus):
    r = run_case(corpus, ["generate", "hi", "--model", corpus["good"], "--max-tokens", "3"])
    assert r.returncode == 0
