"""PDF: each page's text layer through PDFium (pypdfium2), page by page, each page a location ("p. 12", the
page's number counted from 1, as a viewer's page box shows it for a PDF without page labels).

PDFium gives the text in reading order with its line breaks; a word hyphenated at a line's end comes marked
(\\x02, or U+FFFE) and is joined again. One line, never a guess, for what has no text to give: an encrypted
PDF (PDFium cannot open it without the password), one whose pages have no text layer (a scan: OCR it
first), a truncated file (no `%%EOF` near its end: PDFium would read what pages it could and lose the rest
silently), or one PDFium cannot parse. Pages without text among pages with text are left out with a
warning. Linear in the pages: a 2,000-page PDF reads page after page, its progress on the caller's display.
"""

from __future__ import annotations

import re
from typing import Callable

from arbor_core.errors import InputError

from . import Extracted, TextBuilder, needs_extra
from ..progress import Progress

PROGRESS_PAGES = 50  # a PDF with at least this many pages shows its reading on the progress display
EOF_WINDOW = 2048  # the end-of-file marker must be this near the end (writers add a newline or a little junk)
HYPHENATED = re.compile(r"[\x02\ufffe][ \t]*\r?\n[ \t]*")  # PDFium's mark of a word broken at a line's end
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
LINE_END_SPACE = re.compile(r"[ \t]+\n")


def pdf_text(data: bytes, name: str, limit: int, warn: Callable[[str], None], progress: Progress) -> Extracted:
    try:
        import pypdfium2 as pdfium
        from pypdfium2 import raw
    except ImportError:
        raise needs_extra("PDF") from None
    if b"%%EOF" not in data[-EOF_WINDOW:]:
        raise InputError(f"{name}: the PDF is truncated or corrupt (it has no end-of-file marker)")
    try:
        pdf = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as e:
        if getattr(e, "err_code", None) == raw.FPDF_ERR_PASSWORD:
            raise InputError(f"{name}: the PDF is encrypted (it needs a password); decrypt it first") from None
        raise InputError(f"{name}: not a readable PDF ({_reason(e)})") from None
    try:
        return _pages(pdf, name, limit, warn, progress)
    finally:
        pdf.close()


def _pages(pdf, name: str, limit: int, warn: Callable[[str], None], progress: Progress) -> Extracted:
    import pypdfium2 as pdfium

    out, pages, empty = TextBuilder(name, limit), len(pdf), 0
    if pages >= PROGRESS_PAGES:
        progress.begin(f"reading the {pages} pages of {name}", pages)
    for index in range(pages):
        try:
            text = _page_text(pdf, index)
        except pdfium.PdfiumError as e:
            raise InputError(f"{name}: page {index + 1} cannot be read ({_reason(e)})") from None
        if text.strip():
            out.mark(f"p. {index + 1}")
            out.add(text)
        else:
            empty += 1
        if pages >= PROGRESS_PAGES:
            progress.advance()
    if empty == pages:
        raise InputError(f"{name}: the PDF has no text layer (a scan? OCR it first)")
    if empty:
        warn(f"{name}: {empty} of {pages} pages have no text layer (scanned?) and are left out")
    return out.result("pdf")


def _page_text(pdf, index: int) -> str:
    page = pdf[index]
    try:
        textpage = page.get_textpage()
        try:
            text = textpage.get_text_range()
        finally:
            textpage.close()
    finally:
        page.close()
    text = HYPHENATED.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    return LINE_END_SPACE.sub("\n", CONTROL.sub("", text))


def _reason(error: Exception) -> str:
    message = str(error)
    found = re.search(r"PDFium: ([^)]*)", message)
    return (found.group(1) if found else message).rstrip(".").lower()
