"""Structured output (arbor_cli/constrained.py): schemas compiled or refused in one line, OpenAI's
response_format read, and the token mask honoured by both backends' samplers. The default model's answers under
54 schemas and json_object, on both backends and through serve, with the control: tests/test_schema_validity.py."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("llguidance")

from arbor_cli.constrained import ANY_JSON_OBJECT, SchemaError, schema_from_response_format, schema_text  # noqa: E402
from arbor_core.backend import SamplingParams  # noqa: E402

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "pattern": "^[A-Z][a-z]+$"},
                         "age": {"type": "integer", "minimum": 18, "maximum": 99}}}


# ---- schemas and response_format, no model -----------------------------------------------------------
@pytest.mark.parametrize("schema, message", [
    ('{"type": "object"', "not JSON"),
    ("[1, 2]", "must be an object"),
    ({"type": "objekt"}, "Invalid type"),
    ({"type": "string", "format": "shoe-size"}, "Unknown format"),
    ({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}, "does not exist"),
])
def test_a_bad_or_unsupported_schema_is_one_line(schema, message):
    with pytest.raises(SchemaError) as e:
        schema_text(schema)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_schema_keeps_its_property_order():
    assert list(json.loads(schema_text(PERSON))["properties"]) == ["name", "age"]


@pytest.mark.parametrize("value, expected", [
    (None, None),
    ({"type": "text"}, None),
    ({"type": "json_object"}, ANY_JSON_OBJECT),
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": True}}, schema_text(PERSON)),
    ({"type": "json_schema", "json_schema": {"name": "any"}}, ANY_JSON_OBJECT),
])
def test_response_format_as_openai_defines_it(value, expected):
    assert schema_from_response_format(value) == expected


@pytest.mark.parametrize("value, message", [
    ("json_object", "must be an object"),
    ({"type": "xml"}, "'xml' is not supported"),
    ({"type": "json_schema"}, "json_schema must be an object"),
    ({"type": "json_schema", "json_schema": {"schema": PERSON}}, "name must be"),
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": "yes"}}, "strict"),
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "objekt"}}}, "Invalid type"),
])
def test_a_bad_response_format_is_refused(value, message):
    with pytest.raises(SchemaError, match=re.escape(message)):
        schema_from_response_format(value)


def test_the_cli_refuses_a_bad_schema_in_one_line_before_loading_a_model(tmp_path):
    r = subprocess.run([sys.executable, "-m", "arbor_cli", "generate", "--schema", '{"type": "objekt"}', "Hi"],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "ARBOR_HOME": str(tmp_path), "NO_COLOR": "1"})
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and "Invalid type: objekt" in r.stderr


def test_a_tokenizer_without_tokenizer_json_is_one_line():
    from arbor_cli.constrained import TokenConstraint

    class SentencePieceTokenizer:
        name, vocab_size, eos_ids = "tiny-sp", 10, [2]

        def tokenizer_json(self):
            return None

    sentencepiece = SentencePieceTokenizer()
    with pytest.raises(SchemaError, match="tiny-sp has a sentencepiece tokenizer"):
        TokenConstraint(sentencepiece, ANY_JSON_OBJECT)


# ---- the mask in both backends' samplers --------------------------------------------------------------
def _allowed(vocab: int, ids) -> np.ndarray:
    mask = np.zeros(vocab, dtype=bool)
    mask[list(ids)] = True
    return mask


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=1.5, top_p=0.9, top_k=50,
                                                                     repetition_penalty=1.2)])
def test_torch_picks_only_allowed_tokens(params):
    torch = pytest.importorskip("torch")
    from arbor_torch import sampling

    logits = torch.randn(100, generator=torch.Generator().manual_seed(0))
    allowed = _allowed(90, [3, 17, 42])  # shorter than the logits, as a padded vocabulary's are
    rng = sampling.new_rng("cpu", 1)
    picks = {sampling.sample(logits, params, rng, [3, 5], allowed) for _ in range(50)}
    assert picks <= {3, 17, 42}
    if params.greedy:
        assert picks == {max((3, 17, 42), key=lambda i: float(logits[i]))}


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=1.5, top_p=0.9, top_k=50)])
def test_mlx_picks_only_allowed_tokens(params):
    mx = pytest.importorskip("mlx.core")
    from arbor_mlx.sampling import RandomKey, sample_lazy

    logits = mx.array(np.random.default_rng(0).standard_normal(100).astype(np.float32))
    rng = RandomKey(1)
    picks = {int(sample_lazy(logits, params, rng, (), _allowed(90, [3, 17, 42])).item()) for _ in range(50)}
    assert picks <= {3, 17, 42}


# ---- one compile per schema ---------------------------------------------------------------------------
class CountingLLGuidance:
    """llguidance with its two compiles counted: checking a schema's grammar, and building a matcher over the
    vocabulary (what TokenConstraint starts from)."""

    def __init__(self, real, counts):
        self.real, self.counts, self.LLTokenizer = real, counts, real.LLTokenizer
        outer = self

        class LLMatcher:
            grammar_from_json_schema = staticmethod(real.LLMatcher.grammar_from_json_schema)

            @staticmethod
            def validate_grammar_with_warnings(grammar):
                outer.counts["check"] += 1
                return real.LLMatcher.validate_grammar_with_warnings(grammar)

            def __new__(cls, *args, **kwargs):
                outer.counts["build"] += 1
                return real.LLMatcher(*args, **kwargs)

        self.LLMatcher = LLMatcher


@pytest.mark.slow
def test_a_served_schema_is_compiled_once_and_a_repeated_one_not_again(default_checkpoint, monkeypatch):
    """A request's schema was compiled three times (response_format read, the options built, the matcher made);
    now its grammar is checked once per schema text and its matcher built once per tokenizer and text, then
    copied: a second request with the same schema compiles nothing."""
    import uuid
    from collections import Counter

    import llguidance

    from arbor_cli import constrained
    from arbor_cli.serve import openai as serve_openai
    from arbor_core.tokenizer import load_tokenizer

    counts = Counter()
    monkeypatch.setattr(constrained, "_llguidance", lambda: CountingLLGuidance(llguidance, counts))
    tokenizer = load_tokenizer(default_checkpoint.path)
    schema = {**PERSON, "title": uuid.uuid4().hex}  # a schema text no earlier test compiled
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": schema, "strict": True}}}
    masks = []
    for request in range(2):
        options, _ = serve_openai.generation_options(body, 5, 4096, lambda tokens: 4096)
        constraint = constrained.TokenConstraint(tokenizer, options.schema)
        masks.append(constraint.allowed())
        constraint.consume(int(np.flatnonzero(masks[-1])[0]))  # the copy moves; the kept matcher must not
        assert counts == {"check": 1, "build": 1}, (request, counts)
    assert np.array_equal(masks[0], masks[1])
