"""HTML and XHTML (web pages, EPUB's chapters) as blocks of text, through lxml's HTML parser: a paragraph, a
list item or a table row is a block, a heading h1-h6 a block that begins a location ("§ Title").

What a saved page carries around its text is left out: scripts, styles, templates, forms' controls, the
page's navigation, banners and side bars (<nav>, <aside>, ARIA navigation/banner/contentinfo/complementary,
`hidden`), and <header>/<footer> outside an <article>, <main> or <section> (inside one, the header holds
that article's title). The walk is iterative (lxml's iterwalk), so a deeply nested page cannot overflow
the stack.
"""

from __future__ import annotations

import re
from typing import Iterator

from arbor_core.errors import InputError

from . import Extracted, TextBuilder, heading_label, needs_extra

LEFT_OUT = {"script", "style", "noscript", "template", "nav", "aside", "head", "title", "button", "select", "option",
            "textarea", "svg", "math", "iframe", "object", "canvas", "audio", "video", "map"}
PAGE_LEVEL = {"header", "footer"}  # left out unless inside one of CONTENT
CONTENT = {"article", "main", "section"}
ROLES_LEFT_OUT = {"navigation", "banner", "contentinfo", "complementary", "search", "menu", "menubar"}
BLOCKS = {"address", "article", "aside", "blockquote", "body", "caption", "dd", "details", "dialog", "div", "dl",
          "dt", "fieldset", "figcaption", "figure", "footer", "form", "header", "hr", "html", "legend", "li",
          "main", "ol", "p", "pre", "section", "summary", "table", "tbody", "thead", "tfoot", "tr", "ul"}
CELLS = {"td", "th"}
HEADINGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}
SPACE = re.compile(r"\s+")
XML_DECLARATION = re.compile(r"^\s*<\?xml[^>]*\?>")


def html_text(data: bytes, name: str, limit: int) -> Extracted:
    out = TextBuilder(name, limit)
    for level, block in blocks(parse(data, name)):
        if level:
            out.mark(heading_label(block))
        out.add(block)
    if not out.blocks:
        raise InputError(f"{name}: the page has no text")
    return out.result("html")


def parse(data: bytes, name: str):
    """The document's root element. UTF-8 (the web's and EPUB's encoding) is decoded here; anything else is
    left to the parser, which follows the page's <meta charset>."""
    try:
        from lxml import etree, html
    except ImportError:
        raise needs_extra("HTML") from None
    try:
        text = data.decode("utf-8").lstrip("\ufeff")
        source: str | bytes = XML_DECLARATION.sub("", text, count=1)  # lxml refuses a str that declares its bytes
    except UnicodeDecodeError:
        source = data
    try:
        return html.document_fromstring(source, parser=html.HTMLParser(no_network=True, recover=True))
    except (etree.ParserError, etree.XMLSyntaxError, ValueError) as e:
        raise InputError(f"{name}: not readable HTML ({e})") from None


def title_of(root) -> str:
    found = root.find(".//title")
    return " ".join((found.text_content() if found is not None else "").split())


def blocks(root) -> Iterator[tuple[int, str]]:
    """(heading level, or 0, text) for each block of the page's text, in document order."""
    from lxml import etree

    line: list[str] = []
    in_pre = 0
    walk = etree.iterwalk(root, events=("start", "end"))
    for event, element in walk:
        tag = element.tag.lower() if isinstance(element.tag, str) else None  # None: a comment or instruction
        if event == "start":
            if tag is None:
                continue
            if _left_out(element, tag):
                walk.skip_subtree()
                continue
            if tag in BLOCKS or tag in HEADINGS or tag == "br":
                yield from _flush(line)
            if tag == "pre":
                in_pre += 1
            if element.text:
                line.append(element.text if in_pre else SPACE.sub(" ", element.text))
            continue
        if tag is not None and not _left_out(element, tag):
            if tag in HEADINGS:
                yield from ((HEADINGS[tag], text) for _, text in _flush(line))
            elif tag in BLOCKS:
                yield from _flush(line)
            elif tag in CELLS:
                line.append(" ")
            if tag == "pre":
                in_pre -= 1
        if element.tail:
            line.append(element.tail if in_pre else SPACE.sub(" ", element.tail))
    yield from _flush(line)


def _flush(line: list[str]) -> Iterator[tuple[int, str]]:
    text = "\n".join(part.strip() for part in "".join(line).split("\n") if part.strip())
    line.clear()
    if text:
        yield 0, text


def _left_out(element, tag: str) -> bool:
    if tag in LEFT_OUT or element.get("hidden") is not None or element.get("aria-hidden") == "true":
        return True
    if (element.get("role") or "").lower() in ROLES_LEFT_OUT:
        return True
    return tag in PAGE_LEVEL and not any(isinstance(a.tag, str) and a.tag.lower() in CONTENT
                                         for a in element.iterancestors())
