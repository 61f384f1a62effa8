"""Hostile inputs, second round (issue 31), where the user meets them on the command line: a saved chat
that is not one, special files in a directory, damaged checkpoints and results, garbage numbers in options
and the environment. Each case: the exit code, one line on stderr, nothing on stdout, no traceback."""

import json
import os
import subprocess
import sys

import pytest
from conftest import FakeModel
from typer.testing import CliRunner

from arbor_cli.chat import ChatSession
from arbor_cli.cli.chat import run_slash_command

ARBOR = [sys.executable, "-m", "arbor_cli"]


@pytest.fixture
def runner():
    return CliRunner()


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("arbor: error:"), stderr
    assert "Traceback" not in stderr
    return lines[0]


# ---- chat's /load: the whole file is checked ---------------------------------------------------------
@pytest.mark.parametrize("system", [{"role": "pirate"}, ["x"], 5])
def test_load_refuses_a_saved_chat_whose_system_is_not_text_and_keeps_the_conversation(tmp_path, capsys, system):
    saved = tmp_path / "chat.json"
    saved.write_text(json.dumps({"format": "arbor-chat/1", "system": system,
                                 "messages": [{"role": "user", "content": "hi"}]}))
    session = ChatSession(FakeModel(context=4096), system="kept")
    session.turns = [{"role": "user", "content": "before"}]
    run_slash_command(session, f"/load {saved}")
    line = one_error_line(capsys.readouterr().err)
    assert f"{saved} is not a saved arbor chat: its system prompt is a" in line
    assert session.system == "kept" and session.turns == [{"role": "user", "content": "before"}]


# ---- special files in a directory are skipped, never opened ---------------------------------------------
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
@pytest.mark.parametrize("command", [["ask", "{d}", "Who kept the lamp?"], ["summarize", "{d}"]])
def test_a_fifo_in_a_directory_is_skipped_with_one_line_not_waited_on(tmp_path, command):
    d = tmp_path / "d"
    d.mkdir()
    (d / "notes.txt").write_text("The keeper lit the lamp at dusk.\n")
    os.mkfifo(d / "p")
    args = [a.format(d=d) for a in command]
    r = subprocess.run([*ARBOR, *args, "--model", str(tmp_path / "no-such-model")], capture_output=True, text=True,
                       timeout=60, stdin=subprocess.DEVNULL, env={**os.environ, "NO_COLOR": "1"})
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines[0] == f"arbor: warning: skipped: {d / 'p'} is a FIFO (named pipe), not a file", r.stderr
    assert len(lines) == 2 and lines[1].startswith("arbor: error:") and "no-such-model" in lines[1]  # then the model
    assert r.returncode == 1 and r.stdout == "" and "Traceback" not in r.stderr


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_reading_a_directory_with_a_fifo_gives_its_files_and_names_the_fifo(tmp_path):
    from arbor_cli.documents import read_documents

    (tmp_path / "a.txt").write_text("alpha\n")
    os.mkfifo(tmp_path / "p")
    warned = []
    documents, skipped = read_documents([str(tmp_path)], 1 << 20, warned.append)
    assert [d.name for d in documents] == ["a.txt"] and [s for s, _ in skipped] == [str(tmp_path / "p")]
    assert warned == [f"skipped: {tmp_path / 'p'} is a FIFO (named pipe), not a file"]
