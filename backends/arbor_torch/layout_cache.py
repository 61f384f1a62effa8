"""The int4-mode model of a GGUF-block checkpoint, built once per machine and kept in arbor's cache.

Building it (load_quantized.load_int4) packs every 4-bit layer into the CPU int4 kernel's layout and
re-fits every 8-bit one as int8 rows: ~10-20 s for 1.5 B weights on 2 cores, in every process. What it
builds depends only on the checkpoint, torch and this CPU, so the result is written once, as safetensors,
and later processes read it memory-mapped: no copy, no work, and the pages are the OS's file cache, shared
between processes and never counted twice. Nothing is pickled: the file holds tensors, and a JSON record
(the safetensors metadata) says which module each tensor belongs to.

The file's name is a hash of everything the built tensors depend on (layout_key): torch's version and this
CPU (the kernel's packed layout may differ), the checkpoint's identity (its path, each weight file's size and
modification time, config.json's and arbor.json's contents: re-importing a model is a new file), the dtype,
and the source of the code that builds the layout. Anything else is another file, so a stale layout is
never read; it ages out (the least recently used beyond KEEP are deleted). A file is written whole or not at
all (a temp file renamed in, under a lock, so two processes build it once); one that cannot be read back as
it was written is deleted and rebuilt with one line on stderr. ARBOR_LAYOUT_CACHE=0 builds every time, and
ARBOR_LAYOUT_DIR moves the files elsewhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from arbor_core.number_input import env_switch

from arbor_weights import quantized

from . import integer_kernels, load_quantized, quantize
from .integer_kernels import Q4KLinear, Q5Linear, Q6KLinear, Q8Linear
from .machine_cache import key_digest, machine_key, mark_used, notice, prune, sources_digest
from .quantize import Int4Linear, Int8Embedding, Int8Linear, StackedLinear

ENV = "ARBOR_LAYOUT_CACHE"
DIR_ENV = "ARBOR_LAYOUT_DIR"
KEEP = 4  # layouts kept, least recently used deleted first: each is about its model's size (1.36 GB for 1.5 B)
RECORD = "arbor_layout"  # the safetensors metadata entry holding the record
# the integer kernels' layers (integer_kernels.py): record type, and (inputs a block, bytes a block of 16 rows)
PACKED_TYPES = {kind.KIND: kind for kind in (Q4KLinear, Q6KLinear, Q8Linear, Q5Linear)}
PACKED = tuple(PACKED_TYPES.values())
PACKED_SHAPES = {"q4k": (integer_kernels.SUPER, integer_kernels.SUPER_BYTES),
                 "q6k": (integer_kernels.SUPER, integer_kernels.Q6K_SUPER_BYTES), "q8": (32, integer_kernels.Q8_BLOCK_BYTES),
                 "q5": (32, integer_kernels.Q5_BLOCK_BYTES)}
SLOT_TYPES = (StackedLinear, Int4Linear, Int8Linear, Int8Embedding, *PACKED)
# Every tensor's data starts on a multiple of this in the file, so in the mapped memory too: PyTorch's CPU int8
# kernel crashes (SIGSEGV, torch 2.13) on a bfloat16 scale that is not 64-byte aligned with 60 rows of input,
# and safetensors.torch.save_file packs tensors back to back. Gaps are filled by tensors named PAD + n.
ALIGN = 64
PAD = "__pad__."
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int8: "I8",
                      torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64"}


def enabled() -> bool:
    return env_switch(ENV, True)


def cache_directory() -> Path:
    """$ARBOR_LAYOUT_DIR, or `layouts/` in arbor's cache (the models' home: $ARBOR_HOME or the platform's)."""
    from arbor_weights.store import cache_dir

    path = Path(os.environ.get(DIR_ENV) or cache_dir() / "layouts").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sources() -> str:
    """The code that decides the layout: a change to it is a different file."""
    return sources_digest((load_quantized, quantize, quantized, integer_kernels, sys.modules[__name__]))


def _file_digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def layout_key(checkpoint, dtype: torch.dtype) -> dict:
    """What the built tensors depend on (the file's name is its hash). The weights are identified by path,
    size and modification time, not hashed: reading 1 GB to start would cost what the cache saves."""
    files = []
    for path in checkpoint.weight_files:
        st = path.stat()
        files.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
    choices = {"four_bit": load_quantized.FOUR_BIT_FORMAT, "eight_bit": load_quantized.EIGHT_BIT_FORMAT,
               "head": quantize.HEAD_MODE["int4"],
               "int4_group": quantize.INT4_GROUP,
               "integer": integer_kernels.available()}  # Q4_K as Q4KLinear, or Int4Linear where the kernels don't build  # the formats load_int4 picks (settings, not only source)
    return {**machine_key(), "sources": _sources(), "choices": choices, "dtype": str(dtype), "weights": files,
            "config": _file_digest(checkpoint.path / "config.json"),
            "provenance": _file_digest(checkpoint.path / "arbor.json")}


