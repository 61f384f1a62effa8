"""`arbor eval`: passkey prompts and scoring, the RoPE policy, perplexity, and the CLI around them."""

import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import FakeCache, FakeModel, FakeRuntime
from typer.testing import CliRunner

from arbor_cli.cli import app
from arbor_cli.evals import (
    ANSWER_TOKENS,
    KEY_LINE,
    QUESTION,
    TASK,
    SentenceEncoder,
    build_passkey_prompt,
    parse_lengths,
    parse_rope_methods,
    passkey_found,
    prose_filler,
    repeated_filler,
    run_passkey,
    run_perplexity,
    split_sentences,
    trial_depth,
    trial_key,
)
from arbor_cli.model import Model
from arbor_core.errors import UsageError
from arbor_core.rope import AUTO_METHOD

PROSE = ("It was a bright cold day in spring, and the clocks were striking nine. The river ran high with snow water! "
         "Would the ferry cross today? Nobody in the village could say.\n\nThe miller's wife said it would. "
         "She was usually right about such things.")


class ByteTokenizer:
    """One token per UTF-8 byte: lengths and positions are easy to reason about."""

    def encode(self, text, add_special_tokens=False):
        return list(text.encode())

    def decode(self, ids, skip_special_tokens=False):
        return bytes(ids).decode(errors="replace")


def passkey_model(trained=8192):
    """The fake Model, answering with the 5-digit key it reads in the prompt."""
    def answer(prompt):
        key = re.search(r"pass key is (\d{5})", prompt).group(1)
        return f" {key}. Remember"

    return FakeModel(tokenizer=ByteTokenizer(), trained=trained, rope_method="linear", answer=answer)


@pytest.fixture
def runner():
    return CliRunner()


def one_line_error(result, code):
    assert result.exit_code == code, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("arbor: error:"), result.stderr
    assert result.stdout == ""


# ---- prompts ------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [300, 1000, 4096, 32768])
def test_prompt_has_exactly_the_requested_tokens(length):
    prompt = build_passkey_prompt(SentenceEncoder(ByteTokenizer()), length, 0.5, "12345", repeated_filler())
    assert len(prompt.ids) == length


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.375, 0.5, 0.9, 1.0])
def test_key_line_sits_at_the_requested_depth(depth):
    tok = ByteTokenizer()
    prompt = build_passkey_prompt(SentenceEncoder(tok), 4000, depth, "54321", repeated_filler())
    text, key_line = tok.decode(prompt.ids), " " + KEY_LINE.format(key="54321")
    at = text.index(key_line) - len(TASK)  # bytes of filler before the key line
    filler = len(text) - len(TASK) - len(key_line) - len(" " + QUESTION)
    assert abs(at / filler - depth) < 0.01
    assert abs(prompt.key_depth - depth) < 0.01
    assert text.endswith(" " + QUESTION)


def test_key_line_is_inserted_between_sentences():
    tok = ByteTokenizer()
    text = tok.decode(build_passkey_prompt(SentenceEncoder(tok), 2000, 0.37, "11111", repeated_filler()).ids)
    before = text[:text.index(" The pass key is 11111")]
    assert before.endswith((".", "again."))


def test_a_too_short_length_is_a_usage_error():
    with pytest.raises(UsageError, match="too short"):
        build_passkey_prompt(SentenceEncoder(ByteTokenizer()), 50, 0.5, "12345", repeated_filler())


def test_prose_filler_uses_the_texts_sentences_and_wraps_around():
    sentences = split_sentences(PROSE)
    assert sentences[2] == "Would the ferry cross today?" and sentences[4] == "The miller's wife said it would."
    stream = prose_filler(sentences, len(sentences) - 1)
    assert [next(stream) for _ in range(2)] == [sentences[-1], sentences[0]]


def test_prose_prompt_hides_the_key_in_the_text():
    tok = ByteTokenizer()
    prompt = build_passkey_prompt(SentenceEncoder(tok), 1500, 0.5, "24680", prose_filler(split_sentences(PROSE), 0))
    text = tok.decode(prompt.ids)
    assert len(prompt.ids) == 1500 and "The grass is green" not in text
    assert "bright cold day" in text and KEY_LINE.format(key="24680") in text


