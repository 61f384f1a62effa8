"""What arbor's per-machine build caches share: the compiled decode step (compiled_decode.py) and the CPU weight
layout (layout_cache.py). Each file is named by a hash of what it was built from (this torch and CPU, the source
of the code that builds it, the model), found again by that name, and aged out least recently used first: a load
refreshes only the file's access time, so its modification time stays the build's and a run that only reads the
cache leaves it as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch


def notice(message: str) -> None:
    print(f"arbor: {message}", file=sys.stderr, flush=True)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine_key() -> dict:
    """This torch and this CPU, as far as generated code or a kernel's packed layout may depend on them."""
    return {"torch": torch.__version__, "machine": platform.machine(), "cpu": torch.backends.cpu.get_cpu_capability(),
            "cpu_flags": hashlib.sha256(_cpu_flags().encode()).hexdigest()[:16]}


def sources_digest(modules) -> str:
    """The source of the modules a build comes from: a change to any of them is a different file."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def mark_used(path: Path) -> None:
    """Least recently used ages out first: the access time says when, the modification time stays the build's."""
    with contextlib.suppress(OSError):
        os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns))


def prune(directory: Path, pattern: str, keep: Path, count: int, companions: tuple[str, ...] = ()) -> None:
    """Delete the files of `pattern` in `directory` (with their `companions`, same stem) beyond the `count` most
    recently used, never `keep`."""
    files = sorted(directory.glob(pattern), key=lambda p: p.stat().st_atime, reverse=True)
    for old in [p for p in files if p != keep][count - 1:]:
        for path in (old, *(old.with_suffix(suffix) for suffix in companions)):
            with contextlib.suppress(OSError):
                path.unlink()
