"""Standard streams a shell closed (`arbor … >&-`, `2>&-`, `<&-`): made safe before anything runs.

A closed fd 1 or 2 leaves Python's sys.stdout / sys.stderr None: `isatty()` on it crashes, and
`print(file=sys.stderr)` silently writes to stdout instead. The first file arbor opened would also
take the free descriptor and receive whatever is written "to stdout". So the descriptor is pointed
at /dev/null, and the stream becomes one that refuses writes (stdout: the answer cannot be
delivered, which is an error) or drops them (stderr: the user chose not to see messages).
"""

from __future__ import annotations

import errno
import io
import os
import sys


class ClosedStream(io.TextIOBase):
    """A text stream for a descriptor the caller closed: writes fail with EBADF (or vanish, `drop`)."""

    def __init__(self, name: str, drop: bool):
        self.name, self.drop = name, drop

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        if self.drop:
            return len(text)
        raise OSError(errno.EBADF, f"standard {self.name} is closed")

    def flush(self) -> None:
        pass


def guard_closed_std_streams() -> None:
    if sys.stdin is None or not _is_open(0):  # `<&-`: stdin reads as empty, as from /dev/null
        _point_at_devnull(0, os.O_RDONLY)
        sys.stdin = open(0, closefd=False)
    for fd, name, drop in ((1, "output", False), (2, "error", True)):
        stream = sys.stdout if fd == 1 else sys.stderr
        if stream is not None and _is_open(fd):
            continue
        _point_at_devnull(fd, os.O_WRONLY)
        closed = ClosedStream(name, drop)
        if fd == 1:
            sys.stdout = closed
        else:
            sys.stderr = closed


def _point_at_devnull(fd: int, flags: int) -> None:
    """A closed `fd` opened on /dev/null, so no file arbor opens later takes its number (0, 1, 2 in order)."""
    if _is_open(fd):
        return
    devnull = os.open(os.devnull, flags)
    if devnull != fd:
        os.dup2(devnull, fd)
        os.close(devnull)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False
