"""Careless and hostile input at the command line: closed streams, rich markup in names, endless and
huge inputs, bad option values. Each case exits 0, 1 or 2 with at most one line on stderr and never a
traceback; stdout carries only an answer."""

import os
import subprocess
import sys

import pytest
from conftest import FakeModel
from typer.testing import CliRunner

from arbor_cli.chat import ChatSession
from arbor_cli.cli import app
from arbor_cli.cli.chat import run_slash_command

ARBOR = [sys.executable, "-m", "arbor_cli"]


@pytest.fixture
def runner():
    return CliRunner()


def shell(command: str, **env) -> subprocess.CompletedProcess:
    """`arbor` (as `python -m arbor_cli`) run by sh, so tests can close descriptors the way a shell does."""
    prog = " ".join(ARBOR)
    return subprocess.run(["sh", "-c", command.replace("arbor", prog, 1)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env}, stdin=subprocess.DEVNULL)


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("arbor: error:"), stderr
    assert "Traceback" not in stderr
    return lines[0]


# ---- closed standard streams ------------------------------------------------------------------
@pytest.mark.parametrize("command", ["arbor --help >&-", "arbor models >&-", "arbor >&-"])
def test_a_closed_stdout_is_one_line_exit_1_not_a_traceback(command):
    r = shell(command)
    assert r.returncode == 1
    assert one_error_line(r.stderr) == "arbor: error: cannot write or read: standard output is closed"


def test_a_closed_stderr_never_sends_the_error_to_stdout():
    r = shell("arbor generate --bogus 2>&-")
    assert r.returncode == 2 and r.stdout == ""


# ---- rich markup in user text -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["[/x]latin.txt", "[bold]latin.txt"])
def test_markup_in_a_file_name_is_shown_as_written(runner, tmp_path, name):
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)  # "[/x]latin.txt" is the file x]latin.txt in "["
    (tmp_path / name).write_bytes("caf\xe9 au lait, na\xefve r\xe9sum\xe9.\n".encode("latin-1"))
    r = runner.invoke(app, ["summarize", str(tmp_path / name), "--model", str(tmp_path / "no-such-model")])
    assert r.exit_code == 1 and r.stdout == ""
    warning, error = [line for line in r.stderr.splitlines() if line.strip()]
    assert warning.startswith("arbor: warning:") and f"{tmp_path / name} is not valid UTF-8" in warning
    assert error.startswith("arbor: error:") and "MarkupError" not in r.stderr and "internal error" not in r.stderr


# ---- endless and huge inputs --------------------------------------------------------------------
def test_a_device_that_never_ends_is_refused_at_once(runner):
    r = runner.invoke(app, ["summarize", "/dev/zero"])
    assert r.exit_code == 1 and r.stdout == ""
    assert one_error_line(r.stderr) == ("arbor: error: /dev/zero is a device, not a text file "
                                        "(for a pipe or stdin use '-')")


def test_an_endless_pipe_stops_at_the_input_limit():
    r = shell("yes 'all work and no play' | arbor summarize -", ARBOR_MAX_INPUT_MB="1")
    assert r.returncode == 1 and r.stdout == ""
    assert one_error_line(r.stderr) == ("arbor: error: <stdin> is larger than the 1 MB input limit; raise it "
                                        "with --max-input-mb or ARBOR_MAX_INPUT_MB")


def test_a_file_over_the_limit_is_refused_and_the_flag_raises_it(runner, tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("word " * 300_000)  # 1.5 MB
    r = runner.invoke(app, ["summarize", str(big)], env={"ARBOR_MAX_INPUT_MB": "1"})
    assert r.exit_code == 1 and "larger than the 1 MB input limit" in one_error_line(r.stderr)
    r = runner.invoke(app, ["summarize", str(big), "--max-input-mb", "2", "--model", str(tmp_path / "none")],
                      env={"ARBOR_MAX_INPUT_MB": "1"})
    assert r.exit_code == 1 and "larger than" not in r.stderr  # read; then the (missing) model fails


@pytest.mark.parametrize("value", ["0", "-3", "x", "1.5"])
def test_a_bad_input_limit_in_the_environment_is_a_usage_error(runner, value, tmp_path):
    (tmp_path / "a.txt").write_text("text")
    r = runner.invoke(app, ["summarize", str(tmp_path / "a.txt")], env={"ARBOR_MAX_INPUT_MB": value})
    assert r.exit_code == 2 and "ARBOR_MAX_INPUT_MB must be a whole number" in one_error_line(r.stderr)


def test_a_bad_input_limit_flag_is_a_usage_error(runner, tmp_path):
    (tmp_path / "a.txt").write_text("text")
    r = runner.invoke(app, ["summarize", str(tmp_path / "a.txt"), "--max-input-mb", "0"])
    assert r.exit_code == 2 and "--max-input-mb must be at least 1" in one_error_line(r.stderr)


# ---- exit codes and option names ----------------------------------------------------------------
@pytest.mark.parametrize("args, words", [
    (["--backend", "nosuch"], "unknown backend 'nosuch'"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--backend", "mlx", "--device", "tpu"], "device 'tpu' is not supported by the mlx backend"),
])
def test_an_unknown_backend_or_device_is_a_usage_error_exit_2(runner, args, words):
    r = runner.invoke(app, ["generate", "hi", *args])
    assert r.exit_code == 2 and r.stdout == "" and words in one_error_line(r.stderr)


def test_plain_arbor_prints_the_help_and_no_error(runner):
    r = shell("arbor")
    assert r.returncode == 0 and "Usage: arbor" in r.stdout and r.stderr == ""


@pytest.mark.parametrize("args, option", [
    (["generate", "hi", "--max-tokens", "0"], "--max-tokens"),
    (["generate", "hi", "--top-p", "2"], "--top-p"),
    (["generate", "hi", "--repeat-penalty", "0"], "--repeat-penalty"),
    (["generate", "hi", "--kv-bits", "4"], "--kv-bits"),
    (["generate", "hi", "--context", "3"], "--context"),
])
def test_errors_name_the_option_the_user_typed(runner, args, option):
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and r.stdout == ""
    assert option in one_error_line(r.stderr)


# ---- chat's /save ------------------------------------------------------------------------------------
def test_a_failed_save_names_the_users_file_not_a_temp_file(tmp_path, capsys):
    target = tmp_path / "no-such-dir" / "chat.json"
    session = ChatSession(FakeModel(context=4096))
    with pytest.raises(OSError) as e:
        session.save(target)
    assert e.value.filename == str(target)
    run_slash_command(session, f"/save {target}")
    err = capsys.readouterr().err
    assert one_error_line(err) == f"arbor: error: cannot write or read ({target}): No such file or directory"


def test_a_closed_stdin_reads_as_empty():
    r = shell("arbor summarize <&-")
    assert r.returncode == 1 and one_error_line(r.stderr) == "arbor: error: <stdin> is empty"


def test_help_into_a_pipe_that_closes_early_is_quiet():
    r = shell("arbor --help | head -c 1 > /dev/null")
    assert r.stderr == ""
