"""`arbor extract`: records of a user's JSON schema pulled from every part of documents of any length,
each one grounded in its part's text (issue 29, phase 2).

A document is split into parts the way `arbor ask` splits it (reliable_tokens, split_into_chunks with
PART_OVERLAP_TOKENS). For each part the model is asked, in one chat turn, to list every item; its answer
is held token by token to {"items": [ITEM, ...]} where ITEM is the user's schema (constrained.py through
the door's GenerationOptions.schema), so it always parses. An item is kept only when it is grounded: each
string field (or the schema's "quote" field alone, where it has one) occurs verbatim in the part (runs of
whitespace match any whitespace; case-sensitive first, then case-insensitive), and each number occurs as
written, all within one paragraph of the part (a name in one paragraph and a role in another is not a
record the text states). Kept items carry `_source` (document, location label, start/end in that document's own text);
the others are dropped and counted. Items with the same field values in one document (the overlap of two
parts reads the same sentence twice) are merged into one, the first place kept.

On an engine (`--engine URL`, engine.RemoteModel) the same door sends each part as a chat completion whose
`response_format` is the wrapped schema (json_schema, strict), `--parallel N` parts at once (door.map); the
server holds the answer to the schema.

A model loaded here reads each part's prompt prefix (the chat template's head and the part, everything before
the instruction) through ask's DocumentReader: loaded from the disk cache of `arbor ask` (doc_cache.py) when an
earlier run kept it, else prefilled and kept, so a second extraction from the same file (another schema or
instruction too) prefills only each part's instruction. Entries are extract's own: ask's prompt puts other words
around a part and leaves less room after it, so the two commands never find each other's (the key names the
tokens and the room). `Extraction.cache` counts the parts loaded and prefilled.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from arbor_core.errors import UsageError

from .ask import reliable_tokens
from .document_index import cut_into_parts
from .chunking import document_token_offsets
from .constrained import SchemaError, schema_text
from .document_reader import DocumentReader, keep_the_cache
from .documents import Document
from .extract import label_at
from .generate import GenerationResult
from .progress import NoProgress

DEFAULT_INSTRUCTION = "Extract the records described by the fields."
QUOTE_FIELD = "quote"  # a schema with this field is grounded by it alone
MAX_ITEM_TOKENS = 1024
INSTRUCTION_ROOM = 256  # tokens the prompt may take after a part's cached prefix (the instruction and fields)
PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


def items_schema(schema: Any) -> tuple[str, dict]:
    """(the canonical text of {"items": [ITEM...]}, the item schema as a dict) for a user's item schema
    (dict or JSON text); SchemaError (one line) for a schema that is not JSON, not an object type, or that
    the matcher cannot enforce."""
    item = json.loads(schema_text(schema))  # parsed and compiled alone first: its own errors name its own fields
    if item.get("type") != "object" or not isinstance(item.get("properties"), dict) or not item["properties"]:
        raise SchemaError('arbor extract needs an item schema of "type": "object" with "properties" (the fields '
                          'each record has)')
    wrapped = {"type": "object", "properties": {"items": {"type": "array", "items": item}},
               "required": ["items"], "additionalProperties": False}
    return schema_text(wrapped), item


def extraction_prompt(part: str, item: dict, instruction: str) -> list[dict]:
    fields = ", ".join(f'"{name}"' for name in item["properties"])
    return _prompt(part, f"{instruction.strip()}\nList every item in the text above as JSON "
                   f'{{"items": [...]}}, each item with the fields {fields}. Copy each value exactly as the text writes '
                   f"it; list nothing that the text does not say.")


def _prompt(part: str, after: str) -> list[dict]:
    return [{"role": "user", "content": f"{part}\n\n---\n{after}"}]


def prompt_ids(tokenizer, part: str, item: dict, instruction: str) -> tuple[list[int], int]:
    """The extraction prompt's ids, and where its part's prefix ends (the same whatever the instruction or
    schema: the ids it shares with the prompt with nothing after the part, short of the prompt's last two)."""
    ids = tokenizer.encode_chat(extraction_prompt(part, item, instruction), add_generation_prompt=True)
    bare = tokenizer.encode_chat(_prompt(part, ""), add_generation_prompt=True)
    shared = next((i for i, (a, b) in enumerate(zip(ids, bare)) if a != b), min(len(ids), len(bare)))
    shared = min(shared, len(ids) - 2)
    if len(ids) - shared > INSTRUCTION_ROOM:
        raise UsageError(f"the instruction is too long ({len(ids) - shared} tokens with the fields; at most "
                         f"{INSTRUCTION_ROOM})")
    return ids, shared


def answered_items(text: str) -> list[Any]:
    """The items of an answer {"items": [...]}; from an answer cut short (out of tokens), the items
    complete before the cut."""
    try:
        answer = json.loads(text)
        return answer.get("items", []) if isinstance(answer, dict) else []
    except json.JSONDecodeError:
        pass
    start = re.search(r'"items"\s*:\s*\[', text)
    if start is None:
        return []
    decoder, at, items = json.JSONDecoder(), start.end(), []
    while True:
        at = len(text) - len(text[at:].lstrip(" \t\r\n,"))
        try:
            value, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            return items
        items.append(value)


def answer_text(reply) -> str:
    """The text of a reply: a door that streams (a local Model) is read until its answer ends, or until an
    item repeats one listed before in the same answer (a small model, held to the schema, may go on listing
    the same item until --max-tokens; what follows a repeat is dropped). A door that answers whole (an
    engine) is taken as it is."""
    if isinstance(reply, GenerationResult):
        return reply.text
    text = ""
    for piece in reply:
        text += piece
        if "}" in piece:
            items = [json.dumps(item, sort_keys=True) for item in answered_items(text)]
            if len(set(items)) < len(items):
                break
    return text


# ---- grounding ----------------------------------------------------------------------------------------------
def _pattern(value: str) -> str | None:
    """The regular expression `value` occurs as: its words, any whitespace between, whole words at its ends."""
    words = value.split()
    if not words:
        return None
    body = r"\s+".join(re.escape(w) for w in words)
    left = r"(?<!\w)" if re.match(r"\w", words[0]) else ""
    right = r"(?!\w)" if re.search(r"\w$", words[-1]) else ""
    return left + body + right


def string_spans(part: str, value: str) -> list[tuple[int, int]]:
    """Where `value` occurs verbatim in `part` (runs of whitespace alike): the case-sensitive occurrences, or
    where there are none the case-insensitive ones."""
    pattern = _pattern(value)
    if pattern is None:
        return []
    for flags in (0, re.IGNORECASE):
        spans = [m.span() for m in re.finditer(pattern, part, flags)]
        if spans:
            return spans
    return []


def number_spans(part: str, value: int | float) -> list[tuple[int, int]]:
    written = json.dumps(value)
    return [m.span() for m in re.finditer(rf"(?<![\w.]){re.escape(written)}(?![\w]|\.\d)", part)]


def _spans(part: str, value) -> list[tuple[int, int]]:
    return string_spans(part, value) if isinstance(value, str) else number_spans(part, value)


def _leaves(value: Any) -> list[Any]:
    """The strings and numbers in an item's fields (nested objects and arrays included)."""
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    return [value]


def ground(item: Any, part: str, quote_field: bool) -> tuple[int, int] | None:
    """The span of `part` an item is grounded in (from its first located value to its last), or None where a
    value it must show is not in the part, or its values lie in different paragraphs. The anchor is the
    "quote" field where the schema has one (then the only string checked), else the longest string; at each
    place the anchor occurs the other values are found nearest to it, and the first place that holds them
    all within one paragraph is the item's."""
    if not isinstance(item, dict):
        return None
    if quote_field:
        quote = item.get(QUOTE_FIELD)
        strings = [quote] if isinstance(quote, str) and quote.strip() else []
        numbers = [v for v in _leaves({k: v for k, v in item.items() if k != QUOTE_FIELD}) if not isinstance(v, str)]
    else:
        leaves = _leaves(item)
        strings = sorted((v for v in leaves if isinstance(v, str)), key=len, reverse=True)
        numbers = [v for v in leaves if not isinstance(v, str)]
    if not strings and not numbers:
        return None  # nothing to ground it by
    found = [_spans(part, value) for value in strings + numbers]
    if not all(found):
        return None
    for anchor in found[0]:  # each place the anchor occurs, until one holds the whole record in a paragraph
        spans = [anchor] + [min(others, key=lambda s: abs(s[0] - anchor[0])) for others in found[1:]]
        start, end = min(s for s, _ in spans), max(e for _, e in spans)
        if not PARAGRAPH_BREAK.search(part, start, end):
            return start, end
    return None  # its values are in the part, but not together: one record is told in one paragraph


# ---- the run ------------------------------------------------------------------------------------------------
@dataclass
class Extraction:
    items: list[dict] = field(default_factory=list)
    dropped: int = 0
    parts: int = 0
    merged: int = 0
    cache: dict = field(default_factory=lambda: {"loaded": 0, "prefilled": 0})  # parts' prefixes: from disk / run

    def to_json(self) -> dict:
        return {"items": self.items, "dropped": self.dropped, "parts": self.parts, "merged": self.merged,
                "cache": self.cache}


def document_parts(model, document: Document, limit: int, progress) -> tuple[list[tuple[int, str]], int]:
    """((start in the document's text, the part's text) for each part, as `arbor ask` cuts them; the document's
    tokens)."""
    text, tokenizer = document.text, model.tokenizer
    if not text.strip():
        return [], 0
    offsets = document_token_offsets(tokenizer.encode_with_offsets, text, progress)
    return cut_into_parts(tokenizer, text, offsets, limit), len(offsets)


def _key(document: str, item: dict) -> str:
    def normal(v):
        if isinstance(v, str):
            return " ".join(v.split())
        if isinstance(v, dict):
            return {k: normal(x) for k, x in v.items()}
        if isinstance(v, list):
            return [normal(x) for x in v]
        return v
    return json.dumps([document, normal(item)], sort_keys=True, ensure_ascii=False)


def extract_records(model, documents: list[Document], schema: Any, *, instruction: str | None = None,
                    progress=None, part_tokens: int | None = None, max_new_tokens: int = MAX_ITEM_TOKENS,
                    keep: bool = True) -> Extraction:
    """Every grounded record of `schema` (the item type) in `documents`, read part by part with `model` (a
    door); see the module's docstring. `keep`: keep each part's prefill on disk (and use a kept one)."""
    wrapped, item_schema = items_schema(schema)
    instruction = DEFAULT_INSTRUCTION if instruction is None or not instruction.strip() else instruction
    limit = reliable_tokens(model) if part_tokens is None else part_tokens
    if limit < 128:
        raise UsageError(f"--part-tokens must be at least 128, got {limit}")
    progress = progress or NoProgress()
    work, tokens = [], 0  # a long document's tokenizing shows as its own phase ("reading the document")
    for document in documents:
        parts, count = document_parts(model, document, limit, progress)
        work += [(document, start, part) for start, part in parts]
        tokens += count
    if not work:
        raise UsageError("there is nothing to extract from: the documents are empty")
    quote_field = QUOTE_FIELD in item_schema["properties"]
    reader = None
    if model.kv_bytes_per_token() is not None:  # a model here: each part's prefix from disk, or prefilled and kept
        reader = DocumentReader(model, keep_the_cache(model, tokens, len(work), keep))

    def read(piece) -> str:
        _, _, part = piece
        messages = extraction_prompt(part, item_schema, instruction)
        options = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "schema": wrapped}
        if reader is None:  # an engine keeps its own caches
            return answer_text(model.chat(messages, stream=True, **options))
        ids, shared = prompt_ids(model.tokenizer, part, item_schema, instruction)
        session = reader.session_for(ids[:shared], shared + INSTRUCTION_ROOM + max_new_tokens)
        return answer_text(model.chat(messages, stream=True, session=session, continuing=True, **options))

    result, seen = Extraction(parts=len(work)), set()
    progress.begin("extracting", len(work))
    for (document, start, part), answer in zip(work, model.map(read, work, progress.advance)):
        for item in answered_items(answer):
            span = ground(item, part, quote_field)
            if span is None:
                result.dropped += 1
                continue
            key = _key(document.name, item)
            if key in seen:
                result.merged += 1
                continue
            seen.add(key)
            at, end = start + span[0], start + span[1]
            result.items.append({**item, "_source": {"document": document.name,
                                                     "location": label_at(document.locations, at),
                                                     "start": at, "end": end}})
    if reader is not None:
        result.cache = {"loaded": reader.loaded, "prefilled": reader.prefilled}
    return result
