"""A document's KV cache kept on disk, so a second question about it prefills only the question.

One entry is one safetensors file under `<arbor cache dir>/doc-cache/`: the arrays of
`LoadedModel.export_cache` in their kept form (`kept`: a float32 cache's keys and values in 16 bits,
float16; 16-bit and int8 caches as they are) and, as metadata, the key it was made for (every field as a
JSON string) and a checksum of the arrays. The key names everything the cached keys and values depend
on — model weights and config, tokenizer, the document's token ids, context, the RoPE actually used,
kv_bits, backend, device, dtype and weight quantization — and `load` checks it field by field, then the
checksum over the file's memory-mapped bytes, so a stale, foreign, older-format or damaged file is
deleted and rebuilt with a notice, never trusted. The arrays are read mapped, not copied: the backend
converts them into the new cache as it fills it.

A document read here is always held in the kept form (`as_kept`), kept on disk or not: the first
question, every later one and --no-cache answer from the same numbers (16 bits move a greedy reply of
the CPU default where two tokens tie; docs/long-context.md, "The document's KV on disk in 16 bits").

Files are written to a temporary name and renamed (an interrupted write leaves no entry); the directory
is kept under ARBOR_DOC_CACHE_MB by evicting the least recently used. Keeping a cache is an
optimisation: a failure to write one is a warning, never an error.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import sys
import time
import uuid
import weakref
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from arbor_core.number_input import env_number

from .extract import EXTRACTOR_VERSION

# 2: keys and values of a float32 cache kept in float16, and a checksum of the arrays (1: float32, none)
FORMAT_VERSION = 2
# entry names hash the key with this format, whatever FORMAT_VERSION is: a newer arbor finds an older entry of
# the same document under its name, and says it rebuilds it, instead of leaving it to age out unseen
NAME_FORMAT = 1
# against damage (a disk, a cut copy, a stray write), not a signature (the key is checked before it): zlib's CRC-32
# reads a mapped entry at 4.1 GB/s here, sha256 at 1.8 (with SHA-NI), blake2b 0.9 (benchmarks/doc_cache_read.py)
CHECKSUM = "crc32"
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
    """ARBOR_DOC_CACHE_MB (default 2048; 0 keeps nothing) in bytes; any other value is a UsageError."""
    return int(env_number("ARBOR_DOC_CACHE_MB", DEFAULT_CAP_MB) * 1e6)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _model_sha256(checkpoint) -> str | None:
    from arbor_weights.checkpoint import read_provenance

    return read_provenance(Path(checkpoint.path)).get("sha256")


def _tokenizer_identity(model) -> str:
    """A hash of the checkpoint's tokenizer files, or (none there, or no checkpoint) of a few encodes by the
    tokenizer."""
    h = hashlib.sha256()
    found = False
    checkpoint = getattr(model, "checkpoint", None)
    for name in TOKENIZER_FILES if checkpoint is not None else ():
        path = Path(checkpoint.path) / name
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
_TOKENIZERS: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()


def tokenizer_identity(model) -> str:
    """_tokenizer_identity, worked out once per model (the KV cache's key and document_index.py's both use it)."""
    if model not in _TOKENIZERS:
        _TOKENIZERS[model] = _tokenizer_identity(model)
    return _TOKENIZERS[model]


def _identity(model) -> dict[str, Any]:
    """What a model's caches depend on besides the document and context, worked out once per model
    (hashing the tokenizer files each time cost a question about a 128-part document 128 hashes)."""
    if model not in _IDENTITIES:
        config = json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode()
        _IDENTITIES[model] = {"model": str(model.checkpoint.name), "model_sha256": _model_sha256(model.checkpoint),
                              "config_sha256": _sha256(config), "tokenizer_sha256": tokenizer_identity(model),
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
    return _sha256(json.dumps({**key, "format": NAME_FORMAT}, sort_keys=True).encode())[:16]


def _metadata(key: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, str]:
    return {"format_version": str(FORMAT_VERSION), "checksum": checksum(arrays),
            **{k: json.dumps(v, sort_keys=True) for k, v in key.items()}}


def _key_of(metadata: dict[str, str] | None) -> dict[str, Any] | None:
    """The key a file's metadata records; None when it is not a doc-cache entry of this format."""
    if not metadata or metadata.get("format_version") != str(FORMAT_VERSION):
        return None
    try:
        return {k: json.loads(v) for k, v in metadata.items() if k not in ("format_version", "checksum")}
    except ValueError:
        return None


def checksum(arrays: dict[str, np.ndarray]) -> str:
    """CHECKSUM over the arrays' names, dtypes, shapes and bytes, in name order (read where they lie: a
    mapped file's pages are read once, by the checksum, and not copied)."""
    crc = 0
    for name in sorted(arrays):
        a = arrays[name]
        crc = zlib.crc32(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode(), crc)
        crc = zlib.crc32(memoryview(np.ascontiguousarray(a)).cast("B"), crc)
    return f"{CHECKSUM}:{crc:08x}"


def kept(model, cache) -> tuple[dict[str, np.ndarray], bool]:
    """export_cache's arrays of `cache` as an entry keeps them, and whether that narrowed them: a float32
    cache's keys and values in KEPT_FLOAT (float16; left float32 where a value is beyond its range), the
    rest as exported (16-bit and int8 caches are compact already). NotImplementedError for a ring cache."""
    from arbor_core.backend import KEPT_FLOAT

    arrays, narrowed = model.export_cache(cache), False
    for name in ("k", "v"):
        a = arrays[name]
        if a.dtype == np.float32:
            with np.errstate(over="ignore"):
                narrow = a.astype(KEPT_FLOAT)
            if not np.isinf(narrow).any():  # beyond float16's 65504: kept as it is (never met on the models here)
                arrays[name], narrowed = narrow, True
    return arrays, narrowed


