"""Documents as people have them (arbor_cli/extract): PDF, Word, HTML, EPUB and Markdown/RST read by content
into text with a location map, on real files made by real tools: PDFs written by reportlab and by
LibreOffice, DOCX by python-docx and by LibreOffice (fixtures/docs, make_fixtures.py regenerates them), EPUB
built from XHTML in a zip, a saved web page with navigation and scripts. For each: the extracted words are
the source's, in order (exactly: none of these writers hyphenates or uses ligatures here), and each
paragraph's page or heading is right. Bad inputs are one line each, through the CLI, and cache nothing."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("pypdfium2")
pytest.importorskip("docx")
pytest.importorskip("lxml")
reportlab = pytest.importorskip("reportlab")

from doc_files import prose, reportlab_pdf, textless_pdf

from arbor_cli.documents import read_document
from arbor_cli.extract import extract, label_at, sniff, span_label
from arbor_core.errors import InputError

FIXTURES = Path(__file__).parent / "fixtures" / "docs"
sys.path.insert(0, str(FIXTURES))
from fixture_text import SECTIONS  # noqa: E402

LIMIT = 1 << 20


def words(text: str) -> list[str]:
    return text.split()


def located(extracted, paragraph: str) -> str | None:
    """The label of where `paragraph` begins in the extracted text (its words, whatever the line breaks)."""
    found = re.search(r"\s+".join(map(re.escape, paragraph.split())), extracted.text)
    assert found, f"not found: {paragraph[:40]}…"
    return label_at(extracted.locations, found.start())


def read(data: bytes, name: str = "doc", limit: int = LIMIT, warned: list | None = None):
    return extract(data, name, limit, (warned if warned is not None else []).append)


# ---- PDF ---------------------------------------------------------------------------------------------------
def test_a_reportlab_pdf_gives_its_words_in_order_and_each_paragraph_its_page():
    pages = [[prose(p, i) for i in range(1, 4)] for p in range(1, 6)]
    extracted = read(reportlab_pdf(pages), "report.pdf")
    assert extracted.kind == "pdf"
    assert words(extracted.text) == words(" ".join(" ".join(page) for page in pages))
    for number, page in enumerate(pages, 1):
        assert [located(extracted, paragraph) for paragraph in page] == [f"p. {number}"] * len(page)


def test_a_libreoffice_pdf_gives_its_words_in_order_and_each_section_its_page():
    extracted = read((FIXTURES / "lo_report.pdf").read_bytes(), "lo_report.pdf")
    assert words(extracted.text) == words(" ".join(t + " " + " ".join(ps) for t, ps in SECTIONS))
    for number, (title, paragraphs) in enumerate(SECTIONS, 1):
        assert [located(extracted, p) for p in (title, *paragraphs)] == [f"p. {number}"] * (1 + len(paragraphs))


def test_pages_without_text_among_pages_with_text_are_left_out_with_a_warning():
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument(reportlab_pdf([[prose(1, 1)], [prose(2, 1)]]))
    pdf.new_page(595, 842)  # a third page with nothing on it
    out = io.BytesIO()
    pdf.save(out)
    warned = []
    extracted = read(out.getvalue(), "mixed.pdf", warned=warned)
    assert [label for _, label in extracted.locations] == ["p. 1", "p. 2"]
    assert warned == ["mixed.pdf: 1 of 3 pages have no text layer (scanned?) and are left out"]


def test_a_long_pdf_shows_its_pages_on_the_progress_display():
    events = []

    class Recorder:
        def begin(self, phase, total):
            events.append((phase, total))

        def advance(self):
            events.append("page")

    extract(reportlab_pdf([[prose(p, 1)] for p in range(1, 61)]), "long.pdf", LIMIT, print, Recorder())
    assert events[0] == ("reading the 60 pages of long.pdf", 60) and events.count("page") == 60


# ---- Word --------------------------------------------------------------------------------------------------
def test_a_python_docx_document_gives_paragraphs_tables_and_headings_in_order():
    import docx

    document = docx.Document()
    document.add_heading("Annual Report", 0)
    document.add_paragraph("The harbour board met four times this year.")
    document.add_heading("Finances", 1)
    document.add_paragraph("Income rose by a tenth, mostly from mooring fees.")
    table = document.add_table(rows=2, cols=2)
    for (r, c), text in {(0, 0): "Fees", (0, 1): "120", (1, 0): "Grants", (1, 1): "45"}.items():
        table.cell(r, c).text = text
    document.add_heading("Outlook", 1)
    document.add_paragraph("Next year the quay will be repaired.")
    out = io.BytesIO()
    document.save(out)
    extracted = read(out.getvalue(), "report.docx")
    assert extracted.kind == "docx"
    assert words(extracted.text) == words("Annual Report The harbour board met four times this year. Finances Income "
                                          "rose by a tenth, mostly from mooring fees. Fees | 120 Grants | 45 Outlook "
                                          "Next year the quay will be repaired.")
    assert located(extracted, "Income rose by a tenth") == "§ Finances"
    assert located(extracted, "Grants | 45") == "§ Finances"
    assert located(extracted, "Next year the quay") == "§ Outlook"
    assert located(extracted, "The harbour board met") == "§ Annual Report"


def test_a_libreoffice_docx_gives_its_words_in_order_and_each_paragraph_its_heading():
    extracted = read((FIXTURES / "lo_report.docx").read_bytes(), "lo_report.docx")
    assert words(extracted.text) == words(" ".join(t + " " + " ".join(ps) for t, ps in SECTIONS))
    for title, paragraphs in SECTIONS:
        assert [located(extracted, p) for p in paragraphs] == [f"§ {title}"] * len(paragraphs)


# ---- HTML and EPUB -------------------------------------------------------------------------------------------
SAVED_PAGE = """<!-- saved from url=(0031)https://example.org/harbour -->
<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Harbour news | Example</title>
<style>body { font-family: serif } .menu { color: red }</style>
<script>window.analytics = function () { track("page view"); };</script></head>
<body>
<header class="site"><a href="/">Example Home</a><nav><ul><li><a href="/a">About us</a></li>
<li><a href="/c">Contact</a></li></ul></nav></header>
<div role="navigation">Skip to content</div>
<main><article>
<header><h1>The quay will be rebuilt</h1></header>
<p>The harbour board voted on <b>Tuesday</b> to rebuild   the old quay.</p>
<h2>Why now</h2>
<p>Divers found rotten piles<br>below the waterline.</p>
<script>document.write("injected advert")</script>
<ul><li>Eleven piles are rotten.</li><li>Work starts in May.</li></ul>
</article></main>
<aside>Related: cookie recipes</aside>
<footer>Copyright Example Media</footer>
<noscript>Please enable JavaScript</noscript>
</body></html>"""


def test_a_saved_web_page_gives_its_article_without_navigation_scripts_or_styles():
    extracted = read(SAVED_PAGE.encode(), "page.html")
    assert extracted.kind == "html"
    assert words(extracted.text) == words("The quay will be rebuilt The harbour board voted on Tuesday to rebuild the "
                                          "old quay. Why now Divers found rotten piles below the waterline. Eleven "
                                          "piles are rotten. Work starts in May.")
    assert located(extracted, "The harbour board voted") == "§ The quay will be rebuilt"
    assert located(extracted, "Work starts in May.") == "§ Why now"


def xhtml(title: str, body: str) -> str:
    return (f'<?xml version="1.0" encoding="utf-8"?>\n<!DOCTYPE html>\n<html xmlns="http://www.w3.org/1999/xhtml">'
            f"<head><title>{title}</title></head><body>{body}</body></html>")


def epub(chapters: dict[str, str], spine: list[str]) -> bytes:
    """An EPUB as the format defines it (epub_frame), the chapters' XHTML under OEBPS/text/."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        epub_frame(z, sorted(chapters), spine)
        for n, body in chapters.items():
            z.writestr(f"OEBPS/text/{n}.xhtml", body)
    return out.getvalue()