def int4_model(model: nn.Module, checkpoint, dtype: torch.dtype, read_state: Callable[[], dict]) -> nn.Module | None:
    """`model` (on the meta device) filled as load_int4 fills it, from the cached layout when there is one,
    else built from `read_state()` and cached. None when the state holds no GGUF blocks (nothing to cache).
    The model returned may be a fresh one when a damaged file had already been partly read into `model`."""
    if not enabled() or not checkpoint.quantization:  # off, or no record of kept blocks: nothing worth a file
        return _build(model, read_state(), dtype, checkpoint)
    try:
        key = layout_key(checkpoint, dtype)
        path = cache_directory() / f"layout-{key_digest(key)}.safetensors"
    except OSError as e:  # an unreadable weight file is the loader's to report; an unwritable cache costs a line
        notice(f"not keeping the model's CPU layout ({type(e).__name__}: {str(e).strip()[:160]})")
        return _build(model, read_state(), dtype, checkpoint)
    if _restore(model, path, key):
        return model
    with _held_lock(path.stem):  # two processes: one builds, the other then reads it
        if path.exists():  # written meanwhile by another process
            model = _meta_copy(model)  # (a damaged file may have filled part of the first one)
            if _restore(model, path, key):
                return model
        built = _build(_meta_copy(model), read_state(), dtype, checkpoint)
        if built is not None:
            _store(built, _meta_copy(model), path, key)
    return built


@contextlib.contextmanager
def _held_lock(name: str):
    """arbor_weights.store.held_lock, or none where it cannot be taken (a read-only cache: then two processes
    may both build, and the last rename wins; each file is whole)."""
    from arbor_weights.store import held_lock

    with contextlib.ExitStack() as stack:
        with contextlib.suppress(OSError):
            stack.enter_context(held_lock(name))
        yield


def _build(model: nn.Module, state: dict, dtype: torch.dtype, checkpoint) -> nn.Module | None:
    if not load_quantized.has_blocks(state):
        return None
    with quantize.one_thread():
        load_quantized.load_int4(model, state, dtype, checkpoint.path)
    return model


def _meta_copy(model: nn.Module) -> nn.Module:
    """Another unfilled model of the same config (meta tensors: no memory, ~40 ms for 28 layers)."""
    with torch.device("meta"):
        return type(model)(model.config)


def _slots(model: nn.Module) -> dict[str, nn.Module]:
    """The quantized modules load_int4 put in place, by name (not those inside them)."""
    slots: dict[str, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):  # a tied head: its own name and the embedding's
        if isinstance(module, SLOT_TYPES) and not any(name.startswith(f"{s}.") for s in slots):
            slots[name] = module
    return slots


def _describe(module: nn.Module, prefix: str, tensors: dict, shared: dict[int, str]) -> dict:
    """A module's record; its tensors go into `tensors` under `prefix`."""
    if isinstance(module, StackedLinear):
        return {"type": "stacked", "parts": [_describe(p, f"{prefix}.parts.{i}", tensors, shared)
                                             for i, p in enumerate(module.parts)]}
    if isinstance(module, Int8Embedding):
        codes = shared.get(id(module.codes)) or _describe(module.codes, f"{prefix}.codes", tensors, shared)
        return {"type": "embedding", "dtype": str(module.dtype).removeprefix("torch."), "codes": codes}
    if not isinstance(module, (Int4Linear, Int8Linear, *PACKED)):
        raise TypeError(f"no layout record for a {type(module).__name__}")
    for name, t in [*module.named_buffers(recurse=False), *module.named_parameters(recurse=False)]:
        tensors[f"{prefix}.{name}"] = t.detach().contiguous()
    spec = {"type": "int8", "in": module.in_features, "out": module.out_features, "bias": module.bias is not None}
    if isinstance(module, PACKED):
        return {**spec, "type": module.KIND}
    if isinstance(module, Int8Linear):
        spec["integer"] = module.integer
    return {**spec, "type": "int4", "group": module.group_size} if isinstance(module, Int4Linear) else spec


def _store(model: nn.Module, unfilled: nn.Module, path: Path, key: dict) -> None:
    """Write `model`'s layout to `path`, whole or not at all; a failure costs one line, never the run."""
    slots = _slots(model)
    before, after = dict(unfilled.named_modules()), dict(model.named_modules())
    removed = [n for n in before if n not in after and n.rpartition(".")[0] in after]  # topmost gone ones only
    tensors: dict[str, torch.Tensor] = {}
    shared = {id(m): name for name, m in slots.items() if not isinstance(m, Int8Embedding)}
    partial = path.with_name(f".{path.stem}.{os.getpid()}.partial")
    try:
        records = {name: _describe(m, name, tensors, shared) for name, m in slots.items()}
        state = model.state_dict()
        plain = [n for n in state if not any(n.startswith(f"{s}.") for s in slots)]  # the norms
        tensors.update({name: state[name].contiguous() for name in plain})
        record = {"key": key, "slots": records, "removed": removed, "plain": plain}
        save_aligned(tensors, partial, {RECORD: json.dumps(record)})
        os.replace(partial, path)
    except Exception as e:  # noqa: BLE001 - a full disk, a read-only cache, a module with no record
        notice(f"could not keep the model's CPU layout ({type(e).__name__}: {str(e).strip()[:160]}); "
               "the next run builds it again")
        return
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    prune(path.parent, "layout-*.safetensors", path, KEEP)


