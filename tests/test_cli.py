"""The `arbor` command: chat, generate, pull/models/rm, info — through typer's CliRunner and real subprocesses."""

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest
from typer.testing import CliRunner

from arbor_cli.chat import ChatSession
from arbor_cli.cli import app
from arbor_cli.cli import chat as chat_cli
from arbor_cli.generate import GenerationOptions

ARBOR = [sys.executable, "-m", "arbor_cli"]


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def model_args(default_checkpoint):
    return ["--model", str(default_checkpoint.path), "--backend", "torch", "--device", "cpu"]


def one_line_error(result, code):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("arbor: error:"), result.stderr
    assert result.stdout == ""


# ---- fast: no model needed -------------------------------------------------------------------
def test_help_lists_the_commands(runner):
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for command in ("chat", "summarize", "generate", "pull", "models", "rm", "info"):
        assert command in r.stdout


@pytest.mark.parametrize("option", [["--temperature", "-1"], ["--top-p", "2"], ["--max-tokens", "0"],
                                    ["--top-k", "-3"], ["--temperature", "nan"], ["--seed", "-1"]])
def test_bad_sampling_values_exit_2_with_one_line(runner, option):
    one_line_error(runner.invoke(app, ["generate", "hello", *option]), 2)


def test_unknown_model_is_one_line_exit_1(runner):
    r = runner.invoke(app, ["generate", "hi", "--model", "no-such-model-anywhere"])
    one_line_error(r, 1)
    assert "unknown model" in r.stderr


