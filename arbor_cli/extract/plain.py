"""Text files (Markdown and reStructuredText among them): the text as it is, its headings as locations.

A heading is a Markdown ATX line (`## Results`, outside ``` or ~~~ fences) or a title underlined (and maybe
overlined) by one punctuation mark repeated at least as long as the title: RST's section titles, and
Markdown's setext `===`/`---` headings. The underlined title must start a paragraph, so a horizontal rule
under a paragraph's last line is not taken for one.
"""

from __future__ import annotations

import re
from typing import Callable

from arbor_core.errors import InputError

from . import BINARY_SNIFF_BYTES, Extracted, heading_label

ATX = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$")
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
UNDERLINE = re.compile(r"^([=\-~^\"'`#*+<>:._])\1{2,}[ \t]*$")


def plain_text(data: bytes, name: str, warn: Callable[[str], None]) -> Extracted:
    if b"\x00" in data[:BINARY_SNIFF_BYTES]:
        raise InputError(f"{name} looks like a binary file, not text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        warn(f"{name} is not valid UTF-8 (first bad byte at offset {e.start}); undecodable bytes were replaced")
        text = data.decode("utf-8", errors="replace")
    text = text.lstrip("\ufeff")
    return Extracted(text, headings(text), "text")


def headings(text: str) -> tuple[tuple[int, str], ...]:
    """(offset of the heading's line, "§ title") for each Markdown or RST heading of `text`, in order."""
    lines = text.splitlines(keepends=True)
    found, at, fence = [], 0, None
    starts = []
    for line in lines:
        starts.append(at)
        at += len(line)
    for i, line in enumerate(lines):
        bare = line.rstrip("\r\n")
        opened = FENCE.match(bare)
        if fence is not None:
            if opened and opened.group(1)[0] == fence[0] and len(opened.group(1)) >= len(fence):
                fence = None
            continue
        if opened:
            fence = opened.group(1)
            continue
        if m := ATX.match(bare):
            found.append((starts[i], heading_label(m.group(1))))
        elif _underlined_title(lines, i):
            overlined = i > 0 and UNDERLINE.match(lines[i - 1].rstrip("\r\n"))
            found.append((starts[i - 1] if overlined else starts[i], heading_label(bare)))
    return tuple(found)


def _underlined_title(lines: list[str], i: int) -> bool:
    title = lines[i].rstrip("\r\n")
    if not title.strip() or title[0].isspace() or UNDERLINE.match(title) or i + 1 >= len(lines):
        return False
    under = UNDERLINE.match(lines[i + 1].rstrip("\r\n"))
    if not under or len(lines[i + 1].rstrip()) < len(title.rstrip()):
        return False
    before = lines[i - 1].rstrip("\r\n") if i else ""
    return not before.strip() or (UNDERLINE.match(before) is not None and before.strip()[0] == under.group(1))
