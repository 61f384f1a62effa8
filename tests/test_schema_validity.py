"""The validity suite of issue 29: every answer the default model gives under a JSON schema (or json_object) parses
and validates, judged by `jsonschema`, over the 54 cases of schema_cases.py (50 schemas x prompts, 4 json_object),
on the torch backend (the CPU default: int4 and the compiled step) and on MLX; without the mask the same prompts
fail (the control: the suite can fail). The same cases through `arbor serve` and the `openai` client are in
tests/test_serve.py, on its server. Counts per backend: docs/performance.md (benchmarks/schema_validity.py)."""

import os
from collections import Counter

import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from schema_cases import MAX_TOKENS, cases, check_cases_are_distinct, first_json, judge

CASES = cases()
# MLX on Linux computes with the reference BLAS (~8 tokens/s here): CI answers one case of each shape and a
# json_object, greedy and sampled; ARBOR_SCHEMA_MLX_ALL=1 answers all 54 (~7 minutes on 2 cores)
MLX_CASES = CASES if os.environ.get("ARBOR_SCHEMA_MLX_ALL") == "1" else \
    [c for c in CASES if c.name in ("product flat", "company nested", "song optional")]
# the control answers half the cases (two of every four: every shape, greedy and sampled) to keep CI's time;
# benchmarks/schema_validity.py answers all of them without the mask (docs/performance.md)
CONTROL_CASES = [c for i, c in enumerate(CASES) if i % 4 < 2]


def _features(schema, found: set) -> set:
    if isinstance(schema, dict):
        found |= {k for k in ("pattern", "enum", "minItems", "maxItems", "minimum", "maximum") if k in schema}
        if schema.get("additionalProperties") is False:
            found.add("additionalProperties")
        if schema.get("type") == "object" and any(p.get("type") in ("object", "array") for p in
                                                  schema.get("properties", {}).values()):
            found.add("nested")
        for value in schema.values():
            _features(value, found)
    elif isinstance(schema, list):
        for value in schema:
            _features(value, found)
    return found


def test_the_cases_are_fifty_varied_valid_schemas_and_json_object():
    with_schema = [c for c in CASES if c.schema is not None]
    assert len(with_schema) >= 50 and any(c.schema is None for c in CASES)
    check_cases_are_distinct(CASES)
    for c in with_schema:
        jsonschema.Draft202012Validator.check_schema(c.schema)
        assert _features(c.schema, set()) >= {"additionalProperties"}, c.name
    seen = set().union(*(_features(c.schema, set()) for c in with_schema))
    assert seen == {"pattern", "enum", "minItems", "maxItems", "minimum", "maximum", "additionalProperties", "nested"}
    assert {c.temperature for c in CASES} == {0.0, 1.0}


@pytest.mark.parametrize("text, verdict", [
    ('{"name": "Ann", "age": 30, "job": "doctor"}', "valid"),
    ('{"name": "ann", "age": 30, "job": "doctor"}', "invalid"),  # pattern
    ('{"name": "Ann", "age": 130, "job": "doctor"}', "invalid"),  # maximum
    ('{"name": "Ann", "age": 30, "job": "pilot"}', "invalid"),  # enum
    ('{"name": "Ann", "age": 30, "job": "doctor", "x": 1}', "invalid"),  # additionalProperties
    ('{"name": "Ann", "age": 30}', "invalid"),  # required
    ('Here it is: {"name": "Ann", "age": 30, "job": "doctor"}', "unparsable"),
])
def test_the_judge_refuses_what_breaks_the_schema(text, verdict):
    assert judge(text, next(c.schema for c in CASES if c.name == "person flat")) == verdict


def test_the_controls_kinder_reading_takes_the_first_object():
    assert first_json('Sure:\n```json\n{"a": [1, 2]}\n```\nDone.') == '{"a": [1, 2]}'
    assert first_json("no object") == "no object"


def answers(model, chosen, masked: bool = True) -> list[tuple[str, str, str]]:
    """(case, verdict, text) for each case: the model's chat answer, held to the case's schema or not."""
    out = []
    for c in chosen:
        r = model.chat([{"role": "user", "content": c.prompt}], max_new_tokens=MAX_TOKENS, temperature=c.temperature,
                       seed=c.seed, schema=c.schema_option if masked else None)
        verdict = judge(r.text, c.schema)
        if masked and r.finish_reason != "eos":
            verdict = f"ended by {r.finish_reason}"
        out.append((c.name, verdict, r.text))
    return out


@pytest.fixture(scope="module")
def cpu_default(default_checkpoint):
    """The default model as `arbor` runs it on a CPU (int4, the compiled decode step), loaded once here."""
    import arbor_cli

    return arbor_cli.load(str(default_checkpoint.path), backend="torch", device="cpu", quiet=True)


@pytest.mark.slow
def test_every_torch_answer_parses_and_validates(cpu_default):
    got = answers(cpu_default, CASES)
    assert Counter(v for _, v, _ in got) == {"valid": len(CASES)}, [g for g in got if g[1] != "valid"]


@pytest.mark.slow
def test_without_the_mask_the_same_prompts_fail(cpu_default):
    """The control: the same prompts, options and token budget with no mask. The answers are mostly prose around
    a JSON block, so even the first {...} of each (the kinder reading) mostly breaks its schema."""
    got = answers(cpu_default, CONTROL_CASES, masked=False)
    strict = Counter(v for _, v, _ in got)
    kinder = Counter(judge(first_json(text), c.schema) for c, (_, _, text) in zip(CONTROL_CASES, got))
    assert strict["valid"] <= len(CONTROL_CASES) // 10, strict
    assert kinder["valid"] <= len(CONTROL_CASES) // 4, kinder


@pytest.mark.slow
def test_every_mlx_answer_parses_and_validates(default_checkpoint):
    pytest.importorskip("mlx.core")
    import arbor_cli

    model = arbor_cli.load(str(default_checkpoint.path), backend="mlx", quiet=True)
    got = answers(model, MLX_CASES)
    assert Counter(v for _, v, _ in got) == {"valid": len(MLX_CASES)}, [g for g in got if g[1] != "valid"]
