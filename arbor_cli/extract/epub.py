"""EPUB, read as what it is: a zip whose META-INF/container.xml names the package (OPF) file, whose spine
lists the chapters' XHTML in reading order. Each chapter with text is a location ("ch. 3: Title", its title
the chapter's first heading, else its <title>), its text the HTML reader's (markup.py). No EPUB library:
the permissive ones are thin and ebooklib is AGPL.

The container and the OPF are parsed as XML without entities or network (an entity bomb expands nothing);
every member read counts against the limit (zipped.Members).
"""

from __future__ import annotations

import posixpath
from urllib.parse import unquote

from arbor_core.errors import InputError

from . import Extracted, TextBuilder, needs_extra
from .markup import blocks, parse, title_of
from .zipped import Members

CONTAINER = "META-INF/container.xml"
OPF_NS = "{http://www.idpf.org/2007/opf}"
CONTAINER_NS = "{urn:oasis:names:tc:opendocument:xmlns:container}"
TITLE_CHARS = 60


def epub_text(members: Members) -> Extracted:
    name, out = members.name, TextBuilder(members.name, members.limit)
    for number, path in enumerate(_spine(members), 1):
        if path not in members.names:
            raise InputError(f"{name}: the EPUB's spine names {path}, which is not in the archive")
        chapter = list(blocks(root := parse(members.read(path), name)))
        if not chapter:
            continue
        title = next((text for level, text in chapter if level), "") or title_of(root)
        title = " ".join(title.split())
        title = title if len(title) <= TITLE_CHARS else title[:TITLE_CHARS].rsplit(" ", 1)[0] + "…"
        out.mark(f"ch. {len(out.locations) + 1}: {title}" if title else f"ch. {len(out.locations) + 1}")
        for _, text in chapter:
            out.add(text)
    if not out.blocks:
        raise InputError(f"{name}: the EPUB has no text")
    return out.result("epub")


def _spine(members: Members) -> list[str]:
    """The chapters' paths in the archive, in the spine's reading order."""
    name = members.name
    container = _xml(members, CONTAINER)
    rootfile = container.find(f".//{CONTAINER_NS}rootfile")
    if rootfile is None or not rootfile.get("full-path"):
        raise InputError(f"{name}: the EPUB's {CONTAINER} names no package file")
    opf_path = rootfile.get("full-path")
    opf = _xml(members, opf_path)
    base = posixpath.dirname(opf_path)
    manifest = {item.get("id"): item.get("href") for item in opf.iter(f"{OPF_NS}item") if item.get("href")}
    spine = [ref.get("idref") for ref in opf.iter(f"{OPF_NS}itemref")]
    paths = [posixpath.normpath(posixpath.join(base, unquote(manifest[idref].split("#")[0])))
             for idref in spine if idref in manifest]
    if not paths:
        raise InputError(f"{name}: the EPUB's spine lists no chapters")
    return paths


def _xml(members: Members, path: str):
    try:
        from lxml import etree
    except ImportError:
        raise needs_extra("EPUB") from None
    if path not in members.names:
        raise InputError(f"{members.name}: not a readable EPUB (it has no {path})")
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)
    try:
        return etree.fromstring(members.read(path), parser)
    except etree.XMLSyntaxError as e:
        raise InputError(f"{members.name}: {path} in the EPUB is not well-formed XML ({e})") from None
