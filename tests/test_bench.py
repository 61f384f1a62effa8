"""`arbor bench`: contexts parse, each context is measured, the run stops at the first failure,
and `--vs hf` puts transformers on the same weights beside arbor. Figures are not asserted: speed
goals live in benchmarks/, not in timed tests."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from arbor_cli.bench import parse_contexts, run_bench
from arbor_cli.cli import app
from arbor_core.errors import OutOfMemoryError, UsageError


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def model_args(default_checkpoint):
    return ["--model", str(default_checkpoint.path)]


def test_contexts_parse_k_suffixes():
    assert parse_contexts("4k, 16k,32768") == [4096, 16384, 32768]


@pytest.mark.parametrize("spec", ["", "4x", "-4k", "0"])
def test_bad_contexts_are_usage_errors(spec):
    with pytest.raises(UsageError):
        parse_contexts(spec)


@pytest.mark.parametrize("args", [["--contexts", "4q"], ["--vs", "llama"], ["--tokens", "1"]])
def test_bad_options_are_one_line_and_exit_2(runner, args):
    r = runner.invoke(app, ["bench", *args])
    assert r.exit_code == 2
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


@pytest.mark.slow
def test_each_context_is_measured_and_json_has_the_rows(runner, model_args):
    r = runner.invoke(app, ["bench", "--contexts", "256,512", "--tokens", "4", "--json", *model_args])
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["device"] == "cpu" and data["backend"] == "torch"
    rows = data["rows"]
    assert [(row["engine"], row["context"]) for row in rows] == [("arbor", 256), ("arbor", 512)]
    for row in rows:
        assert row["error"] is None and row["prefill_s"] > 0 and row["decode_tokens_per_s"] > 0
        assert row["prompt_tokens"] == row["context"] - 4 - 1


@pytest.mark.slow
def test_the_run_stops_at_the_first_context_that_runs_out_of_memory(default_model, monkeypatch):
    lm = default_model.lm
    real_prefill = lm.prefill

    def prefill(ids, cache, chunk_size=512):
        if cache.capacity > 300:
            raise OutOfMemoryError("out of memory (simulated)")
        return real_prefill(ids, cache, chunk_size)

    monkeypatch.setattr(lm, "prefill", prefill)
    rows = run_bench(default_model, [256, 512, 1024], decode_tokens=4)
    assert [(r.context, r.error is None) for r in rows] == [(256, True), (512, False)]
    assert "out of memory" in rows[-1].error


@pytest.mark.slow
def test_vs_hf_runs_transformers_on_the_same_weights(runner, model_args):
    r = runner.invoke(app, ["bench", "--contexts", "256", "--tokens", "4", "--vs", "hf", *model_args])
    assert r.exit_code == 0, r.stderr
    assert "arbor" in r.stdout and "transformers" in r.stdout  # the table is the answer
    assert "transformers at 256" in r.stderr


@pytest.mark.slow
def test_vs_llama_cpp_runs_llama_cpp_on_the_gguf_the_model_came_from(runner, default_checkpoint):
    """The default configuration first, llama.cpp beside it (llama-cpp-python is a benchmark extra: CI
    has none, so this runs where it is installed)."""
    pytest.importorskip("llama_cpp")
    r = runner.invoke(app, ["bench", "--contexts", "512", "--tokens", "8", "--vs", "llama.cpp", "--json"])
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["quantize"] == "int4"  # no flags: the CPU default
    engines = [row["engine"] for row in report["rows"]]
    assert engines == ["arbor", "llama.cpp"]
    peer = report["rows"][1]
    assert peer["error"] is None and peer["prefill_s"] > 0 and peer["decode_tokens_per_s"] > 0


def test_vs_llama_cpp_without_a_gguf_is_a_usage_error(tiny_checkpoint):
    from arbor_cli.llama_cpp_peer import source_gguf
    from arbor_core.errors import UsageError

    with pytest.raises(UsageError, match="--vs llama.cpp runs GGUF files"):
        source_gguf(tiny_checkpoint())


def test_an_unknown_peer_is_a_usage_error(runner):
    r = runner.invoke(app, ["bench", "--vs", "ollama"])
    assert r.exit_code == 2 and "'hf' (transformers) or 'llama.cpp'" in r.stderr
