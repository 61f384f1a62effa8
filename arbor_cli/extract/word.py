"""Word (.docx) through python-docx: the body's paragraphs and tables in document order, a paragraph in a
heading style ("Heading 1".."Heading 9", "Title") beginning a location ("§ Title"). A table is a block per
row, its cells apart by " | " (a cell merged across columns counted once). A .docx has no pages of its own
(the word processor lays them out), so its locations are its headings.

Every member of the archive is decompressed once under the limit (zipped.Members.read_all) before
python-docx, which reads them all, opens it.
"""

from __future__ import annotations

import io

from arbor_core.errors import InputError

from . import Extracted, TextBuilder, heading_label, needs_extra
from .zipped import Members

HEADING_STYLES = ("Heading", "Title")


def docx_text(data: bytes, members: Members) -> Extracted:
    try:
        import docx
        from docx.table import Table
    except ImportError:
        raise needs_extra("Word documents") from None
    name = members.name
    members.read_all()
    try:
        document = docx.Document(io.BytesIO(data))
        out = TextBuilder(name, members.limit)
        for item in document.iter_inner_content():
            if isinstance(item, Table):
                for row in _rows(item):
                    out.add(row)
            elif _is_heading(item):
                out.mark(heading_label(item.text))
                out.add(item.text)
            else:
                out.add(item.text)
    except InputError:
        raise
    except Exception as e:  # python-docx's and lxml's many ways to say the XML is broken
        raise InputError(f"{name}: not a readable Word document ({type(e).__name__}: {e})") from None
    if not out.blocks:
        raise InputError(f"{name}: the Word document has no text")
    return out.result("docx")


def _is_heading(paragraph) -> bool:
    style = paragraph.style
    return style is not None and (style.name or "").startswith(HEADING_STYLES) and bool(paragraph.text.strip())


def _rows(table) -> list[str]:
    rows = []
    for row in table.rows:
        cells, seen = [], []
        for cell in row.cells:
            if not any(cell._tc is tc for tc in seen):  # a merged cell is listed once per column it spans
                seen.append(cell._tc)
                cells.append(" ".join(cell.text.split()))
        rows.append(" | ".join(c for c in cells if c))
    return rows
