"""What `arbor ask` works out about a document before any model reads it, kept beside its cache.

Every question about a long document needs the same things of its text: how many tokens it is, where its
parts start and end, and in which sentences each word occurs (question_terms.SentenceCounts: the weight of
the question's terms and which parts name them). Worked out, they cost about 0.25 s of CPU for a
16K-token document and 0.9 s for 128K (tokenizing it, cutting it into parts, which tokenizes each part
again, and reading every sentence's words) — the same for every question, cached KV or not, and on a GPU
most of a cached question (docs/long-context.md, "What a question costs now"). So they are kept, one small
JSON file per document, tokenizer and part size under `<doc cache>/index/`, and a later question reads
them in milliseconds.

The file's name hashes everything its contents depend on: the text, the tokenizer's files, the part size
and the source of the code that computes them (chunking.py, question_terms.py and this module), so a
change to any of them finds no file and computes afresh, never a stale one. A file that does not parse is
deleted and recomputed. Files are written to a temporary name and renamed; at most MAX_FILES are kept, the
least recently used going first; `arbor cache clear` removes them with the KV entries.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from . import doc_cache
from .chunking import document_token_offsets, split_into_chunks
from .ask_every_part import candidates
from .question_terms import QuestionTerms, SentenceCounts

FORMAT = 1
PART_OVERLAP_TOKENS = 96  # a sentence cut by a part's edge is whole in the next part
MAX_FILES = 64  # a few KB to a few MB each (128K tokens of prose: ~1.5 MB)
_SOURCES = ("chunking.py", "question_terms.py", "document_index.py")


@dataclass
class DocumentIndex:
    tokens: int  # the document's tokens (stripped)
    parts: list[tuple[int, int]]  # each part's text as text[start:end], stripped; one part: the whole text
    counts: SentenceCounts

    def texts(self, text: str) -> list[str]:
        return [text[a:b] for a, b in self.parts]

    def naming(self, text: str, terms: QuestionTerms) -> list[int]:
        """The parts (numbered from 1) a sentence of which carries the question's terms: exactly those
        question_terms.candidates accepts, looked for only where the document's sentences hold a word of
        a term (every anchored sentence carries one) and in parts that begin or end inside a word (whose
        edge words no sentence of the document holds)."""
        starts, ends = [a for a, _ in self.parts], [b for _, b in self.parts]  # both ascending
        maybe = set()
        for i in {i for term in terms.terms for i in self.counts.with_a_word_of(term)}:
            lo, hi = self.counts.spans[i]
            maybe.update(range(bisect.bisect_right(ends, lo) + 1, bisect.bisect_left(starts, hi) + 1))
        for n, (a, b) in enumerate(self.parts, 1):
            if _inside_a_word(text, a) or _inside_a_word(text, b):
                maybe.add(n)
        return [n for n in sorted(maybe) if candidates(text[self.parts[n - 1][0]:self.parts[n - 1][1]], terms)]


def _inside_a_word(text: str, at: int) -> bool:
    return 0 < at < len(text) and text[at - 1].isalnum() and text[at].isalnum()


def build(tokenizer, text: str, limit: int, progress) -> DocumentIndex:
    """Tokenize `text`, cut it into parts of at most `limit` tokens (cut_into_parts) and count its
    sentences' words."""
    offsets = document_token_offsets(tokenizer.encode_with_offsets, text, progress)
    parts = [(start, start + len(body)) for start, body in cut_into_parts(tokenizer, text, offsets, limit)]
    return DocumentIndex(len(offsets), parts, SentenceCounts(text))


def cut_into_parts(tokenizer, text: str, offsets: list[tuple[int, int]], limit: int) -> list[tuple[int, str]]:
    """(where in `text` it starts, its text) of each part `text` is read in: the whole text (stripped) when its
    `offsets` (its tokens) are within `limit`, else chunks of `limit` tokens overlapping by PART_OVERLAP_TOKENS,
    each stripped. `text` must hold something besides whitespace."""
    if len(offsets) <= limit:
        body = text.strip()
        return [(text.index(body), body)]
    parts = []
    for chunk in split_into_chunks(text, offsets, lambda s: len(tokenizer.encode(s)), limit, overlap=PART_OVERLAP_TOKENS):
        body = chunk.text_of(text)
        parts.append((chunk.start + text[chunk.start:chunk.end].index(body), body))
    return parts


def _code_identity() -> str:
    h = hashlib.sha256(str(FORMAT).encode())
    here = Path(__file__).parent
    for name in _SOURCES:
        h.update((here / name).read_bytes())
    return h.hexdigest()


_CODE: str | None = None


def _name(model, text: str, limit: int) -> str:
    global _CODE
    _CODE = _CODE or _code_identity()
    h = hashlib.sha256()
    for piece in (_CODE, doc_cache.tokenizer_identity(model), str(limit), text):
        h.update(piece.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()[:32]


def directory() -> Path:
    return doc_cache.directory() / "index"


def index_for(model, text: str, limit: int, progress, keep: bool = True) -> DocumentIndex:
    """The document's index: with `keep`, read from its file when one was kept, else built and kept; without
    (--no-cache), built."""
    if not keep:
        return build(model.tokenizer, text, limit, progress)
    path = directory() / f"{_name(model, text, limit)}.json"
    found = _read(path, text)
    if found is None:
        found = build(model.tokenizer, text, limit, progress)
        _write(path, found)
    return found


def _read(path: Path, text: str) -> DocumentIndex | None:
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    try:
        data = json.loads(raw)
        index = DocumentIndex(int(data["tokens"]), [(int(a), int(b)) for a, b in data["parts"]],
                              SentenceCounts(text, (data["stems"], data["roots"])))
        if len(index.counts.spans) != int(data["sentences"]) or not index.parts:
            raise ValueError("sentences differ")
    except (ValueError, KeyError, TypeError):  # damaged: computed again (its name holds all it depends on)
        _unlink(path)
        return None
    try:
        os.utime(path)  # recently used
    except OSError:
        pass
    return index


def _write(path: Path, index: DocumentIndex) -> None:
    data = {"format": FORMAT, "tokens": index.tokens, "parts": index.parts, "sentences": len(index.counts.spans),
            "stems": index.counts.stems, "roots": index.counts.roots}
    temp = path.with_name(f"{doc_cache.TEMP_PREFIX}{uuid.uuid4().hex}.json")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp.write_text(json.dumps(data, separators=(",", ":")), encoding="utf-8")
        os.replace(temp, path)
        _evict()
    except OSError:  # an optimisation the answer does not depend on; the KV entry beside it warns of the directory
        _unlink(temp)


def _files() -> list[Path]:
    try:
        return [p for p in directory().iterdir() if p.suffix == ".json" and p.is_file()]
    except OSError:
        return []


def _evict() -> None:
    files = []
    for path in _files():
        try:
            files.append((path.stat().st_mtime, path))
        except OSError:
            continue
    files.sort(reverse=True)
    for _, path in files[MAX_FILES:]:
        _unlink(path)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def clear() -> int:
    """Delete every kept index; how many went."""
    gone = 0
    for path in _files():
        _unlink(path)
        gone += not path.exists()
    return gone
