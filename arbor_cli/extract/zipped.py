"""Zip-based documents: Word (.docx: a `word/document.xml` member) and EPUB (a `mimetype` member saying
application/epub+zip), told apart by their members, not the file's name.

A zip's declared sizes are the writer's word, so they are not trusted: every member is decompressed in
blocks and the bytes counted as they come (`Members`), all members together bounded by the input limit, and
the count of members bounded too. A zip bomb dressed as DOCX or EPUB stops at the limit with one line.
"""

from __future__ import annotations

import io
import zipfile
import zlib

from arbor_core.errors import InputError

from . import too_large

BLOCK = 1 << 20
MAX_MEMBERS = 10_000
EPUB_TYPE = b"application/epub+zip"
OPENDOCUMENT = b"application/vnd.oasis.opendocument"


class Members:
    """A zip's members read with their decompressed bytes counted: together at most `limit`."""

    def __init__(self, data: bytes, name: str, limit: int):
        self.name, self.limit, self.used = name, limit, 0
        try:
            self.zip = zipfile.ZipFile(io.BytesIO(data))
            self.infos = self.zip.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError) as e:
            raise InputError(f"{name}: not a readable zip archive, truncated or corrupt ({e})") from None
        if len(self.infos) > MAX_MEMBERS:
            raise InputError(f"{name}: a zip of {len(self.infos):,} members, more than the {MAX_MEMBERS:,} read")
        self.names = {info.filename for info in self.infos}

    def read(self, member: str) -> bytes:
        """One member's bytes, counted against the limit while it is decompressed."""
        blocks = []
        try:
            with self.zip.open(member) as stream:
                while block := stream.read(BLOCK):
                    self.used += len(block)
                    if self.used > self.limit:
                        raise too_large(self.name, self.limit, "decompressed, it is")
                    blocks.append(block)
        except KeyError:
            raise InputError(f"{self.name}: the archive has no {member}") from None
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, OSError) as e:
            raise InputError(f"{self.name}: {member} in the archive cannot be read ({e})") from None
        return b"".join(blocks)

    def read_all(self) -> None:
        """Every member decompressed and counted once: before a library that reads them all itself."""
        for info in self.infos:
            if not info.is_dir():
                self.read(info.filename)


def zip_kind(members: Members) -> str:
    """"epub" or "docx", by the archive's members; an InputError for any other zip."""
    mimetype = members.read("mimetype").strip() if "mimetype" in members.names else b""
    if mimetype == EPUB_TYPE:
        return "epub"
    if "word/document.xml" in members.names:
        return "docx"
    if mimetype.startswith(OPENDOCUMENT):
        raise InputError(f"{members.name} is an OpenDocument file, which arbor does not read yet: save it as DOCX "
                         "or PDF")
    raise InputError(f"{members.name} is a zip archive, not a document arbor reads (DOCX or EPUB)")
