"""`arbor generate`, `chat` and `summarize` with `--backend mlx`, through typer's CliRunner.

The same checks as tests/test_cli.py makes on torch, plus: greedy answers are the torch
backend's answers, word for word.
"""

import json

import psutil
import pytest
from typer.testing import CliRunner

pytest.importorskip("mlx.core")

from arbor_cli.cli import app

LONG_DOCUMENT = "\n\n".join([
    ("Honeybees live in colonies of many thousands of workers, a few hundred drones and one queen. The workers "
     "collect nectar and pollen from flowers, build wax combs of six-sided cells, feed the larvae and guard the "
     "entrance of the hive. Foragers dance to tell their sisters where flowers grow, and in winter the colony "
     "clusters together and lives on the honey it stored during the summer."),
    ("Volcanoes form where molten rock rises from deep inside the Earth. Some erupt quietly, pouring out rivers of "
     "lava that cool into black basalt; others explode, throwing ash and gas high into the sky. Volcanologists "
     "watch small earthquakes, swelling ground and escaping gas to warn the people who farm the rich soil on the "
     "slopes."),
    ("Chess is a game for two players on a board of sixty-four squares. Each side has a king, a queen, two rooks, "
     "two bishops, two knights and eight pawns. The aim is to checkmate the opposing king. Players study openings, "
     "tactics and endgames, and tournament games are played with clocks so that each player has a fixed time."),
] * 6)  # about 1,340 tokens


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def mlx_args(default_checkpoint):
    return ["--model", str(default_checkpoint.path), "--backend", "mlx", "--device", "cpu"]


@pytest.fixture
def torch_args(default_checkpoint):
    """torch's exact float path, what MLX runs (torch's CPU default for a 4-bit model is int4)."""
    pytest.importorskip("torch")
    return ["--model", str(default_checkpoint.path), "--backend", "torch", "--device", "cpu", "--dtype", "float32"]


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def one_line_error(result, code):
    assert result.exit_code == code, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("arbor: error:"), result.stderr
    assert result.stdout == "" and "Traceback" not in result.output


# ---- generate ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_generate_completes_a_prompt(runner, mlx_args):
    r = ok(runner.invoke(app, ["generate", "The capital of France is", "-n", "8", *mlx_args]))
    assert "Paris" in r.stdout


@pytest.mark.slow
def test_generate_greedy_output_is_the_torch_backends(runner, mlx_args, torch_args):
    prompt = ["generate", "The three primary colours are", "-n", "32"]
    assert ok(runner.invoke(app, [*prompt, *mlx_args])).stdout == ok(runner.invoke(app, [*prompt, *torch_args])).stdout


@pytest.mark.slow
def test_generate_json_and_stop(runner, mlx_args):
    r = ok(runner.invoke(app, ["generate", "Count: one, two, three,", "-n", "24", "--stop", "six", "--json",
                               *mlx_args]))
    out = json.loads(r.stdout)
    assert set(out) == {"text", "tokens", "finish_reason", "context", "timings"}
    assert "six" not in out["text"] and out["finish_reason"] == "stop"
    assert out["timings"]["decode_tokens_per_s"] > 0


@pytest.mark.slow
def test_generate_reads_stdin_with_dash(runner, mlx_args):
    r = ok(runner.invoke(app, ["generate", "-", "-n", "6", *mlx_args], input="The capital of France is"))
    assert "Paris" in r.stdout


@pytest.mark.slow
def test_seeded_sampling_is_reproducible(runner, mlx_args):
    args = ["generate", "Once upon a time", "-n", "16", "-t", "0.9", "--top-p", "0.95", "--seed", "7", *mlx_args]
    first, second = ok(runner.invoke(app, args)), ok(runner.invoke(app, args))
    assert first.stdout == second.stdout and first.stdout.strip()


@pytest.mark.slow
def test_repeat_penalty_runs_on_mlx(runner, mlx_args):
    ok(runner.invoke(app, ["generate", "List: apple, apple, apple,", "-n", "8", "--repeat-penalty", "1.3", *mlx_args]))


def test_an_unsupported_device_is_one_line_exit_1(runner, default_checkpoint):
    r = runner.invoke(app, ["generate", "hi", "--model", str(default_checkpoint.path), "--backend", "mlx",
                            "--device", "cuda"])
    one_line_error(r, 1)
    assert "not supported by the mlx backend" in r.stderr


# ---- chat -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_piped_chat_prints_only_the_reply(runner, mlx_args):
    r = ok(runner.invoke(app, ["chat", *mlx_args], input="What is the capital of France?\n"))
    assert "Paris" in r.stdout and "<|im" not in r.stdout and ">>>" not in r.stdout


@pytest.mark.slow
def test_piped_chat_reply_is_the_torch_backends(runner, mlx_args, torch_args):
    question = "Name two planets of the solar system.\n"
    args = ["chat", "--max-tokens", "48"]
    mlx_reply = ok(runner.invoke(app, [*args, *mlx_args], input=question)).stdout
    assert mlx_reply == ok(runner.invoke(app, [*args, *torch_args], input=question)).stdout


# ---- summarize --------------------------------------------------------------------------------
@pytest.mark.slow
def test_summarize_one_pass_matches_torch(runner, mlx_args, torch_args, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(LONG_DOCUMENT.split("\n\n")[0] + "\n")
    args = ["summarize", str(doc), "--words", "30", "--json"]
    got = json.loads(ok(runner.invoke(app, [*args, *mlx_args])).stdout)
    assert got["chunks"] == 1 and "bee" in got["text"].lower()
    assert got["text"] == json.loads(ok(runner.invoke(app, [*args, *torch_args])).stdout)["text"]


@pytest.mark.slow
def test_summarize_a_document_longer_than_the_context_in_parts(runner, mlx_args):
    # ~225 tokens in a 256-token context: three parts and a merge (MLX's Linux CPU wheel prefills ~10 tokens/s)
    document = "\n\n".join(LONG_DOCUMENT.split("\n\n")[:3])
    r = ok(runner.invoke(app, ["summarize", "-", "--words", "10", "--json", "--context", "256", *mlx_args],
                         input=document))
    out = json.loads(r.stdout)
    assert out["chunks"] > 1 and out["context"] == 256 and out["text"].strip()


# ---- info -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_info_reports_the_mlx_backend_and_its_memory(runner, mlx_args):
    info = json.loads(ok(runner.invoke(app, ["info", "--json", *mlx_args])).stdout)
    assert info["backend"] == "mlx" and info["device"] == "cpu"
    assert info["memory_total_bytes"] == psutil.virtual_memory().total
    assert info["trained_context"] == 8192 and info["max_context"] >= 8192
