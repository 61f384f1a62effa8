"""Structured output: a JSON Schema as a token mask at every decode step (llguidance).

`schema_text` turns what a user gave (a schema as a dict or JSON text, or None for any JSON object)
into the canonical text `GenerationOptions.schema` carries; it compiles the schema once, so an invalid
schema or a feature llguidance does not support is a SchemaError there, before any model runs. A
`TokenConstraint` is one generation's matcher: `allowed()` is the set of tokens the grammar admits next
(a bool array over the vocabulary, handed to the backend's `sample`), `consume(token)` advances it, and
`finished` says the answer is complete (only end-of-sequence may follow). The matcher is llguidance's,
the library llama.cpp and vLLM use; it needs the model's tokenizer.json (a sentencepiece-only model is
a SchemaError) and builds its token trie once per tokenizer (~0.2 s for 49K tokens). A schema's grammar is
checked once per schema text (`grammar`, kept for the last 64) and its matcher built once per tokenizer and
text, then copied for each generation: a served request with a new schema compiles it once to check it and
once against the vocabulary, not three times; one with a schema seen before compiles nothing (~27 µs).
"""

from __future__ import annotations

import functools
import json
import weakref
from collections import OrderedDict
from typing import Any

import numpy as np

from arbor_core.errors import UsageError

ANY_JSON_OBJECT = '{"type":"object"}'  # OpenAI's response_format {"type": "json_object"}
_INSTALL = "structured output needs llguidance: pip install 'arbor-cli[schema]'"


class SchemaError(UsageError):
    """A JSON schema arbor cannot enforce: not JSON, not a schema, or a feature the matcher lacks."""


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise SchemaError(_INSTALL) from None
    return llguidance


def schema_text(schema: Any) -> str:
    """Canonical JSON text of `schema` (a dict, or JSON text), checked to compile; SchemaError otherwise."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise SchemaError(f"the schema is not JSON ({e})") from None
    if not isinstance(schema, dict):
        raise SchemaError(f"a JSON schema must be an object, got {type(schema).__name__}")
    text = json.dumps(schema, separators=(",", ":"))  # key order kept: properties come out in it
    grammar(text)
    return text


@functools.lru_cache(maxsize=64)
def grammar(text: str) -> str:
    """llguidance's grammar for a schema's JSON text, checked once per text (a request's options, its matcher
    and a repeated schema all find it here); SchemaError with llguidance's own message."""
    llg = _llguidance()
    try:
        compiled = llg.LLMatcher.grammar_from_json_schema(text)
    except ValueError as e:
        raise SchemaError(f"invalid JSON schema: {e}") from None
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(compiled)
    if is_error:
        raise SchemaError(f"unsupported or invalid JSON schema: {_one_line(messages[0])}")
    return compiled


def _one_line(message: str) -> str:
    return " ".join(message.split())


def response_format(schema: str) -> dict:
    """OpenAI's `response_format` for a schema's canonical text (what an engine behind --engine is sent)."""
    if schema == ANY_JSON_OBJECT:
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": json.loads(schema), "strict": True}}


def schema_from_response_format(value: Any) -> str | None:
    """The schema text for an OpenAI `response_format` ({"type": "text"}, "json_object" or "json_schema" with
    {"name", "schema", "strict"}); None for text. SchemaError naming the field otherwise."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise SchemaError("response_format must be an object with a 'type'")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return ANY_JSON_OBJECT
    if kind != "json_schema":
        raise SchemaError(f"response_format.type {kind!r} is not supported (text, json_object or json_schema)")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise SchemaError("response_format.json_schema must be an object with 'name' and 'schema'")
    name = spec.get("name")
    if not isinstance(name, str) or not name or len(name) > 64 or not all(c.isalnum() or c in "_-" for c in name):
        raise SchemaError("response_format.json_schema.name must be 1-64 letters, digits, '_' or '-'")
    if "strict" in spec and not isinstance(spec["strict"], (bool, type(None))):
        raise SchemaError("response_format.json_schema.strict must be a boolean")
    # strict or not, the answer is held to the schema: arbor never returns an unconstrained answer for one
    return schema_text(spec.get("schema", {"type": "object"}))


_TOKENIZERS: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def prepare_tokenizer(tokenizer) -> Any:
    """llguidance's view of an arbor Tokenizer, built once per tokenizer object; SchemaError for a model
    whose tokenizer it cannot read (a server checks this before queueing a request)."""
    built = _TOKENIZERS.get(tokenizer)
    if built is None:
        source = tokenizer.tokenizer_json()
        if source is None:
            raise SchemaError(f"structured output needs a model with a tokenizer.json; "
                              f"{tokenizer.name or 'this model'} has a sentencepiece tokenizer")
        built = _llguidance().LLTokenizer(source, n_vocab=tokenizer.vocab_size,
                                          eos_token=list(tokenizer.eos_ids) or None)
        _TOKENIZERS[tokenizer] = built
    return built


_MATCHERS: "weakref.WeakKeyDictionary[Any, OrderedDict]" = weakref.WeakKeyDictionary()
MATCHERS_KEPT = 64  # schemas per tokenizer whose compiled matcher is kept to copy (as grammar() keeps 64)


def _fresh_matcher(tokenizer, llg_tokenizer, schema: str):
    """A matcher at the start of `schema`'s grammar: a copy of one built once per tokenizer and schema text
    (building compiles the grammar against the vocabulary, ~1 ms; a copy, ~1 µs)."""
    kept = _MATCHERS.setdefault(tokenizer, OrderedDict())
    template = kept.get(schema)
    if template is None:
        template = _llguidance().LLMatcher(llg_tokenizer, grammar(schema), log_level=0)
        if template.is_error():  # kept out of the cache: every use reports it
            return template
        kept[schema] = template
        while len(kept) > MATCHERS_KEPT:
            kept.popitem(last=False)
    kept.move_to_end(schema)
    return template.deep_copy()


class TokenConstraint:
    """One generation's position in a schema's grammar."""

    def __init__(self, tokenizer, schema: str):
        self._tokenizer = prepare_tokenizer(tokenizer)
        self._matcher = _fresh_matcher(tokenizer, self._tokenizer, schema)
        self._check()
        self.vocab_size = self._tokenizer.vocab_size
        self.eos_ids = frozenset(self._tokenizer.eos_tokens)
        self._bits = np.zeros((self.vocab_size + 31) // 32, dtype=np.int32)

    def allowed(self) -> np.ndarray:
        """bool [vocab_size]: the tokens the grammar admits next (end-of-sequence only once complete)."""
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        self._check()
        mask = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[:self.vocab_size].view(bool)
        if not mask.any():
            raise RuntimeError("the schema's grammar admits no token here")
        return mask

    def consume(self, token: int) -> None:
        self._matcher.consume_token(token)
        self._check()

    @property
    def finished(self) -> bool:
        """The answer is complete: the grammar admits nothing but end-of-sequence."""
        return self._matcher.is_stopped()

    @property
    def accepting(self) -> bool:
        return self._matcher.is_accepting()

    def _check(self) -> None:
        if self._matcher.is_error():
            raise SchemaError(f"the schema cannot be enforced: {_one_line(self._matcher.get_error())}")
