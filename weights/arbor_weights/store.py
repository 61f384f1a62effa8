"""The model cache on disk, and installing into it so that nothing half-written is ever visible.

    cache_dir()/models/<name>/        installed checkpoints (Arbor or HF layout)
    cache_dir()/models/.tmp-<name>+…  installs in progress (ignored by list_models)
    cache_dir()/downloads/            a registry model's GGUF, from its download until it is imported
                                      (then deleted: the checkpoint holds the same weights)
    cache_dir()/locks/<name>.lock     one per model, held around check-then-install; present only
                                      while held, so a failed install leaves nothing behind

An install builds in a temp dir beside its final place and renames it in: a rename within one
filesystem is atomic, so a crash or Ctrl-C leaves either the old state or the new, never a model
missing half its tensors under a name that `resolve` would trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import platformdirs
from filelock import FileLock, Timeout

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from arbor_core.config import ArborConfig
from arbor_core.errors import ArborError, ModelNotFoundError, UsageError

from .checkpoint import read_provenance
from .progress import Reporter

TEMP_PREFIX = ".tmp-"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def cache_dir() -> Path:
    """Where arbor keeps models: the platform's user cache, or $ARBOR_HOME when set."""
    home = os.environ.get("ARBOR_HOME")
    return Path(home).expanduser() if home else Path(platformdirs.user_cache_dir("arbor"))


def _subdir(name: str) -> Path:
    path = cache_dir() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_dir() -> Path:
    return _subdir("models")


def downloads_dir() -> Path:
    return _subdir("downloads")


def check_model_name(name: str) -> str:
    """Installed names are single path components: no separators, no leading dot, no '..'."""
    if not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise UsageError(f"{name!r} is not a valid model name (letters, digits, '.', '_', '-')")
    return name


def installed_path(name: str) -> Path | None:
    if not NAME_PATTERN.fullmatch(name):
        return None
    path = cache_dir() / "models" / name
    return path if path.is_dir() else None


@contextmanager
def held_lock(name: str, reporter: Reporter | None = None) -> Iterator[None]:
    """An inter-process lock on one name: concurrent pulls of a model wait, then find it installed.

    The lock file exists only while someone holds the lock (see _flock_file), so a failed or
    finished install leaves nothing in locks/."""
    with _lock(name, reporter, wait=True):
        yield


@contextmanager
def lock_if_free(name: str) -> Iterator[bool]:
    """held_lock without the wait: yields True holding the lock, or False at once where another process holds it."""
    with _lock(name, None, wait=False) as held:
        yield held


@contextmanager
def _lock(name: str, reporter: Reporter | None, wait: bool) -> Iterator[bool]:
    path = cache_dir() / "locks" / f"{name}.lock"
    if fcntl is None:  # Windows: filelock's msvcrt lock, which deletes its file on release
        with _portable_lock(path, name, reporter, wait) as held:
            yield held
        return
    fd = _flock_file(path, name, reporter, wait)
    if fd is None:
        yield False
        return
    try:
        yield True
    finally:
        # Unlink before unlocking: a waiter that then gets the lock sees its file gone and retries.
        path.unlink(missing_ok=True)
        os.close(fd)
        with contextlib.suppress(OSError):  # not empty while another name is locked: fine
            path.parent.rmdir()


def _flock_file(path: Path, name: str, reporter: Reporter | None, wait: bool = True) -> int | None:
    """An open descriptor of `path`, flock()ed exclusively, and still the file at `path` (None: another process
    holds it, and not `wait`).

    Holders delete the file before unlocking, so a process that waited on a descriptor of a file
    since deleted (or replaced) has locked nothing anyone else sees: it drops it and tries again."""
    noted = False
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except (FileNotFoundError, FileExistsError):  # locks/ removed by a holder meanwhile: again
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    os.close(fd)
                    return None
                if reporter and not noted:
                    reporter.note(f"waiting for another arbor process that is installing {name}")
                    noted = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            held = os.fstat(fd)
            if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


@contextmanager
def _portable_lock(path: Path, name: str, reporter: Reporter | None, wait: bool = True) -> Iterator[bool]:
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0.5 if wait else 0)
    except Timeout:
        if not wait:
            yield False
            return
        if reporter:
            reporter.note(f"waiting for another arbor process that is installing {name}")
        lock.acquire()
    try:
        yield True
    finally:
        lock.release()


def install(name: str, build: Callable[[Path], None], *, force: bool = False,
            reporter: Reporter | None = None, outdated: Callable[[Path], bool] | None = None) -> Path:
    """Install models/<name> by calling build(temp_dir), unless it is already there (or force, or
    outdated(installed_dir) says an older arbor wrote it).

    The check runs under the name's lock, so of two concurrent callers one builds and the other
    returns the finished directory. Whatever build raises (KeyboardInterrupt too) removes the
    temp dir and leaves any previous install untouched.
    """
    check_model_name(name)
    final = models_dir() / name

    def current() -> bool:
        return final.is_dir() and not force and not (outdated is not None and outdated(final))

    if current():  # installed: no lock needed, renames make it whole or absent
        return final
    with held_lock(name, reporter):
        if current():
            return final
        _remove_stale_temp_dirs(name)
        staging = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{name}+", dir=models_dir()))
        try:
            build(staging)
            _move_into_place(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return final


def _move_into_place(staging: Path, final: Path) -> None:
    if not final.exists():
        os.replace(staging, final)
        return
    # A directory cannot be renamed over a non-empty one: set the old aside, then drop it.
    old = final.with_name(f"{TEMP_PREFIX}{final.name}+old-{uuid.uuid4().hex[:8]}")
    os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def _remove_stale_temp_dirs(name: str) -> None:
    # Called with the name's lock held, so any temp dir of this name is from a killed process.
    for stale in models_dir().glob(f"{TEMP_PREFIX}{name}+*"):
        shutil.rmtree(stale, ignore_errors=True)


def installed_names() -> list[str]:
    root = cache_dir() / "models"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_models() -> list[dict]:
    """One dict per installed model: name, path, size_bytes, parameters, trained_context, source."""
    return [_describe(cache_dir() / "models" / name) for name in installed_names()]


def _describe(path: Path) -> dict:
    try:
        config = ArborConfig.from_json_file(path / "config.json")
        parameters, trained_context = config.num_parameters(), config.trained_context
    except ArborError:  # a damaged install is still listed, so that it can be seen and removed
        parameters = trained_context = None
    return {
        "name": path.name,
        "path": str(path),
        "size_bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
        "parameters": parameters,
        "trained_context": trained_context,
        "source": read_provenance(path).get("source") or f"dir:{path}",
    }


def remove_model(name: str) -> None:
    """Delete an installed model; ModelNotFoundError if there is none by that name."""
    path = installed_path(name)
    if path is None:
        known = ", ".join(installed_names()) or "none"
        raise ModelNotFoundError(f"no installed model named {name!r} (installed: {known})")
    with held_lock(name):
        if not path.is_dir():  # another process removed it while we waited for the lock
            raise ModelNotFoundError(f"no installed model named {name!r}")
        # Rename first so the name disappears at once even if deleting many GB takes a while.
        doomed = path.with_name(f"{TEMP_PREFIX}{name}+removed-{uuid.uuid4().hex[:8]}")
        os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def find_installed(match: Callable[[dict], bool]) -> str | None:
    """The first installed model whose arbor.json satisfies match(record)."""
    for name in installed_names():
        if match(read_provenance(cache_dir() / "models" / name)):
            return name
    return None


def sha256_of_file(path: Path, advance: Callable[[int], None] = lambda n: None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            advance(len(chunk))
    return digest.hexdigest()