def test_corrupt_model_dir_is_one_line_exit_1(runner, tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    one_line_error(runner.invoke(app, ["generate", "hi", "--model", str(tmp_path)]), 1)


def test_unknown_backend_is_a_clear_error(runner):
    r = runner.invoke(app, ["generate", "hi", "--backend", "tpu"])
    one_line_error(r, 2)  # a bad option value, like every other one (issue 11)
    assert "unknown backend" in r.stderr


def test_rm_unknown_model_fails_cleanly(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("ARBOR_HOME", str(tmp_path))
    one_line_error(runner.invoke(app, ["rm", "nothing-here"]), 1)


def test_models_json_on_an_empty_cache(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("ARBOR_HOME", str(tmp_path))
    r = runner.invoke(app, ["models", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout) == []


# ---- the default model --------------------------------------------------------------------------

@pytest.mark.slow
def test_generate_completes_a_prompt(runner, model_args):
    r = runner.invoke(app, ["generate", "The capital of France is", "-n", "8", *model_args])
    assert r.exit_code == 0, r.output
    assert "Paris" in r.stdout


@pytest.mark.slow
def test_generate_json_and_stop(runner, model_args):
    r = runner.invoke(app, ["generate", "Count: one, two, three,", "-n", "24", "--stop", "six", "--json", *model_args])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert set(out) == {"text", "tokens", "finish_reason", "context", "timings"}
    assert "six" not in out["text"] and out["finish_reason"] == "stop"


@pytest.mark.slow
def test_generate_reads_stdin_with_dash(runner, model_args):
    r = runner.invoke(app, ["generate", "-", "-n", "6", *model_args], input="The capital of France is")
    assert r.exit_code == 0 and "Paris" in r.stdout


@pytest.mark.slow
def test_seeded_sampling_is_reproducible(runner, model_args):
    args = ["generate", "Once upon a time", "-n", "16", "-t", "0.9", "--seed", "7", *model_args]
    first, second = runner.invoke(app, args), runner.invoke(app, args)
    assert first.exit_code == 0 and first.stdout == second.stdout


@pytest.mark.slow
def test_piped_chat_prints_only_the_reply(runner, model_args):
    r = runner.invoke(app, ["chat", *model_args], input="What is the capital of France?\n")
    assert r.exit_code == 0, r.output
    assert "Paris" in r.stdout and "<|im" not in r.stdout and ">>>" not in r.stdout


@pytest.mark.slow
def test_context_larger_than_possible_is_refused(runner, model_args):
    r = runner.invoke(app, ["generate", "hi", "--context", "1000000", *model_args])
    one_line_error(r, 1)
    assert "--context 1000000 needs" in r.stderr


def test_absurd_context_is_a_usage_error(runner):
    one_line_error(runner.invoke(app, ["generate", "hi", "--context", "99999999999"]), 2)


@pytest.mark.slow
def test_info_json_agrees_with_a_real_load(runner, model_args, default_model):
    r = runner.invoke(app, ["info", "--json", "--dtype", "float32", *model_args])  # as default_model loads
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    for key in ("backend", "device", "memory_total_bytes", "memory_free_bytes", "model", "trained_context",
                "max_context", "buckets"):
        assert key in info
    assert info["backend"] == "torch" and info["device"] == "cpu"
    assert info["memory_total_bytes"] == psutil.virtual_memory().total
    assert info["trained_context"] == 8192
    assert info["buckets"][0]["bytes"] > default_model.lm.weights_nbytes
    fits = [b["context"] for b in info["buckets"] if b["fits"]]
    assert info["max_context"] == max(fits)
    # the context the planner reports as fitting really loads: allocate its cache
    cache = default_model.new_cache(min(info["max_context"], 32768))
    assert cache.capacity == min(info["max_context"], 32768)


@pytest.mark.slow
def test_info_table_has_no_ansi_codes_in_a_pipe(model_args):
    r = subprocess.run([*ARBOR, "info", *model_args], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "NO_COLOR": "1"})
    assert r.returncode == 0, r.stderr
    assert "\x1b[" not in r.stdout + r.stderr
    assert "context buckets" in r.stdout and "131,072" in r.stdout


@pytest.mark.slow
def test_unwritable_stdout_is_one_line_exit_1(model_args):
    with open("/dev/full", "w") as full:
        r = subprocess.run([*ARBOR, "generate", "The capital of France is", "-n", "4", *model_args],
                           stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("arbor: error:") and "Traceback" not in r.stderr


@pytest.mark.slow
def test_ctrl_c_during_generation_exits_130(model_args):
    # as from a terminal: a background job of a non-interactive shell (`pytest … &`) starts with SIGINT ignored,
    # and the child would inherit that and never see the Ctrl-C
    proc = subprocess.Popen([*ARBOR, "generate", "Write a very long story about dragons.", "-n", "4000",
                             "--stop", "NEVER-APPEARS", *model_args, "--context", "8192"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = proc.stdout.read(1)  # the first streamed character: generation is under way
    assert first
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (len(out), err[-500:])
    assert "interrupted" in err and "Traceback" not in err


@pytest.mark.slow
def test_repl_slash_commands_and_a_reply(runner, model_args, tmp_path, monkeypatch):
    monkeypatch.setattr(chat_cli, "stdin_is_piped", lambda: False)
    saved = tmp_path / "conv.json"
    script = "\n".join(["/help", "What is the capital of France?", "/context", f"/save {saved}", "/reset",
                        "/context", f"/load {saved}", "/system Be brief.", "/nonsense", "/load /no/such/file",
                        "/exit", ""])
    r = runner.invoke(app, ["chat", "--max-tokens", "24", *model_args], input=script)
    assert r.exit_code == 0, r.output
    assert "Paris" in r.stdout
    assert "/reset" in r.stderr  # the help text
    assert "0 of 8192 tokens used" in r.stderr
    assert "saved 2 messages" in r.stderr and "loaded 2 messages" in r.stderr
    assert "unknown command" in r.stderr and "no such file" in r.stderr
    assert json.loads(saved.read_text())["messages"][0]["content"] == "What is the capital of France?"


@pytest.mark.slow
def test_repl_ctrl_c_stops_the_reply_and_keeps_the_session(default_model, monkeypatch, capsys):
    session = ChatSession(default_model, options=GenerationOptions(max_new_tokens=64), context=4096)
    original = session.send

    def interrupted(text):
        for i, piece in enumerate(original(text)):
            if i == 3:
                raise KeyboardInterrupt
            yield piece

    monkeypatch.setattr(session, "send", interrupted)
    chat_cli.stream_reply(session, "Tell me a story.")
    assert "reply stopped" in capsys.readouterr().err
    monkeypatch.undo()
    assert session.turns[-1]["role"] == "assistant" and session.tokens_used() > 0
    reply = "".join(session.send("What is the capital of France?"))
    assert "Paris" in reply


def test_models_available_lists_every_registry_model_with_its_size_licence_and_use(runner, tmp_path, monkeypatch):
    import json

    from arbor_weights.registry import DEFAULT_MODEL, KNOWN_MODELS

    monkeypatch.setenv("ARBOR_HOME", str(tmp_path / "home"))
    r = runner.invoke(app, ["models", "--available", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [row["name"] for row in rows] == list(KNOWN_MODELS)
    for row in rows:  # what a user needs to choose: how much it downloads, its terms, what it is for
        assert row["download_bytes"] > 10_000_000 and row["licence"] and row["good_for"]
        assert row["installed"] is False and row["default"] is (row["name"] == DEFAULT_MODEL)
    table = runner.invoke(app, ["models", "--available"])
    assert table.exit_code == 0
    assert "qwen2.5-coder-1.5b-instruct" in table.stdout and "1,117 MB" in table.stdout


def test_info_says_what_the_weights_are_and_why_a_count_differs_from_a_model_card():
    """Issue 32: `torch on cpu (float32)` stood above `(int4)` weights, and a separate output head made the
    count differ from the model card's without a word."""
    from arbor_cli.cli.info import _parameters

    tied = {"parameters": 134_515_008, "output_head_parameters": 0}
    assert _parameters(tied) == "134.5M parameters"
    untied = {"parameters": 1_777_088_000, "output_head_parameters": 151_936 * 1536}
    assert _parameters(untied) == ("1,777.1M parameters (233.4M of them an output head kept apart from the "
                                   "embedding; 1,543.7M without it)")
