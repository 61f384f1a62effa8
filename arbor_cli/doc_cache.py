"""A document's KV cache kept on disk, so a second question about it prefills only the question.

One entry is one safetensors file under `<arbor cache dir>/doc-cache/`: the arrays of
`LoadedModel.export_cache` and, as metadata, the key it was made for (every field as a JSON string).
The key names everything the cached keys and values depend on — model weights and config, tokenizer,
the document's token ids, context, the RoPE actually used, kv_bits, backend, device, dtype and weight
quantization — and `load` checks it field by field, so a stale, foreign or damaged file is rebuilt
with a notice, never trusted. Files are written to a temporary name and renamed (an interrupted write
leaves no entry); the directory is kept under ARBOR_DOC_CACHE_MB by evicting the least recently used.
Keeping a cache is an optimisation: a failure to write one is a warning, never an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import uuid
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from .extract import EXTRACTOR_VERSION

FORMAT_VERSION = 1
SUFFIX = ".safetensors"
TEMP_PREFIX = ".tmp-"
DEFAULT_CAP_MB = 2048
STALE_TEMP_S = 3600  # a temp file this old was left by a killed process, not one still writing
# files that decide how text becomes ids (the ids themselves are in the key; these make "same ids" mean "same text")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
TOKENIZER_PROBE = "The quick brown fox: 12,345 naïve cafés — ünïcödé\n\tend."


def directory() -> Path:
    from arbor_weights.store import cache_dir

    return cache_dir() / "doc-cache"


def cap_bytes() -> int:
    """ARBOR_DOC_CACHE_MB (default 2048) in bytes; an unreadable value is the default."""
    try:
        mb = float(os.environ.get("ARBOR_DOC_CACHE_MB", DEFAULT_CAP_MB))
    except ValueError:
        mb = DEFAULT_CAP_MB
    return int(max(mb, 0) * 1e6)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _model_sha256(checkpoint) -> str | None:
    from arbor_weights.checkpoint import read_provenance

    return read_provenance(Path(checkpoint.path)).get("sha256")


def _tokenizer_identity(model) -> str:
    """A hash of the checkpoint's tokenizer files, or (none there) of a few encodes by the tokenizer."""
    h = hashlib.sha256()
    found = False
    for name in TOKENIZER_FILES:
        path = Path(model.checkpoint.path) / name
        if path.is_file():
            h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
            found = True
    if not found:
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None:
            return "none"
        for add in (False, True):
            h.update(json.dumps(tokenizer.encode(TOKENIZER_PROBE, add_special_tokens=add)).encode())
    return h.hexdigest()


def document_sha256(doc_ids: list[int]) -> str:
    return _sha256(np.asarray(doc_ids, dtype=np.int64).tobytes())


_IDENTITIES: "weakref.WeakKeyDictionary[Any, dict[str, Any]]" = weakref.WeakKeyDictionary()


def _identity(model) -> dict[str, Any]:
    """What a model's caches depend on besides the document and context, worked out once per model
    (hashing the tokenizer files each time cost a question about a 128-part document 128 hashes)."""
    if model not in _IDENTITIES:
        config = json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode()
        _IDENTITIES[model] = {"model": str(model.checkpoint.name), "model_sha256": _model_sha256(model.checkpoint),
                              "config_sha256": _sha256(config), "tokenizer_sha256": _tokenizer_identity(model),
                              **model.runtime()}  # kv_bits, backend, device, dtype, quantize
    return _IDENTITIES[model]


def key_for(model, doc_ids: list[int], context: int, rope_method: str) -> dict[str, Any]:
    """Everything the document's cache depends on (JSON values); equal keys mean an interchangeable cache.
    The extractor's version is in it too: the ids are of the text a PDF, Word or HTML file gave, and a
    reader that gives better text must never meet a cache of the old text (extract.EXTRACTOR_VERSION)."""
    identity = _identity(model)
    return {
        "format": FORMAT_VERSION,
        "extractor": EXTRACTOR_VERSION,
        **{k: identity[k] for k in ("model", "model_sha256", "config_sha256", "tokenizer_sha256")},
        "document_sha256": document_sha256(doc_ids),
        "tokens": len(doc_ids),
        "context": int(context),
        "rope_method": rope_method,
        "rope_scaling": model.rope_scaling_for(context, rope_method),
        **{k: v for k, v in identity.items() if k not in ("model", "model_sha256", "config_sha256", "tokenizer_sha256")},
    }


def entry_name(key: dict[str, Any]) -> str:
    return _sha256(json.dumps(key, sort_keys=True).encode())[:16]


def _metadata(key: dict[str, Any]) -> dict[str, str]:
    return {"format_version": str(FORMAT_VERSION), **{k: json.dumps(v, sort_keys=True) for k, v in key.items()}}


def _key_of(metadata: dict[str, str] | None) -> dict[str, Any] | None:
    """The key a file's metadata records; None when it is not a doc-cache entry of this format."""
    if not metadata or metadata.get("format_version") != str(FORMAT_VERSION):
        return None
    try:
        return {k: json.loads(v) for k, v in metadata.items() if k != "format_version"}
    except ValueError:
        return None


def _warn(message: str) -> None:
    try:
        print(f"arbor: {message}", file=sys.stderr)
    except (OSError, ValueError):  # a closed stderr must not turn a kept-or-not cache into an error
        pass