def epub_frame(z: zipfile.ZipFile, chapters: list[str], spine: list[str]) -> None:
    """The mimetype first (stored), the container, the OPF's manifest and spine (`spine`: reading order, not
    the manifest's)."""
    z.writestr(zipfile.ZipInfo("mimetype"), b"application/epub+zip")
    z.writestr("META-INF/container.xml", '<?xml version="1.0"?><container version="1.0" xmlns="urn:oasis:names:'
               'tc:opendocument:xmlns:container"><rootfiles><rootfile full-path="OEBPS/content.opf" media-type='
               '"application/oebps-package+xml"/></rootfiles></container>')
    items = "".join(f'<item id="{n}" href="text/{n}.xhtml" media-type="application/xhtml+xml"/>' for n in chapters)
    refs = "".join(f'<itemref idref="{n}"/>' for n in spine)
    z.writestr("OEBPS/content.opf", f'<?xml version="1.0"?><package xmlns="http://www.idpf.org/2007/opf" '
               f'version="3.0"><metadata/><manifest>{items}</manifest><spine>{refs}</spine></package>')


def test_an_epub_is_read_in_its_spines_order_each_chapter_a_location():
    book = epub({"a_cover": xhtml("Cover", '<div><img src="cover.jpg"/></div>'),
                 "b_storm": xhtml("Two", "<h1>The Storm</h1><p>Waves broke over the quay all night.</p>"),
                 "c_calm": xhtml("One", "<h2>The Calm</h2><p>In the morning the sea lay flat.</p><p>Boats went out.</p>"),
                 "d_end": xhtml("Afterword", "<p>The harbour was rebuilt.</p>")},
                spine=["a_cover", "c_calm", "b_storm", "d_end"])
    extracted = read(book, "book.epub")
    assert extracted.kind == "epub"
    assert words(extracted.text) == words("The Calm In the morning the sea lay flat. Boats went out. The Storm Waves "
                                          "broke over the quay all night. The harbour was rebuilt.")
    assert located(extracted, "Boats went out.") == "ch. 1: The Calm"
    assert located(extracted, "Waves broke") == "ch. 2: The Storm"
    assert located(extracted, "The harbour was rebuilt.") == "ch. 3: Afterword"  # no heading: its <title>


