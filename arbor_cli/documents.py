"""The documents a command reads: one FILE or stdin, or several FILEs and DIRs, as (name, text) pairs.

Each is read by its content, not its name (extract/: PDF, Word, HTML, EPUB, or text), into its text and
its location map (pages, headings, chapters). The policy for several: a directory gives its files, recursively, in sorted order, hidden entries
left out and links to directories not followed; a file found under a directory is named by its path
below it; among several sources a file that cannot be a document is skipped (and said so), and only
when nothing could be read is that an error. One FILE (or stdin) is strict: anything wrong with it is
an InputError. Nothing here prints: what a person should hear goes to the `warn` a caller passes
(the CLI's stderr line).
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from arbor_core.errors import InputError

from .extract import Locations, extract
from .progress import Progress

READ_BLOCK_BYTES = 1 << 20


@dataclass(frozen=True)
class Document:
    """One document as summarize_documents and ask_documents take it. It unpacks as the (name, text) pair it
    always was (`name, text = document`); the location map rides along for those that name places."""

    name: str  # as the model and --json see it
    text: str
    locations: Locations = ()  # (offset in text, label): where each page, heading or chapter begins

    def __iter__(self):
        return iter((self.name, self.text))


def stdin_is_piped() -> bool:
    return not sys.stdin.isatty()


def read_document(source: str | None, max_bytes: int, warn: Callable[[str], None],
                  progress: Progress | None = None) -> Document:
    """A FILE, or stdin for '-' (or no FILE with piped stdin), read by its content (extract.extract).

    Rejects what cannot be a document with one clear line: missing file, a directory, a device
    (/dev/zero never ends), an input larger than `max_bytes` (read in blocks, so an endless pipe stops
    at the limit; the extracted text and a zip's decompressed members are held to it too), an empty
    input, a binary file of no format read here, and what extract refuses. Invalid UTF-8 in a text is
    decoded with replacement characters and warned about once. A long PDF's pages go to `progress`.
    """
    if source in (None, "-"):
        if source is None and not stdin_is_piped():
            raise InputError("no input: give a FILE, '-' for stdin, or pipe text in")
        name = "<stdin>"
        data = _read_at_most(sys.stdin.buffer, max_bytes, name)
    else:
        name = source
        try:
            with _open_document(Path(source)) as f:
                data = _read_at_most(f, max_bytes, name)
        except FileNotFoundError:
            raise InputError(f"{source}: no such file") from None
        except PermissionError:
            raise InputError(f"{source}: permission denied") from None
        except IsADirectoryError:
            raise InputError(f"{source} is a directory, not a text file") from None
        except OSError as e:
            raise InputError(f"{source}: cannot read ({e.strerror})") from None
    if not data.strip():
        raise InputError(f"{name} is empty")
    text, locations, _ = extract(data, name, max_bytes, warn, progress)
    return Document(name, text, locations)


def read_documents(sources: list[str], max_bytes: int, warn: Callable[[str], None],
                   progress: Progress | None = None) -> tuple[list[Document], list[tuple[str, str]]]:
    """(documents, [(name, why skipped)]) of FILEs, DIRs and '-' (see the module's docstring)."""
    if len(sources) <= 1 and not (sources and Path(sources[0]).is_dir()):
        return [read_document(sources[0] if sources else None, max_bytes, warn, progress)], []
    documents, skipped = [], []
    for source in sources:
        if source != "-" and not Path(source).exists() and not Path(source).is_symlink():
            raise InputError(f"{source}: no such file or directory (a pattern that matched nothing?)")
        for path in ([source] if source == "-" or not Path(source).is_dir() else _text_files_under(Path(source),
                                                                                                     skipped, warn)):
            try:
                document = read_document(str(path), max_bytes, warn, progress)
            except InputError as e:
                skipped.append((str(path), str(e)))
                warn(f"skipped: {e}")
                continue
            if path != source:  # found under a directory: named by its path below it
                document = replace(document, name=_name_under(Path(source), Path(path), several=len(sources) > 1))
            documents.append(document)
    if not documents:
        what = f" ({len(skipped)} skipped)" if skipped else " (no files in it)"
        raise InputError(f"no document could be read from {', '.join(sources)}{what}")
    return documents, skipped


def _name_under(folder: Path, path: Path, several: bool) -> str:
    """A file found under `folder` as the model and --json see it: its path below the folder (`notes/chess.txt`),
    with the folder's own name in front when several sources were given (two folders may both hold a
    README.md); never the absolute path the folder was given by, which would put the user's directory layout
    in every prompt and read the same folder differently from another place."""
    below = path.relative_to(folder)
    if not several:
        return str(below)
    top = folder.resolve().name if folder.name in ("", ".", "..") else folder.name
    return str(Path(top) / below)


def _text_files_under(folder: Path, skipped: list[tuple[str, str]], warn: Callable[[str], None]) -> list[Path]:
    """Every file below `folder` in a stable (sorted) order, hidden names left out; links to directories are
    not followed (a link back up the tree would loop) and are named once as skipped."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for d in list(dirs):
            if (Path(root) / d).is_symlink():
                dirs.remove(d)
                skipped.append((str(Path(root) / d), f"{Path(root) / d} is a link to a directory, not followed"))
                warn(f"skipped: {Path(root) / d} is a link to a directory, not followed")
        for f in files:
            if f.startswith("."):
                continue
            kind = _special_kind(Path(root) / f)
            if kind:  # never opened: a FIFO would wait for a writer forever
                skipped.append((str(Path(root) / f), f"{Path(root) / f} is a {kind}, not a file"))
                warn(f"skipped: {Path(root) / f} is a {kind}, not a file")
            else:
                found.append(Path(root) / f)
    return sorted(found, key=lambda path: path.relative_to(folder).parts)  # as `find | sort` lists them


def _special_kind(path: Path) -> str | None:
    """What a path found in a directory is when it is neither a file nor a link to one (None for a file, or
    for a path that cannot be looked at: reading it says why)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    return ("FIFO (named pipe)" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode)
            else "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special file")


def _open_document(path: Path):
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
    mode = path.stat().st_mode
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        raise InputError(f"{path} is a device, not a text file (for a pipe or stdin use '-')")
    return path.open("rb")


def _read_at_most(stream, limit: int, name: str) -> bytes:
    """The whole stream, or an InputError as soon as it passes `limit` bytes."""
    blocks, size = [], 0
    while True:
        block = stream.read(min(READ_BLOCK_BYTES, limit + 1 - size))
        if not block:
            return b"".join(blocks)
        blocks.append(block)
        size += len(block)
        if size > limit:
            raise InputError(f"{name} is larger than the {limit >> 20:,} MB input limit; raise it with "
                             "--max-input-mb or ARBOR_MAX_INPUT_MB")