def narrows(model) -> bool:
    """Whether keeping changes what `model`'s caches hold: a float32 cache's keys and values go to 16 bits."""
    return getattr(getattr(model, "lm", None), "kv_element_bytes", None) == 4


def kept_bytes_per_token(model) -> int | None:
    """Bytes one position takes in an entry (what the cap is checked against): the cache's own, but a float32
    cache's keys and values in 16 bits. None for a door that keeps no cache here (an engine)."""
    per_token = model.kv_bytes_per_token()
    if per_token is not None and narrows(model):
        return model.config.kv_bytes_per_token(2)
    return per_token


def as_kept(model, cache, rope: str | None = None):
    """(the cache to read a document from, its kept arrays): where keeping narrows `cache` (float32), a new
    cache holding the kept arrays, so the first question reads the numbers every later one loads; else
    `cache` itself. (cache, None) for a ring cache, which is not kept."""
    try:
        arrays, narrowed = kept(model, cache)
    except NotImplementedError:
        return cache, None
    return (model.import_cache(arrays, cache.capacity, rope) if narrowed else cache), arrays


def _warn(message: str) -> None:
    try:
        print(f"arbor: {message}", file=sys.stderr)
    except (OSError, ValueError):  # a closed stderr must not turn a kept-or-not cache into an error
        pass


def save(model, key: dict[str, Any], cache, in_use: frozenset[str] | set[str] = frozenset(),
         arrays: dict[str, np.ndarray] | None = None) -> bool:
    """Keep `cache` (the document's prefill) under `key`; False, with one warning line, when it cannot be.
    `arrays`: its kept form where the caller has it already (as_kept), else made here (`kept`).

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
        arrays = kept(model, cache)[0] if arrays is None else arrays
        folder = directory()
        folder.mkdir(parents=True, exist_ok=True)
        temp = folder / f"{TEMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}{SUFFIX}"
        save_file(arrays, str(temp), metadata=_metadata(key, arrays))
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


def entry_bytes(key: dict[str, Any]) -> int:
    """The size on disk of the entry kept under `key` (0 when there is none)."""
    try:
        return (directory() / f"{entry_name(key)}{SUFFIX}").stat().st_size
    except OSError:
        return 0


def load(model, key: dict[str, Any], capacity: int, rope: str | None = None):
    """The cache kept under `key`, as a new cache of `capacity` tokens (`rope`: the RoPE method, as for
    Model.new_cache); None when there is none. A file made for another key or by another format, one whose
    checksum does not match its arrays, or one that cannot be read is deleted with a one-line notice (the
    caller prefills again). The arrays are read memory-mapped: checksummed and copied into the cache from the
    file's pages, never read into memory of their own."""
    path = directory() / f"{entry_name(key)}{SUFFIX}"
    if not path.is_file():
        return None
    try:
        metadata, arrays = read_mapped(path)
        problem = _problem(metadata, arrays, key)
        if problem:
            _warn(f"the kept document cache {path.name} {problem}; rebuilding")
            _unlink(path)
            return None
        cache = model.import_cache(arrays, capacity, rope)
    except NotImplementedError:
        return None
    except (OSError, ValueError) as e:
        _warn(f"the kept document cache {path.name} is unreadable ({_describe(e)}); rebuilding")
        _unlink(path)
        return None
    _touch(path)
    return cache


def _problem(metadata: dict[str, str], arrays: dict[str, np.ndarray], key: dict[str, Any]) -> str | None:
    """Why an entry's file must not be used for `key`, in words; None when it may."""
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        return f"was written by another version of arbor (format {version}, this one reads {FORMAT_VERSION})"
    if _key_of(metadata) != key:
        return "was made for another model/document"
    if metadata.get("checksum") != checksum(arrays):
        return "is damaged (its checksum does not match)"
    return None


# safetensors' dtype names -> numpy, for the arrays an entry holds
DTYPES = {"F32": np.float32, "F16": np.float16, "U16": np.uint16, "I8": np.int8, "I64": np.int64}


def read_mapped(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """A safetensors file's metadata and its arrays as read-only views of the file mapped into memory
    (safetensors' numpy reader copies every tensor). The format is safetensors' own (8 bytes of header
    length, the JSON header, the data); anything else in it is ValueError."""
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # ValueError for an empty file
    size = int.from_bytes(mapped[:8], "little")
    if len(mapped) < 8 or not 2 <= size <= min(len(mapped) - 8, 100_000_000):
        raise ValueError("not a safetensors file (its header length is wrong)")
    header = json.loads(mapped[8:8 + size])  # bytes that are no JSON: ValueError
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file (its header is no object)")
    metadata = header.pop("__metadata__", None) or {}
    base, arrays = 8 + size, {}
    for name, info in header.items():
        try:
            dtype = np.dtype(DTYPES[info["dtype"]])
            shape = tuple(int(n) for n in info["shape"])
            begin, end = (int(n) for n in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"the tensor {name!r} is not described as this cache's arrays are") from None
        count = int(np.prod(shape, dtype=np.int64))
        if begin < 0 or end - begin != count * dtype.itemsize or base + end > len(mapped):
            raise ValueError(f"the tensor {name!r} lies outside the file")
        arrays[name] = np.frombuffer(mapped, dtype=dtype, count=count, offset=base + begin).reshape(shape)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("not a safetensors file (its metadata are not strings)")
    return metadata, arrays


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
    rows = []
    for path in _files():
        if path.name.startswith(TEMP_PREFIX):
            continue
        try:
            stat = path.stat()
        except OSError:
            continue
        try:
            key = _key_of(read_mapped(path)[0]) or {}  # the header alone is read
        except (OSError, ValueError):  # listed as "?": load() will find it unreadable
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
