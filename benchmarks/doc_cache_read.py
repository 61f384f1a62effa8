"""What reading one kept document-cache entry costs, and the checksum's share of it (issue 31 item 1).

One entry of about --mb MB (kept form: float16 keys and values for the CPU default's float32 cache) is
written for the model under an empty document cache, then loaded --trials times, warm (its pages in the
page cache, as right after a question) and cold (dropped from the page cache with posix_fadvise first,
as days later), each load split into mapping the file, the checksum over its mapped bytes, and filling
the cache (the backend converting to the cache's dtype). The checksum algorithms hashlib and zlib offer
are timed over the same mapped bytes. Prints one JSON object.

    python benchmarks/doc_cache_read.py --mb 465
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

import arbor_cli
from arbor_cli import doc_cache
from ask_second_question import drop_from_page_cache  # benchmarks/ is the script's own folder


def timed_load(model, key, capacity, path: Path, cold: bool) -> dict:
    if cold:
        drop_from_page_cache(path)
    t0 = time.perf_counter()
    metadata, arrays = doc_cache.read_mapped(path)
    t1 = time.perf_counter()
    ok = metadata["checksum"] == doc_cache.checksum(arrays)
    t2 = time.perf_counter()
    cache = model.import_cache(arrays, capacity)
    t3 = time.perf_counter()
    assert ok and cache.length == key["tokens"]
    del cache, arrays
    if cold:
        drop_from_page_cache(path)
    t4 = time.perf_counter()
    assert doc_cache.load(model, key, capacity) is not None  # the whole of load(), as ask calls it
    t5 = time.perf_counter()
    return {"map_s": round(t1 - t0, 3), "checksum_s": round(t2 - t1, 3), "fill_s": round(t3 - t2, 3),
            "load_s": round(t5 - t4, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=465)
    parser.add_argument("--model", default=None)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    model = arbor_cli.load(args.model, quiet=True)
    c = model.config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 2  # K and V, 16 bits
    tokens = int(args.mb * 1e6 / per_token)
    capacity = -(-tokens // 1024) * 1024
    rng = np.random.default_rng(0)
    shape = (c.num_hidden_layers, c.num_key_value_heads, tokens, c.head_dim)
    arrays = {"k": rng.standard_normal(shape, dtype=np.float32).astype(np.float16),
              "v": rng.standard_normal(shape, dtype=np.float32).astype(np.float16),
              "length": np.array([tokens], dtype=np.int64)}
    cache = model.import_cache(arrays, capacity)
    key = doc_cache.key_for(model, rng.integers(0, c.vocab_size, tokens).tolist(), capacity, model.rope_method)
    with tempfile.TemporaryDirectory() as home:
        doc_cache.directory = lambda: Path(home)
        assert doc_cache.save(model, key, cache, arrays=arrays)
        del cache
        path = Path(home) / f"{doc_cache.entry_name(key)}.safetensors"
        _, mapped = doc_cache.read_mapped(path)
        hashes = {}
        for name, fn in (("sha256", lambda b: hashlib.sha256(b).digest()), ("blake2b", lambda b: hashlib.blake2b(b).digest()),
                         ("md5", lambda b: hashlib.md5(b).digest()), ("crc32", zlib.crc32)):
            t0 = time.perf_counter()
            for a in mapped.values():
                fn(memoryview(a).cast("B"))
            hashes[name] = round(time.perf_counter() - t0, 3)
        del mapped
        warm = [timed_load(model, key, capacity, path, cold=False) for _ in range(args.trials)]
        cold = [timed_load(model, key, capacity, path, cold=True) for _ in range(args.trials)]
        size = path.stat().st_size
    best = {name: {k: min(t[k] for t in runs) for k in runs[0]} for name, runs in (("warm", warm), ("cold", cold))}
    json.dump({"model": model.checkpoint.name, "dtype": model.dtype, "entry_bytes": size, "tokens": tokens,
               "checksum": doc_cache.CHECKSUM, "hash_s_warm": hashes, "best": best, "warm": warm, "cold": cold,
               "uptime": os.getloadavg()}, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