@pytest.mark.slow
@pytest.mark.parametrize("length", [1024, 8184, 32760])
def test_prompt_hits_the_target_length_with_the_real_tokenizer(default_checkpoint, length):
    from arbor_core.tokenizer import load_tokenizer

    tok = load_tokenizer(default_checkpoint.path)
    prompt = build_passkey_prompt(SentenceEncoder(tok), length, 0.625, "90210", repeated_filler())
    assert len(prompt.ids) == length
    assert len(tok.encode(tok.decode(prompt.ids))) == pytest.approx(length, rel=0.01)  # as text, too
    assert abs(prompt.key_depth - 0.625) < 0.01 and prompt.key_position > length / 2


# ---- trials and scoring -------------------------------------------------------------------
def test_trials_spread_over_the_depth():
    assert [trial_depth(i, 4) for i in range(4)] == [0.125, 0.375, 0.625, 0.875]


def test_keys_are_five_digits_and_reproducible():
    keys = [trial_key(0, 4096, t) for t in range(20)]
    assert all(re.fullmatch(r"[1-9]\d{4}", k) for k in keys) and len(set(keys)) > 15
    assert keys == [trial_key(0, 4096, t) for t in range(20)] and keys != [trial_key(1, 4096, t) for t in range(20)]


@pytest.mark.parametrize("answer, found", [(" 12345. Remember it.", True), ("12345", True), (" 1234 5", False),
                                           (" 12354.", False), ("", False)])
def test_found_means_the_answer_contains_the_digits(answer, found):
    assert passkey_found(answer, "12345") is found


# ---- the RoPE policy and the run loop -----------------------------------------------------
def test_methods_that_run_the_same_rope_share_one_run():
    model = passkey_model(trained=1024)
    report = run_passkey(model, [512, 2048], ["auto", "none", "linear", "yarn"], trials=2)
    # 512: every method is plain RoPE, one run per trial; 2048: auto is yarn, so three distinct runs per trial
    assert len(model.calls) == 2 + 3 * 2
    assert {c[1] for c in model.calls} == {512, 2048}  # the context is the test's length
    assert all(n == c - ANSWER_TOKENS for n, c, _ in model.calls)
    assert len(report.results) == 2 * 4 * 2 and all(r.found for r in report.results)
    assert report.accuracy()["auto"] == {512: 1.0, 2048: 1.0}
    assert report.chosen()["auto"][2048] == {"rope": AUTO_METHOD, "scaling": f"{AUTO_METHOD} x2"}
    assert (model.context, model.rope_method) == (None, "linear")  # restored


def test_a_length_that_does_not_fit_is_recorded_not_fatal():
    from arbor_core.errors import ContextError

    model = passkey_model()
    generate = model.generate

    def small_generate(ids, max_new_tokens, *, context=None, rope=None):
        if context > 1024:
            raise ContextError("--context 2048 needs 9 GiB but only 1 GiB is available")
        return generate(ids, max_new_tokens, context=context, rope=rope)

    model.generate = small_generate
    report = run_passkey(model, [1024, 2048], ["none"], trials=1)
    assert [r.found for r in report.results] == [True, None]
    assert "needs 9 GiB" in report.results[1].error and report.accuracy()["none"][2048] is None


def test_perplexity_scores_the_window_and_skips_what_the_text_cannot_fill():
    checkpoint = SimpleNamespace(config=SimpleNamespace(trained_context=1024, rope_scaling=None))
    model = Model(checkpoint, FakeRuntime(logits=np.array([2.0, 0.0, 0.0, 0.0], dtype=np.float32)), ByteTokenizer(),
                  "fake")  # logits that always favour token 0 by the same margin: any other token's NLL is known
    model.plan = lambda needed, requested=None, rope=None: None
    model.new_cache = lambda capacity, rope=None: FakeCache(capacity)
    skipped = []
    rows = run_perplexity(model, [1] * 3000, [512, 2048, 4096], ["none", "linear", "yarn"], window=16,
                          on_skip=lambda length, why: skipped.append((length, why)))
    expected = 2.0 + math.log(1 + 3 * math.exp(-2.0))  # -log softmax(z)[1] for z = [2, 0, 0, 0]
    assert all(r.nll == pytest.approx(expected) and r.perplexity == pytest.approx(math.exp(expected)) for r in rows)
    assert [(r.length, r.scaling) for r in rows] == [(512, "none")] * 3 + [(2048, "none"), (2048, "linear x2"),
                                                                            (2048, "yarn x2")]
    assert model.lm.prefilled == [512 - 16, 2048 - 16, 2048 - 16, 2048 - 16]  # 512 ran once for all three
    assert model.lm.decoded == 4 * 15
    assert skipped == [(4096, "the text has 3,000 tokens, fewer than 4,096")]