# ---- text, and reading by content --------------------------------------------------------------------------
def test_markdown_and_rst_stay_text_with_their_headings_as_locations():
    markdown = "# Guide\n\nIntro.\n\n```\n# a comment, not a heading\n```\n\nSetup\n=====\n\nRun it.\n\n## Notes ##\nEnd.\n"
    extracted = read(markdown.encode(), "guide.md")
    assert extracted.text == markdown and extracted.kind == "text"
    assert [label for _, label in extracted.locations] == ["§ Guide", "§ Setup", "§ Notes"]
    assert located(extracted, "Run it.") == "§ Setup" and located(extracted, "End.") == "§ Notes"
    rst = "=====\nTitle\n=====\n\nFirst.\n\nSection\n-------\n\nSecond.\n\nA line\n---\n"  # underline too short
    labels = read(rst.encode(), "doc.rst").locations
    assert [label for _, label in labels] == ["§ Title", "§ Section"] and labels[0][0] == 0


@pytest.mark.parametrize("start, end, label", [
    (0, 99, "p. 1"), (100, 150, "p. 2"), (50, 100, "p. 1"),  # the end is exclusive: up to where p. 2 begins
    (50, 101, "pp. 1-2"), (0, 400, "pp. 1-3"), (120, 120, "p. 2"),
])
def test_a_span_of_pages_is_named_p_or_pp(start, end, label):
    assert span_label(((0, "p. 1"), (100, "p. 2"), (200, "p. 3")), start, end) == label


def test_a_span_of_headings_names_the_first_and_the_last_and_a_preamble_counts_as_the_first():
    headings = ((40, "§ Methods"), (90, "§ Results"))
    assert span_label(headings, 50, 80) == "§ Methods"
    assert span_label(headings, 50, 120) == "§ Methods – § Results"
    assert span_label(headings, 0, 60) == "§ Methods"  # the text above the first heading
    assert span_label(headings, 0, 40) is None and span_label((), 0, 10) is None