def save_aligned(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """A safetensors file (the format safetensors' own reader checks and maps) whose tensors each start on an
    ALIGN boundary: the header padded with spaces, as the format allows, and each gap a uint8 tensor."""
    header, layout, offset = {}, [], 0
    for name, t in tensors.items():
        if offset % ALIGN:
            gap = ALIGN - offset % ALIGN
            header[f"{PAD}{len(layout)}"] = {"dtype": "U8", "shape": [gap], "data_offsets": [offset, offset + gap]}
            layout.append(torch.zeros(gap, dtype=torch.uint8))
            offset += gap
        size = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        layout.append(t)
        offset += size
    text = json.dumps({"__metadata__": metadata, **header}).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for t in layout:
            f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())  # renamed in only once it is on disk: a crash leaves no half-written layout


def _restore(model: nn.Module, path: Path, key: dict) -> bool:
    """Fill `model` from the file at `path`; False when there is none or it is damaged (then deleted)."""
    if not path.exists():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            record = json.loads((f.metadata() or {})[RECORD])
        if record["key"] != key:
            raise ValueError("it was made for another checkpoint, torch or CPU")
        tensors = load_file(str(path))  # memory-mapped: nothing is read until the model runs
        if any(t.data_ptr() % ALIGN for name, t in tensors.items() if t.numel() and not name.startswith(PAD)):
            raise ValueError(f"its tensors are not {ALIGN}-byte aligned")
        _fill(model, record, tensors)
    except Exception as e:  # noqa: BLE001 - truncated, foreign, or not what its record says
        notice(f"the cached CPU layout {path.name} is damaged ({type(e).__name__}: {str(e).strip()[:160]}); "
               "rebuilding it")
        with contextlib.suppress(OSError):
            path.unlink()
        return False
    mark_used(path)
    return True


def _fill(model: nn.Module, record: dict, tensors: dict[str, torch.Tensor]) -> None:
    for name in record["removed"]:
        parent, _, leaf = name.rpartition(".")
        delattr(model.get_submodule(parent), leaf)
    built: dict[str, nn.Module] = {}
    slots = record["slots"]
    for name in sorted(slots, key=lambda n: slots[n]["type"] == "embedding"):  # a shared head before the embedding
        built[name] = _rebuild(slots[name], name, tensors, built)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, built[name])
    model.load_state_dict({n: tensors[n] for n in record["plain"]}, strict=False, assign=True)
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        raise ValueError("it leaves part of the model unset")


def _rebuild(spec: dict, prefix: str, tensors: dict[str, torch.Tensor], built: dict[str, nn.Module]) -> nn.Module:
    kind = spec["type"]
    if kind == "stacked":
        return StackedLinear([_rebuild(p, f"{prefix}.parts.{i}", tensors, built) for i, p in enumerate(spec["parts"])])
    if kind == "embedding":
        codes = spec["codes"]
        codes = built[codes] if isinstance(codes, str) else _rebuild(codes, f"{prefix}.codes", tensors, built)
        return Int8Embedding(codes, getattr(torch, spec["dtype"]))
    bias = nn.Parameter(tensors[f"{prefix}.bias"], requires_grad=False) if spec["bias"] else None
    out, inp = spec["out"], spec["in"]
    if kind == "int8":
        q, scale = tensors[f"{prefix}.qweight"], tensors[f"{prefix}.scale"]
        _expect(q, (out, inp), torch.int8, prefix)
        _expect(scale, (out,), quantize.ACT_DTYPE, prefix)
        linear = quantize.int8_linear_from_codes(q, scale, bias)
        linear.integer = bool(spec.get("integer"))
        return linear
    if kind in PACKED_TYPES:
        packed = tensors[f"{prefix}.packed"]
        block, size = PACKED_SHAPES[kind]
        _expect(packed, (-(-out // integer_kernels.ROWS), inp // block, size), torch.uint8, prefix)
        return PACKED_TYPES[kind](packed, out, bias)
    packed, scale_zero = tensors[f"{prefix}.qweight"], tensors[f"{prefix}.scale_zero"]
    _expect(scale_zero, (inp // spec["group"], out, 2), quantize.ACT_DTYPE, prefix)
    _expect(packed, (out, inp // 2), torch.uint8, prefix)
    return quantize.int4_linear_from_packed(packed, scale_zero, inp, bias)


def _expect(t: torch.Tensor, shape: tuple, dtype: torch.dtype, where: str) -> None:
    if tuple(t.shape) != shape or t.dtype != dtype:
        raise ValueError(f"{where} holds {t.dtype} {tuple(t.shape)}, not {dtype} {shape}")
