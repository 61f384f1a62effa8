"""A document's bytes as text with a location map: PDF, Word (.docx), HTML/XHTML, EPUB, or text (Markdown and
reStructuredText stay text), chosen by content, never by the file's name (`sniff`).

The location map is a sorted tuple of (character offset, label): where in the text a page ("p. 12"), a
heading ("§ Results") or an EPUB chapter ("ch. 3: The Storm") begins. `arbor ask` names the location of its
quote with it (`label_at`). Everything is bounded: the extracted text and every decompressed zip member count
against the input limit as they are produced (TextBuilder, zipped.py), so a zip bomb or a PDF of endless
pages stops at the limit instead of filling memory. The readers of PDF, Word and HTML are the `docs` extra's
(pyproject.toml); without it, such a document is one line naming the extra. Nothing here prints: warnings go
to the `warn` a caller passes, a long PDF's pages to its Progress.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from typing import Callable, NamedTuple

from arbor_core.errors import InputError

from ..progress import NoProgress, Progress

# Part of the document cache's key (doc_cache.key_for): raise it whenever any reader here changes the text it
# gives, so a better extractor never serves a cache made from an older one's text.
EXTRACTOR_VERSION = 1

SNIFF_BYTES = 1024
BINARY_SNIFF_BYTES = 8192
HTML_START = re.compile(rb"^(?:\xef\xbb\xbf)?\s*(?:<\?xml[^>]*>\s*)?(?:<!--.*?-->\s*)*<(?:!doctype\s+html|html)\b",
                        re.IGNORECASE | re.DOTALL)
LABEL_CHARS = 60  # a heading as a label: its first words

Locations = tuple[tuple[int, str], ...]


class Extracted(NamedTuple):
    text: str
    locations: Locations  # (offset, label), sorted by offset
    kind: str  # pdf, docx, epub, html or text


def sniff(data: bytes) -> str:
    """The document's kind by its first bytes: pdf (`%PDF-` in the first KB, as readers allow junk before
    it), zip (DOCX, EPUB: told apart by their members), html (a doctype or <html> first, after an XML
    declaration and comments), else text."""
    head = data[:SNIFF_BYTES]
    if b"%PDF-" in head:
        return "pdf"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if HTML_START.match(head):
        return "html"
    return "text"


def extract(data: bytes, name: str, limit: int, warn: Callable[[str], None],
            progress: Progress | None = None) -> Extracted:
    """`data` (a whole file, already within `limit` bytes) as text and locations; an InputError of one line
    for what cannot be read (encrypted, no text layer, truncated, corrupt, a zip bomb, the extra missing)."""
    kind, progress = sniff(data), progress or NoProgress()
    if kind == "pdf":
        from .pdf import pdf_text
        return pdf_text(data, name, limit, warn, progress)
    if kind == "zip":
        from .zipped import Members, zip_kind
        members = Members(data, name, limit)
        if zip_kind(members) == "epub":
            from .epub import epub_text
            return epub_text(members)
        from .word import docx_text
        return docx_text(data, members)
    if kind == "html":
        from .markup import html_text
        return html_text(data, name, limit)
    from .plain import plain_text
    return plain_text(data, name, warn)


def needs_extra(what: str) -> InputError:
    return InputError(f"reading {what} needs the docs extra: pip install 'arbor-cli[docs]'")


def too_large(name: str, limit: int, what: str = "its text is") -> InputError:
    size = f"{limit >> 20:,} MB" if limit >= 1 << 20 else f"{limit:,}-byte"
    return InputError(f"{name}: {what} larger than the {size} input limit; raise it with --max-input-mb or "
                      "ARBOR_MAX_INPUT_MB")


def heading_label(title: str) -> str:
    title = " ".join(title.split())
    return "§ " + (title if len(title) <= LABEL_CHARS else title[:LABEL_CHARS].rsplit(" ", 1)[0] + "…")


class TextBuilder:
    """A document's text built block by block (a page, a paragraph, a heading), blocks apart by a blank line,
    with the locations marked where blocks begin; the text's UTF-8 size is counted as it grows and passing
    `limit` is an InputError at once."""

    def __init__(self, name: str, limit: int):
        self.name, self.limit = name, limit
        self.blocks: list[str] = []
        self.chars = self.size = 0
        self.locations: list[tuple[int, str]] = []
        self.pending: str | None = None

    def mark(self, label: str) -> None:
        """The next block begins `label` (a mark with no block after it before the next mark is dropped)."""
        self.pending = label

    def add(self, block: str) -> None:
        block = block.strip()
        if not block:
            return
        at = self.chars + (2 if self.blocks else 0)
        if self.pending is not None:
            self.locations.append((at, self.pending))
            self.pending = None
        self.size += len(block.encode("utf-8", "surrogatepass")) + 2
        if self.size > self.limit:
            raise too_large(self.name, self.limit)
        self.blocks.append(block)
        self.chars = at + len(block)

    def result(self, kind: str) -> Extracted:
        return Extracted("\n\n".join(self.blocks), tuple(self.locations), kind)


def label_at(locations: Locations, offset: int) -> str | None:
    """The label of the location an offset of the text lies in; None before the first."""
    i = bisect_right([at for at, _ in locations], offset) - 1
    return locations[i][1] if i >= 0 else None


PAGE_LABEL = re.compile(r"p\. (\d+)")


def span_label(locations: Locations, start: int, end: int) -> str | None:
    """Where text[start:end] lies, as a person names it: "p. 3", "pp. 3-7", "§ Methods", "§ Methods – § Results"
    (from the location it starts in to the one it ends in); None where no location reaches it. Text before the
    first location (a preamble above the first heading) counts as the first location's. `end` is exclusive: a
    span that ends just where a page begins does not reach that page."""
    ats = [at for at, _ in locations]
    first = bisect_right(ats, start) - 1
    last = bisect_right(ats, max(start, end - 1)) - 1
    if last < 0:
        return None
    first_label, last_label = locations[max(first, 0)][1], locations[last][1]
    if first_label == last_label:
        return first_label
    pages = PAGE_LABEL.fullmatch(first_label), PAGE_LABEL.fullmatch(last_label)
    if all(pages):
        return f"pp. {pages[0].group(1)}-{pages[1].group(1)}"
    return f"{first_label} – {last_label}"