def test_documents_are_read_by_their_content_not_their_names(tmp_path):
    (tmp_path / "notes.txt").write_bytes(reportlab_pdf([[prose(1, 1)]]))
    (tmp_path / "page.dat").write_text(SAVED_PAGE)
    (tmp_path / "fake.pdf").write_text("Plain words in a file named like a PDF.")
    kinds = {name: sniff((tmp_path / name).read_bytes()) for name in ("notes.txt", "page.dat", "fake.pdf")}
    assert kinds == {"notes.txt": "pdf", "page.dat": "html", "fake.pdf": "text"}
    document = read_document(str(tmp_path / "notes.txt"), LIMIT, print)
    assert document.locations == ((0, "p. 1"),) and "surveyors" in document.text
    name, text = document  # still the (name, text) pair it always was
    assert text == document.text
    assert sniff(b"A note about <html> tags.\n<html>") == "text"  # html must start the file


def test_without_the_docs_extra_a_pdf_is_one_line_naming_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pypdfium2", None)  # `import pypdfium2` fails as when it is not installed
    with pytest.raises(InputError) as e:
        read(reportlab_pdf([[prose(1, 1)]]), "report.pdf")
    assert str(e.value) == "reading PDF needs the docs extra: pip install 'arbor-cli[docs]'"


def test_extracted_text_is_held_to_the_input_limit():
    data = reportlab_pdf([[prose(p, i) for i in range(10)] for p in range(1, 30)])
    with pytest.raises(InputError, match="its text is larger than the 20,000-byte input limit"):
        read(data, "big.pdf", limit=20_000)


# ---- bad input, through the CLI ------------------------------------------------------------------------------
def zip_bomb(kind: str) -> bytes:
    """A DOCX or EPUB (whole: container, package, spine) whose one member, 64 MB of one byte in a paragraph,
    compresses to ~64 KB."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        if kind == "epub":
            epub_frame(z, ["ch1"], ["ch1"])
        with z.open("word/document.xml" if kind == "docx" else "OEBPS/text/ch1.xhtml", "w", force_zip64=True) as f:
            f.write(b"<html><body><p>")
            for _ in range(64):
                f.write(b"a" * (1 << 20))
            f.write(b"</p></body></html>")
    return out.getvalue()


def encrypted_pdf() -> bytes:
    from reportlab.lib import pdfencrypt

    return reportlab_pdf([[prose(1, 1)]], encrypt=pdfencrypt.StandardEncryption("secret", canPrint=0))


@pytest.mark.parametrize("name, make, says", [
    ("secret.pdf", encrypted_pdf, "the PDF is encrypted"),
    ("scan.pdf", textless_pdf, "the PDF has no text layer (a scan? OCR it first)"),
    ("cut.pdf", lambda: reportlab_pdf([[prose(1, 1)], [prose(2, 1)]])[:1500], "the PDF is truncated or corrupt"),
    ("cut.docx", lambda: zip_bomb("docx")[:30_000], "not a readable zip archive"),
    ("bomb.docx", lambda: zip_bomb("docx"), "decompressed, it is larger than the 8 MB input limit"),
    ("bomb.epub", lambda: zip_bomb("epub"), "decompressed, it is larger than the 8 MB input limit"),
])
def test_bad_documents_are_one_line_each_exit_non_zero_and_cache_nothing(tmp_path, name, make, says):
    path = tmp_path / name
    path.write_bytes(make())
    home = tmp_path / "home"
    done = subprocess.run([sys.executable, "-m", "arbor_cli", "ask", str(path), "What does it say?",
                           "--max-input-mb", "8"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NO_COLOR": "1", "ARBOR_HOME": str(home)})
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("arbor: error: ") and says in done.stderr, done.stderr
    assert not [p for p in home.rglob("*") if p.is_file()]  # nothing cached, nothing half-written
