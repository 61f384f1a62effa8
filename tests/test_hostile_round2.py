"""Hostile inputs, second round (issue 31), where the user meets them on the command line: a saved chat
that is not one, special files in a directory, damaged checkpoints and results, garbage numbers in options
and the environment. Each case: the exit code, one line on stderr, nothing on stdout, no traceback."""

import json
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