# ---- options ------------------------------------------------------------------------------
def test_lengths_parse_k_suffixes_and_sort():
    assert parse_lengths("8k, 2k,4096,2k") == [2048, 4096, 8192]


@pytest.mark.parametrize("spec", ["abc", "0", "2k,-1", "1.5k", ",", "4kk"])
def test_bad_lengths_are_usage_errors(spec):
    with pytest.raises(UsageError):
        parse_lengths(spec)


def test_rope_methods_parse():
    assert parse_rope_methods("none, yarn,none") == ["none", "yarn"]
    with pytest.raises(UsageError, match="--rope"):
        parse_rope_methods("ntk")


@pytest.mark.parametrize("args", [["passkey", "--lengths", "abc"], ["passkey", "--lengths", "0"],
                                  ["passkey", "--rope", "bogus"], ["passkey", "--trials", "0"],
                                  ["ppl", "somefile", "--lengths", "abc"], ["ppl", "somefile", "--rope", "ntk"],
                                  ["ppl", "somefile", "--window", "0"]])
def test_bad_options_are_one_line_exit_2(runner, args):
    one_line_error(runner.invoke(app, ["eval", *args]), 2)


def test_missing_prose_file_is_one_line(runner, tmp_path):
    one_line_error(runner.invoke(app, ["eval", "passkey", "--prose", str(tmp_path / "none.txt")]), 1)


def test_eval_help_lists_both_commands(runner):
    r = runner.invoke(app, ["eval", "--help"])
    assert r.exit_code == 0 and "passkey" in r.stdout and "ppl" in r.stdout


# ---- the default model --------------------------------------------------------------------
@pytest.fixture
def model_args(default_checkpoint):
    return ["--model", str(default_checkpoint.path), "--backend", "torch", "--device", "cpu"]


@pytest.mark.slow
def test_passkey_at_1k_on_the_default_model(runner, model_args):
    r = runner.invoke(app, ["eval", "passkey", "--lengths", "1k", "--trials", "2", "--json", *model_args])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["lengths"] == [1024] and out["rope_chosen"]["auto"]["1024"]["rope"] == "none"
    assert [res["prompt_tokens"] for res in out["results"]] == [1024 - ANSWER_TOKENS] * 2
    assert out["accuracy"]["auto"]["1024"] == 1.0  # the default model finds the key at 1K
    assert "RoPE none chosen by auto" in r.stderr


@pytest.mark.slow
def test_passkey_table_is_the_answer(runner, model_args):
    r = runner.invoke(app, ["eval", "passkey", "--lengths", "512", "--trials", "1", "--rope", "none,yarn",
                            *model_args])
    assert r.exit_code == 0, r.output
    assert "passkey retrieval" in r.stdout and "100%" in r.stdout and "arbor:" not in r.stdout


def python_reference_text() -> str:
    """Real English prose that ships with every CPython: the language reference's topics."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in ("assignment", "if", "while", "for", "try", "function", "class"))


@pytest.mark.slow
def test_perplexity_of_real_text_is_finite_and_above_one(default_model):
    ids = default_model.tokenizer.encode(python_reference_text())
    rows = run_perplexity(default_model, ids, [512, 1024], ["auto"], window=64)
    assert [r.length for r in rows] == [512, 1024]
    assert all(r.error is None and math.isfinite(r.perplexity) and 1 < r.perplexity < 100 for r in rows)


@pytest.mark.slow
def test_perplexity_window_matches_a_full_forward_pass(default_model):
    ids = default_model.tokenizer.encode(python_reference_text())[:300]
    rows = run_perplexity(default_model, ids, [300], ["none"], window=40)
    logits = default_model.logits(ids)
    expected = 0.0
    for pos in range(300 - 40 - 1, 299):
        z = logits[pos].astype("float64")
        expected += z.max() + math.log(sum(math.exp(v - z.max()) for v in z)) - z[ids[pos + 1]]
    assert rows[0].nll == pytest.approx(expected / 40, rel=1e-4)


@pytest.mark.slow
def test_ppl_cli_skips_lengths_longer_than_the_file(runner, model_args, tmp_path):
    path = tmp_path / "reference.txt"
    path.write_text(python_reference_text())
    r = runner.invoke(app, ["eval", "ppl", str(path), "--lengths", "512,64k",
                            "--window", "32", "--json", *model_args])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert [row["length"] for row in out["rows"]] == [512] and out["rows"][0]["perplexity"] > 1
    assert "skipping 65,536" in r.stderr
