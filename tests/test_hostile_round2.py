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
from arbor_cli.cli import app
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


# ---- numbers: one parser for the environment and the command line ---------------------------------------
@pytest.mark.parametrize("variable, value, words", [
    ("ARBOR_DOC_CACHE_MB", "nan", "ARBOR_DOC_CACHE_MB must be a number of at least 0, got 'nan'"),
    ("ARBOR_DOC_CACHE_MB", "inf", "ARBOR_DOC_CACHE_MB must be a number of at least 0, got 'inf'"),
    ("ARBOR_DOC_CACHE_MB", "-1", "ARBOR_DOC_CACHE_MB must be a number of at least 0, got '-1'"),
    ("ARBOR_DOC_CACHE_MB", "abc", "ARBOR_DOC_CACHE_MB must be a number of at least 0, got 'abc'"),
    ("ARBOR_PREFILL_CHUNK", "abc", "ARBOR_PREFILL_CHUNK must be a whole number of at least 0, got 'abc'"),
    ("ARBOR_PREFILL_CHUNK", "-5", "ARBOR_PREFILL_CHUNK must be a whole number of at least 0, got '-5'"),
    ("ARBOR_COMPILE", "maybe", "ARBOR_COMPILE must be 1 or 0 (on or off) or sync, got 'maybe'"),
    ("ARBOR_CUDA_GRAPHS", "2", "ARBOR_CUDA_GRAPHS must be 1 or 0 (on or off), got '2'"),
])
def test_a_garbage_number_in_the_environment_is_a_usage_error_naming_it(runner, tmp_path, variable, value, words):
    r = runner.invoke(app, ["generate", "Hi", "--model", str(tmp_path / "no-such-model")], env={variable: value})
    assert r.exit_code == 2 and r.stdout == "" and one_error_line(r.stderr) == f"arbor: error: {words}"


@pytest.mark.parametrize("args, words", [
    (["export", "{m}", "{out}", "--context", "-5"], "--context must be a whole number of at least 1, got -5"),
    (["grow", "{m}", "{out}", "--depth", "nan"], "--depth must be a number of at least 1, got nan"),
    (["grow", "{m}", "{out}", "--depth", "inf"], "--depth must be a number of at least 1, got inf"),
    (["grow", "{m}", "{out}", "--width", "-inf"], "--width must be a number of at least 1, got -inf"),
    (["train", "{text}", "--model", "{m}", "--out", "{out}", "--lr", "nan"], "--lr must be a number above 0, got nan"),
    (["train", "{text}", "--model", "{m}", "--out", "{out}", "--lora", "100000"],
     "--lora must be a whole number of at least 1 and at most 16, got 100000"),  # the tiny model's k/v width
    (["train", "{text}", "--model", "{m}", "--out", "{out}", "--rope", "yarn:nan"],
     "--rope takes linear:F or yarn:F with a factor F > 1, got 'yarn:nan'"),
])
def test_a_garbage_number_on_the_command_line_is_a_usage_error_naming_the_option(runner, tiny_checkpoint, tmp_path,
                                                                                   args, words):
    m = tiny_checkpoint().path
    (tmp_path / "text.txt").write_text("some text\n")
    filled = [a.format(m=m, out=tmp_path / "out", text=tmp_path / "text.txt") for a in args]
    r = runner.invoke(app, filled)
    assert r.exit_code == 2 and r.stdout == "" and one_error_line(r.stderr) == f"arbor: error: {words}"
    assert not (tmp_path / "out").exists()


def test_a_growth_the_memory_cannot_hold_is_refused_before_reading_anything(runner, tiny_checkpoint, tmp_path,
                                                                              monkeypatch):
    import psutil

    from arbor_weights import grow

    m = tiny_checkpoint().path
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("VM", (), {"available": 50_000_000})())
    monkeypatch.setattr(grow, "read_float_state", lambda checkpoint: pytest.fail("read before refusing"))
    r = runner.invoke(app, ["grow", str(m), str(tmp_path / "out"), "--depth", "1000"])
    assert r.exit_code == 2 and r.stdout == "" and not (tmp_path / "out").exists()
    assert one_error_line(r.stderr).startswith("arbor: error: growing by --depth 1000 --width 1 gives 2,000 layers "
                                               "and needs about ")