def save(model, key: dict[str, Any], cache, in_use: frozenset[str] | set[str] = frozenset()) -> bool:
    """Keep `cache` (the document's prefill) under `key`; False, with one warning line, when it cannot be.

    Written to a temporary file in the same directory and renamed into place, so an interrupted
    write (Ctrl-C included: it is re-raised) leaves no entry; then older entries are evicted, never this
    one nor those named in `in_use` (the other parts of the document being read: evicting its first part
    to keep its last would make every question about a document near the cap prefill it all again).
    `cache` must hold exactly the key's document (ValueError otherwise: a caller's mistake, not the disk's).
    """
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    if cache.length != key["tokens"] or cache.capacity != key["context"]:
        raise ValueError(f"the cache holds {cache.length} of {cache.capacity} positions; the key is for "
                         f"{key['tokens']} of {key['context']}")
    name = entry_name(key)
    temp = None
    try:
        arrays = model.export_cache(cache)
        folder = directory()
        folder.mkdir(parents=True, exist_ok=True)
        temp = folder / f"{TEMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}{SUFFIX}"
        save_file(arrays, str(temp), metadata=_metadata(key))
        os.replace(temp, folder / f"{name}{SUFFIX}")
        temp = None
    except NotImplementedError as e:  # a ring cache (sliding-window model)
        _warn(f"could not keep the document's cache ({e}); the next question prefills it again")
        return False
    except (OSError, SafetensorError) as e:  # safetensors reports its I/O errors (a full disk) as SafetensorError
        _warn(f"could not keep the document's cache ({_describe(e)}); the next question prefills it again")
        return False
    finally:
        if temp is not None:
            _unlink(temp)
    evict(keep={name, *in_use})
    return True


def load(model, key: dict[str, Any], capacity: int, rope: str | None = None):
    """The cache kept under `key`, as a new cache of `capacity` tokens (`rope`: the RoPE method, as for
    Model.new_cache); None when there is none. A file made for another key, or one that cannot be read,
    is deleted with a one-line notice (the caller prefills again)."""
    from safetensors import SafetensorError, safe_open

    path = directory() / f"{entry_name(key)}{SUFFIX}"
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="np") as f:
            found = _key_of(f.metadata())
            if found != key:
                _warn(f"the kept document cache {path.name} was made for another model/document; rebuilding")
                _unlink(path)
                return None
            arrays = {k: f.get_tensor(k) for k in f.keys()}
        cache = model.import_cache(arrays, capacity, rope)
    except NotImplementedError:
        return None
    except (SafetensorError, OSError, ValueError) as e:
        _warn(f"the kept document cache {path.name} is unreadable ({_describe(e)}); rebuilding")
        _unlink(path)
        return None
    _touch(path)
    return cache


def _describe(e: BaseException) -> str:
    text = (e.strerror if isinstance(e, OSError) and e.strerror else str(e)).splitlines()
    line = text[0] if text else type(e).__name__
    # safetensors: "Error while serializing: I/O error: No space left on device (os error 28) at path ..."
    line = line.removeprefix("Error while serializing: ").removeprefix("I/O error: ").split(" at path ")[0]
    return line[:160]


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False
    except OSError:
        return False


def _touch(path: Path) -> None:
    """Mark an entry used now: eviction goes by modification time (atime is often not kept)."""
    try:
        os.utime(path)
    except OSError:
        pass


def _files() -> list[Path]:
    try:
        return [p for p in directory().iterdir() if p.suffix == SUFFIX and p.is_file()]
    except OSError:
        return []


def evict(keep: set[str] | frozenset[str] = frozenset(), cap: int | None = None) -> list[str]:
    """Delete least recently used entries (never those named in `keep`) until the directory is within `cap`
    bytes (default: cap_bytes()); also temp files a killed process left. The names deleted."""
    cap = cap_bytes() if cap is None else cap
    now, held = time.time(), []
    for path in _files():
        try:
            stat = path.stat()
        except OSError:
            continue
        if path.name.startswith(TEMP_PREFIX):
            if now - stat.st_mtime > STALE_TEMP_S:
                _unlink(path)
            continue
        held.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in held)
    deleted = []
    for _, size, path in sorted(held, key=lambda row: row[0]):
        if total <= cap:
            break
        if path.stem in keep:
            continue
        if _unlink(path):
            deleted.append(path.stem)
        total -= size
    return deleted


def entries() -> list[dict[str, Any]]:
    """The kept caches, most recently used first: name, document (sha256 prefix), model, tokens,
    context, kv_bits, backend, bytes, last_used (UTC)."""
    from safetensors import SafetensorError, safe_open

    rows = []
    for path in _files():
        if path.name.startswith(TEMP_PREFIX):
            continue
        try:
            stat = path.stat()
        except OSError:
            continue
        try:
            with safe_open(str(path), framework="np") as f:
                key = _key_of(f.metadata()) or {}
        except (SafetensorError, OSError, ValueError):  # listed as "?": load() will find it unreadable
            key = {}
        rows.append({
            "name": path.stem, "document": str(key.get("document_sha256") or "?")[:12],
            "model": key.get("model", "?"), "tokens": key.get("tokens"), "context": key.get("context"),
            "kv_bits": key.get("kv_bits"), "backend": key.get("backend"), "bytes": stat.st_size,
            "last_used": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stat.st_mtime)),
            "_mtime": stat.st_mtime,
        })
    rows.sort(key=lambda r: r.pop("_mtime"), reverse=True)
    return rows


def remove(name: str) -> bool:
    """Delete the entry `name` (as entries() lists it); False when there is none."""
    if not name or "/" in name or os.sep in name or name.startswith("."):
        return False
    return _unlink(directory() / f"{name}{SUFFIX}")


def clear() -> int:
    """Delete every entry (and leftover temp files); how many entries went."""
    removed = 0
    for path in _files():
        gone = _unlink(path)
        removed += gone and not path.name.startswith(TEMP_PREFIX)
    return removed
