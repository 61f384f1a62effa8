"""PDFs written by reportlab (BSD) for the document-format tests (test_extract.py, test_ask_pages.py)."""

from __future__ import annotations

import io


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