# ---- a damaged training checkpoint ----------------------------------------------------------------------
def test_resuming_from_a_damaged_checkpoint_is_one_clear_error_and_leaves_the_run(tiny_checkpoint, tmp_path):
    pytest.importorskip("torch")
    import numpy as np
    from arbor_torch import train as T
    from arbor_torch.train_data import pack

    from arbor_cli.cli.common import describe_error, exit_code_for
    from arbor_core.errors import CorruptModelError

    checkpoint, run = tiny_checkpoint(), tmp_path / "run"
    rows = pack([list(np.random.default_rng(0).integers(0, 97, 300))], 16, 0)
    cfg = T.TrainConfig(seq_len=16, steps=4, lr=1e-2, warmup=1, save_every=2, loss_chunk=8)
    T.train(checkpoint, rows, run, cfg, stop_after=3)
    weights = run / "step-000002" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    with pytest.raises(CorruptModelError) as e:
        T.train(checkpoint, rows, run, cfg, resume=True)
    assert exit_code_for(e.value) == 1 and "\n" not in describe_error(e.value)
    assert describe_error(e.value).startswith(f"the checkpoint {run / 'step-000002'} is damaged")
    assert (run / "latest").read_text().strip() == "step-000002" and weights.stat().st_size == 300


# ---- plot: a result with garbage values ------------------------------------------------------------------
@pytest.mark.parametrize("kind, row, says", [
    ("ppl", {"length": "abc", "rope": "none", "perplexity": 3.0}, 'record 1 has length "abc", not a positive number'),
    ("ppl", {"length": 2048, "rope": "none", "perplexity": "NaN"}, 'has perplexity "NaN", not a positive number'),
    ("ppl", {"length": -4, "rope": "none", "perplexity": 2.0}, "has length -4, not a positive number"),
    ("passkey", {"length": 2048, "rope": "none", "depth": "deep", "found": True}, 'has depth "deep", not a number'),
    ("passkey", {"length": 2048, "rope": "none", "depth": 0.5, "found": {"x": 1}}, "not true or false"),
    ("bench", {"engine": "arbor", "context": 4096, "decode_tokens_per_s": [1]}, "has decode_tokens_per_s [1]"),
])
def test_plot_of_a_result_with_garbage_values_is_one_line_exit_1(runner, tmp_path, kind, row, says):
    pytest.importorskip("matplotlib")
    result = tmp_path / "r.json"
    result.write_text(json.dumps({"model": "m", ("results" if kind == "passkey" else "rows"): [row]}))
    r = runner.invoke(app, ["plot", kind, str(result), "--out", str(tmp_path / "r.png")])
    assert r.exit_code == 1 and r.stdout == "" and not (tmp_path / "r.png").exists()
    line = one_error_line(r.stderr)
    assert says in line and line.endswith("the result is damaged"), line


# ---- a --context that cannot fit is refused before the long-context model is installed ---------------------
@pytest.mark.slow
def test_a_context_that_cannot_fit_is_refused_before_installing_the_long_model(runner, default_checkpoint,
                                                                                monkeypatch):
    import arbor_weights
    from arbor_weights import store

    from arbor_cli.model import Model

    longer = arbor_weights.LONG_VARIANTS[arbor_weights.SMALLEST_MODEL]
    real_installed, real_resolve, resolved = store.installed_path, arbor_weights.resolve, []
    monkeypatch.setattr(store, "installed_path", lambda name: None if name == longer else real_installed(name))
    monkeypatch.setattr(arbor_weights, "resolve", lambda name, **kw: resolved.append(name) or real_resolve(name, **kw))
    monkeypatch.setattr(Model, "_budget", lambda self, mem=None: 4 << 30)  # a 4 GiB machine, whatever this one is
    r = runner.invoke(app, ["generate", "Hi", "--context", "1048576"])
    assert r.exit_code == 1 and r.stdout == "" and longer not in resolved
    assert one_error_line(r.stderr).startswith("arbor: error: --context 1048576 needs ")
