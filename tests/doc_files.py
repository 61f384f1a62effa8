"""PDFs written by reportlab (BSD) for the document-format tests (test_extract.py, test_ask_pages.py), and a long
report of varied prose with facts planted on known pages:

    python tests/doc_files.py report.pdf [PAGES]    # the 50-page report of the README's tour (needs reportlab)
"""

from __future__ import annotations

import io
import sys


def reportlab_pdf(pages: list[list[str]], encrypt=None) -> bytes:
    """A PDF of `pages`, each a list of paragraphs laid out (wrapped) by reportlab's platypus; `encrypt`: a
    reportlab.lib.pdfencrypt.StandardEncryption."""
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import getSampleStyleSheet
    from reportlab.platypus import PageBreak, Paragraph, SimpleDocTemplate

    style, out = getSampleStyleSheet()["BodyText"], io.BytesIO()
    story = []
    for i, page in enumerate(pages):
        story += [Paragraph(p, style) for p in page] + ([PageBreak()] if i < len(pages) - 1 else [])
    SimpleDocTemplate(out, pagesize=A4, encrypt=encrypt).build(story)
    return out.getvalue()


def textless_pdf() -> bytes:
    """A page with drawing only, as a scan's page has an image and no text layer."""
    from reportlab.pdfgen import canvas

    out = io.BytesIO()
    page = canvas.Canvas(out)
    page.rect(100, 100, 300, 400, fill=1)
    page.showPage()
    page.save()
    return out.getvalue()


def prose(page: int, paragraph: int) -> str:
    return (f"On page {page} the surveyors wrote paragraph {paragraph} about the quay, the tides and the piles "
            f"that hold the old harbour wall in place against the winter storms.")


# a long report: long_document.py's prose (honeybees, volcanoes, chess; no sentence twice), four paragraphs a
# page, with a fact planted in the middle of a paragraph on each of these pages: page -> (fact, question, value)
REPORT_FACTS = {
    2: ("The vault code is 4417.", "What is the vault code?", "4417"),
    17: ("The ferry number is 2093.", "What is the ferry number?", "2093"),
    41: ("The permit number for the east dock is 7718.", "What is the permit number for the east dock?", "7718"),
}
REPORT_PARAGRAPHS_PER_PAGE = 4
REPORT_BLOCK_PAGES = 50


def report_pages(pages: int = 50, facts: dict = REPORT_FACTS) -> list[list[str]]:
    """`pages` pages of prose paragraphs, each planted fact after the second sentence of its page's second
    paragraph. Every 50 pages are one long_document of their own seed (no sentence twice in them: its
    templates run out of new sentences a few hundred paragraphs a subject)."""
    from long_document import long_document

    per_block = -(-REPORT_BLOCK_PAGES * REPORT_PARAGRAPHS_PER_PAGE // 3)  # paragraphs a subject
    paragraphs = []
    for block in range(-(-pages // REPORT_BLOCK_PAGES)):
        text = long_document(per_block, seed=7 + block)
        paragraphs += [p for p in text.split("\n\n") if len(p.split()) > 3]  # not the titles
    out = []
    for page in range(pages):
        content = paragraphs[page * REPORT_PARAGRAPHS_PER_PAGE:(page + 1) * REPORT_PARAGRAPHS_PER_PAGE]
        if page + 1 in facts:
            sentences = content[1].split(". ")
            content[1] = ". ".join([*sentences[:2], facts[page + 1][0].rstrip("."), *sentences[2:]])
        out.append(content)
    return out


def report_pdf(pages: int = 50, facts: dict = REPORT_FACTS) -> bytes:
    return reportlab_pdf(report_pages(pages, facts))


if __name__ == "__main__":
    with open(sys.argv[1], "wb") as f:
        f.write(report_pdf(int(sys.argv[2]) if len(sys.argv) > 2 else 50))
