"""arbor's own CPU integer kernels (integer_kernels.cpp), built once per machine, and the Q4_K layer that uses them.

Why: PyTorch's CPU int4 kernel is bound by unpacking, not by memory (a 1536x8960 matvec at ~19 GB/s on a Zen 4),
while a Q4_K x int8 integer dot product (what llama.cpp runs) streams the weights at the memory's speed. The
kernels quantize the activations to int8 per 32 inputs once per call and take exact int32 dot products of the
codes (AVX512-VNNI, AVX2 or plain C++, chosen at run time), scaled in float32:
- torch.ops.arbor.q4k_mm(x, packed, n): GGUF Q4_K's own numbers, w = d * sc * q - dmin * m, with 16 output rows
  interleaved (pack_q4k): nothing is re-fitted, the weights are the file's exactly;
- torch.ops.arbor.q6k_mm(x, packed, n): GGUF Q6_K's, w = d * sc * (q - 32), in 6.5625 bits a weight as in the file
  (pack_q6k), so Q4_K_M's Q6_K layers and its tied head/embedding (233 MB as int8 rows, 127 MB so) are exact too;
- torch.ops.arbor.q8_mm(x, packed, n): GGUF Q8_0's, w = d * q per 32 inputs, and so Q5_0's (stored as Q8_0), in 8.5
  bits a weight (pack_q8);
- torch.ops.arbor.q5_mm(x, packed, n): GGUF Q5_0's, w = d * (q - 16), in 5.5 bits a weight as in the file (pack_q5:
  arbor's checkpoint stores Q5_0 as Q8_0 codes, whose range -16..15 says they fit);
- torch.ops.arbor.i8_mm(x, q, scale): int8 rows with a scale per row (quantize.Int8Linear's buffers).
The only error against the exact float product is the activations' rounding to int8 (tests/test_integer_kernels.py
bounds it).

The library is compiled with the system's C++ compiler the first time a process asks for it (~30-60 s on 2 cores)
into `kernels/` in arbor's cache ($ARBOR_KERNEL_DIR moves it), named by a hash of the source, torch and this CPU,
and later processes load it in milliseconds. No compiler, a failing build or ARBOR_INTEGER_KERNELS=0: one line on
stderr and the model runs PyTorch's int4 / int8 kernels as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from arbor_core.number_input import env_switch

from .machine_cache import key_digest, machine_key, notice

ENV = "ARBOR_INTEGER_KERNELS"
DIR_ENV = "ARBOR_KERNEL_DIR"
SOURCE = Path(__file__).with_name("integer_kernels.cpp")
SUPER = 256  # inputs per Q4_K super-block
ROWS = 16  # output rows interleaved in the packed layout
SUPER_BYTES = SUPER // 2 * ROWS + 4 * ROWS + 16 * ROWS  # codes, d and dmin (fp16), sc and m (u8) of 16 rows
Q8_BLOCK_BYTES = 32 * ROWS + 2 * ROWS  # int8 codes and d (fp16) of 32 inputs of 16 rows
Q5_BLOCK_BYTES = 16 * ROWS + 4 * ROWS + 2 * ROWS  # low nibbles, high bits, d (fp16) of 32 inputs of 16 rows
Q6K_SUPER_BYTES = SUPER * 6 // 8 * ROWS + 2 * ROWS + 16 * ROWS  # 6-bit codes, d (fp16), sc (int8 per 16) of 16 rows
ISAS = {"scalar": 0, "avx2": 1, "avx512": 2}
LAYOUTS = {"q4k": 0, "q5": 1, "q6k": 2, "q8": 3}  # packed_rows' layout argument

_loaded: bool | None = None


def cache_directory() -> Path:
    from arbor_weights.store import cache_dir

    path = Path(os.environ.get(DIR_ENV) or cache_dir() / "kernels").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def library_key() -> dict:
    return {**machine_key(), "source": hashlib.sha256(SOURCE.read_bytes()).hexdigest(),
            "python": sysconfig.get_config_var("SOABI")}


def _compile(out: Path) -> None:
    """g++ on the source against this torch (its headers, libraries and C++ ABI), OpenMP as torch's own."""
    from torch.utils import cpp_extension

    lib = Path(torch.__file__).parent / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    command = [os.environ.get("CXX", "g++"), "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp",
               f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes, str(SOURCE), "-o", str(partial),
               f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "compiler failed")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)


def available() -> bool:
    """Whether torch.ops.arbor's kernels are loaded in this process (built first if this machine has none)."""
    global _loaded
    if _loaded is None:
        _loaded = _load()
    return _loaded


def _load() -> bool:
    if not env_switch(ENV, True) or sys.platform != "linux" or not str(torch.__version__):
        return False
    try:
        if hasattr(torch.ops.arbor, "q4k_mm"):
            return True
    except (AttributeError, RuntimeError):
        pass
    try:
        path = cache_directory() / f"integer-{key_digest(library_key())}.so"
        if not path.exists():
            from arbor_weights.store import held_lock

            with held_lock(path.stem):
                if not path.exists():
                    notice("building arbor's CPU integer kernels (once per machine, ~1 minute)")
                    _compile(path)
        torch.ops.load_library(str(path))
        _register_fakes()
        return True
    except Exception as e:  # noqa: BLE001 - no compiler, a failing build, an unloadable library
        notice(f"arbor's CPU integer kernels are unavailable ({type(e).__name__}: {str(e).strip()[:200]}); "
               "running PyTorch's int4/int8 kernels")
        return False


def _register_fakes() -> None:
    """Shapes for tracing (torch.export, the compiled decode step): [rows, n] float32."""
    @torch.library.register_fake("arbor::q4k_mm")
    def _(x, packed, n):
        return x.new_empty((x.numel() // (packed.shape[1] * SUPER), n), dtype=torch.float32)

    @torch.library.register_fake("arbor::q6k_mm")
    def _(x, packed, n):
        return x.new_empty((x.numel() // (packed.shape[1] * SUPER), n), dtype=torch.float32)

    @torch.library.register_fake("arbor::q8_mm")
    def _(x, packed, n):
        return x.new_empty((x.numel() // (packed.shape[1] * 32), n), dtype=torch.float32)

    @torch.library.register_fake("arbor::q5_mm")
    def _(x, packed, n):
        return x.new_empty((x.numel() // (packed.shape[1] * 32), n), dtype=torch.float32)

    @torch.library.register_fake("arbor::packed_rows")
    def _(packed, layout, tokens):
        per_block = SUPER if layout in (LAYOUTS["q4k"], LAYOUTS["q6k"]) else 32
        return packed.new_empty((tokens.numel(), packed.shape[1] * per_block), dtype=torch.float32)

    @torch.library.register_fake("arbor::i8_mm")
    def _(x, q, scale):
        return x.new_empty((x.numel() // q.shape[1], q.shape[0]), dtype=torch.float32)


def use_isa(name: str) -> str:
    """Run the kernels on `name` (scalar, avx2, avx512) or the best this CPU has below it; the name in use."""
    got = torch.ops.arbor.set_isa(ISAS[name])
    return next(k for k, v in ISAS.items() if v == got)


def isa_in_use() -> str:
    got = torch.ops.arbor.set_isa(-1)
    return next(k for k, v in ISAS.items() if v == got)


def pack_q4k(qweight, super_scales, sub_scales) -> torch.Tensor:
    """A Q4_K tensor's stored entries (arbor_weights.quantized: codes [N, K/2] two a byte in column order, d and
    dmin [N, K/256, 2] fp16, sc and m [N, K/32, 2] u8) -> uint8 [ceil(N/16), K/256, SUPER_BYTES], the kernel's
    layout (integer_kernels.cpp): the same numbers, re-ordered; missing rows of the last group are zero."""
    q = torch.as_tensor(qweight)
    n, k = q.shape[0], q.shape[1] * 2
    s, g = k // SUPER, -(-n // ROWS)
    pad = g * ROWS - n
    codes = torch.stack([q & 0x0F, q >> 4], dim=-1).reshape(n, k)
    halves = torch.as_tensor(super_scales).view(torch.int16).reshape(n, s, 2)
    subs = torch.as_tensor(sub_scales).reshape(n, s * 8, 2)
    if pad:
        codes, halves, subs = (F.pad(t, (0, 0) * (t.dim() - 1) + (0, pad)) for t in (codes, halves, subs))
    c = codes.view(g, ROWS, s, 8, 2, 4, 4).permute(0, 2, 3, 4, 5, 1, 6)  # (g, s, sub-block, half, t, row, i)
    nibbles = (c[:, :, :, 0] | (c[:, :, :, 1] << 4)).reshape(g, s, -1)
    constants = halves.view(g, ROWS, s, 2).permute(0, 2, 3, 1).contiguous().view(torch.uint8).reshape(g, s, -1)
    small = subs.view(g, ROWS, s, 8, 2).permute(0, 2, 4, 3, 1).reshape(g, s, -1)
    return torch.cat([nibbles, constants, small.to(torch.uint8)], dim=2).contiguous()


def unpack_q4k(packed: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pack_q4k's inverse: (codes uint8 [n, K] 0..15, d and dmin float32 [n, K/256, 2], sc and m uint8 [n, K/32, 2])."""
    g, s, _ = packed.shape
    nib = packed[..., :SUPER // 2 * ROWS].view(g, s, 8, 4, ROWS, 4)
    codes = torch.stack([nib & 0x0F, nib >> 4], dim=3)  # (g, s, j, half, t, row, i)
    codes = codes.permute(0, 5, 1, 2, 3, 4, 6).reshape(g * ROWS, s * SUPER)[:n]
    start = SUPER // 2 * ROWS
    halves = packed[..., start:start + 4 * ROWS].contiguous().view(torch.float16).view(g, s, 2, ROWS)
    halves = halves.permute(0, 3, 1, 2).reshape(g * ROWS, s, 2)[:n].float()
    subs = packed[..., start + 4 * ROWS:].view(g, s, 2, 8, ROWS).permute(0, 4, 1, 3, 2).reshape(g * ROWS, s * 8, 2)
    return codes, halves, subs[:n]


def pack_q6k(qweight, super_scales, sub_scales) -> torch.Tensor:
    """A Q6_K tensor's stored entries (codes q - 32 int8 [N, K], d [N, K/256, 1] fp16, sc int8 [N, K/16]) -> uint8
    [ceil(N/16), K/256, Q6K_SUPER_BYTES] (integer_kernels.cpp's q6k layout); missing rows of the last group zero."""
    q = torch.as_tensor(qweight).to(torch.int16).add(32).to(torch.uint8)
    n, k = q.shape
    s, g = k // SUPER, -(-n // ROWS)
    pad = g * ROWS - n
    halves = torch.as_tensor(super_scales).view(torch.int16).reshape(n, s)
    subs = torch.as_tensor(sub_scales).reshape(n, s * 16)
    if pad:
        q, halves, subs = (F.pad(t, (0, 0) * (t.dim() - 1) + (0, pad)) for t in (q, halves, subs))
    c = q.view(g, ROWS, s, 8, 2, 4, 4)  # (g, row, s, 32-block j, half, t, i)
    low = (c & 0x0F).permute(0, 2, 3, 4, 5, 1, 6)  # (g, s, j, half, t, row, i)
    nibbles = (low[:, :, :, 0] | (low[:, :, :, 1] << 4)).reshape(g, s, 8, -1)
    high = (c >> 4).permute(0, 2, 3, 4, 1, 6, 5)  # (g, s, j, half, row, i, t)
    bits = (high[..., 0] | (high[..., 1] << 2) | (high[..., 2] << 4) | (high[..., 3] << 6)).reshape(g, s, 8, -1)
    codes = torch.cat([nibbles, bits], dim=3).reshape(g, s, -1)
    d = halves.view(g, ROWS, s).permute(0, 2, 1).contiguous().view(torch.uint8).reshape(g, s, -1)
    sc = subs.view(g, ROWS, s, 16).permute(0, 2, 3, 1).contiguous().view(torch.uint8).reshape(g, s, -1)
    return torch.cat([codes, d, sc], dim=2).contiguous()


def unpack_q6k(packed: torch.Tensor, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """pack_q6k's inverse for the given rows (all when None): (w float32 [rows, K] as gguf forms it: (d * sc) in
    float32 times q - 32, exactly) and nothing else; reads only those rows' groups."""
    g_all, s, _ = packed.shape
    groups = packed if rows is None else packed[rows // ROWS]  # (r, s, bytes): each row's group
    r = groups.shape[0]
    code = groups[..., :SUPER * 6 // 8 * ROWS].reshape(r, s, 8, 384)
    nib = code[..., :256].reshape(r, s, 8, 4, ROWS, 4)
    bits = code[..., 256:].reshape(r, s, 8, 2, ROWS, 4)
    low = torch.stack([nib & 0x0F, nib >> 4], dim=3)  # (r, s, j, half, t, row, i)
    high = torch.stack([(bits >> (2 * t)) & 3 for t in range(4)], dim=4)  # (r, s, j, half, t, row, i)
    q = (low | (high << 4)).permute(0, 5, 1, 2, 3, 4, 6).to(torch.float32) - 32  # (r, row, s, j, half, t, i)
    start = SUPER * 6 // 8 * ROWS
    d = groups[..., start:start + 2 * ROWS].contiguous().view(torch.float16).float()  # (r, s, row)
    sc = groups[..., start + 2 * ROWS:].contiguous().view(torch.int8).view(r, s, 16, ROWS).float()
    scale = (d[:, :, None, :] * sc).permute(0, 3, 1, 2)  # (r, row, s, 16): d * sc as gguf rounds it, float32
    w = (q.reshape(r, ROWS, s, 16, 16) * scale[..., None]).reshape(r, ROWS, s * SUPER)
    if rows is None:
        return w.reshape(g_all * ROWS, -1)
    return w[torch.arange(r), rows % ROWS]


def pack_q8(qweight, scales) -> torch.Tensor:
    """A Q8_0 (or Q5_0) tensor's stored entries (codes int8 [N, K], d fp16 [N, K/32]) -> uint8 [ceil(N/16), K/32,
    Q8_BLOCK_BYTES] (integer_kernels.cpp's q8 layout); missing rows of the last group zero."""
    q = torch.as_tensor(qweight).view(torch.uint8)
    n, k = q.shape
    b, g = k // 32, -(-n // ROWS)
    halves = torch.as_tensor(scales).view(torch.int16).reshape(n, b)
    if g * ROWS - n:
        q, halves = (F.pad(t, (0, 0, 0, g * ROWS - n)) for t in (q, halves))
    codes = q.view(g, ROWS, b, 8, 4).permute(0, 2, 3, 1, 4).reshape(g, b, -1)  # (g, block, t, row, i)
    d = halves.view(g, ROWS, b).permute(0, 2, 1).contiguous().view(torch.uint8).reshape(g, b, -1)
    return torch.cat([codes, d], dim=2).contiguous()


def unpack_q8(packed: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """pack_q8's inverse for the given rows (all when None): float32 [rows, K], d * q as gguf forms it."""
    g_all, b, _ = packed.shape
    groups = packed if rows is None else packed[rows // ROWS]
    r = groups.shape[0]
    q = groups[..., :32 * ROWS].contiguous().view(torch.int8).view(r, b, 8, ROWS, 4).permute(0, 3, 1, 2, 4)
    d = groups[..., 32 * ROWS:].contiguous().view(torch.float16).float().permute(0, 2, 1)  # (r, row, block)
    w = (q.reshape(r, ROWS, b, 32).float() * d[..., None]).reshape(r, ROWS, b * 32)
    return w.reshape(g_all * ROWS, -1) if rows is None else w[torch.arange(r), rows % ROWS]


def fits_five_bits(qweight) -> bool:
    """Whether Q8_0-stored codes are a Q5_0 tensor's (q - 16 in -16..15): then pack_q5 holds them in 5.5 bits."""
    q = torch.as_tensor(qweight)
    return bool(q.numel()) and int(q.min()) >= -16 and int(q.max()) <= 15


def pack_q5(qweight, scales) -> torch.Tensor:
    """Q5_0 codes stored as Q8_0 (q - 16 int8 [N, K], d fp16 [N, K/32]) -> uint8 [ceil(N/16), K/32, Q5_BLOCK_BYTES]
    (integer_kernels.cpp's q5 layout); missing rows of the last group zero (codes 16: weight 0)."""
    q = (torch.as_tensor(qweight).to(torch.int16) + 16).to(torch.uint8)
    n, k = q.shape
    b, g = k // 32, -(-n // ROWS)
    halves = torch.as_tensor(scales).view(torch.int16).reshape(n, b)
    if g * ROWS - n:
        q, halves = (F.pad(t, (0, 0, 0, g * ROWS - n)) for t in (q, halves))
    c = q.view(g, ROWS, b, 2, 4, 4)  # (g, row, block, half, t, i)
    low = (c & 0x0F).permute(0, 2, 3, 4, 1, 5)  # (g, block, half, t, row, i)
    nibbles = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(g, b, -1)
    high = (c >> 4).permute(0, 2, 1, 5, 3, 4).reshape(g, b, ROWS, 4, 8)  # (g, block, row, i, half * 4 + t)
    bits = sum(high[..., j] << j for j in range(8)).to(torch.uint8).reshape(g, b, -1)
    d = halves.view(g, ROWS, b).permute(0, 2, 1).contiguous().view(torch.uint8).reshape(g, b, -1)
    return torch.cat([nibbles, bits, d], dim=2).contiguous()


def unpack_q5(packed: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """pack_q5's inverse for the given rows (all when None): float32 [rows, K], d * (q - 16) as gguf forms it."""
    g_all, b, _ = packed.shape
    groups = packed if rows is None else packed[rows // ROWS]
    r = groups.shape[0]
    nib = groups[..., :16 * ROWS].reshape(r, b, 4, ROWS, 4)
    low = torch.stack([nib & 0x0F, nib >> 4], dim=2)  # (r, block, half, t, row, i)
    bits = groups[..., 16 * ROWS:20 * ROWS].reshape(r, b, ROWS, 4)
    high = torch.stack([(bits >> j) & 1 for j in range(8)], dim=-1).view(r, b, ROWS, 4, 2, 4)  # (.., i, half, t)
    q = low.permute(0, 4, 1, 2, 3, 5) | (high.permute(0, 2, 1, 4, 5, 3) << 4)  # (r, row, block, half, t, i)
    d = groups[..., 20 * ROWS:].contiguous().view(torch.float16).float().permute(0, 2, 1)  # (r, row, block)
    w = ((q.reshape(r, ROWS, b, 32).float() - 16) * d[..., None]).reshape(r, ROWS, b * 32)
    return w.reshape(g_all * ROWS, -1) if rows is None else w[torch.arange(r), rows % ROWS]


class PackedLinear(nn.Module):
    """y = x @ W.T + bias with W a GGUF tensor's numbers in one of the kernels' packed layouts (`KIND`, `BLOCK`
    inputs per packed column), run by the kind's torch.ops.arbor matmul (`_mm`). Its rows also serve as a (tied)
    embedding (embed_rows: the exact rows of `tokens`, any shape, as float32 [..., K], read from their groups)."""

    KIND: str
    BLOCK: int

    def __init__(self, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = out_features, packed.shape[1] * self.BLOCK
        self.register_buffer("packed", packed)
        self.bias = bias

    @staticmethod
    def _mm(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
        raise NotImplementedError

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def embed_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = torch.ops.arbor.packed_rows(self.packed, LAYOUTS[self.KIND], tokens)
        return rows.view(*tokens.shape, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        y = self._mm(rows, self.packed, self.out_features)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Q5Linear(PackedLinear):
    """A GGUF Q5_0 tensor's numbers (d * (q - 16) per 32 inputs) in pack_q5's layout, run by q5_mm."""

    KIND, BLOCK = "q5", 32

    @staticmethod
    def _mm(x, packed, n):
        return torch.ops.arbor.q5_mm(x, packed, n)

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        return unpack_q5(self.packed)[:self.out_features].to(dtype)


class Q8Linear(PackedLinear):
    """A GGUF Q8_0 or Q5_0 tensor's numbers (d * q per 32 inputs) in pack_q8's layout, run by q8_mm."""

    KIND, BLOCK = "q8", 32

    @staticmethod
    def _mm(x, packed, n):
        return torch.ops.arbor.q8_mm(x, packed, n)

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        return unpack_q8(self.packed)[:self.out_features].to(dtype)


class Q6KLinear(PackedLinear):
    """A GGUF Q6_K tensor's numbers (d * sc * (q - 32) per 16 inputs) in pack_q6k's layout, run by q6k_mm."""

    KIND, BLOCK = "q6k", SUPER

    @staticmethod
    def _mm(x, packed, n):
        return torch.ops.arbor.q6k_mm(x, packed, n)

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        return unpack_q6k(self.packed)[:self.out_features].to(dtype)


class Q4KLinear(PackedLinear):
    """A GGUF Q4_K tensor's numbers (d * sc * q - dmin * m per 32 inputs) in pack_q4k's layout, run by q4k_mm
    (an embedding kept as Q4_K, as Q4_K_M's is: 135 MB instead of 233 MB of int8 rows for the 1.5B)."""

    KIND, BLOCK = "q4k", SUPER

    @staticmethod
    def _mm(x, packed, n):
        return torch.ops.arbor.q4k_mm(x, packed, n)

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        """The weight [N, K], as gguf forms it: (d * sc) * q - (dmin * m), each product in float32."""
        codes, halves, subs = unpack_q4k(self.packed, self.out_features)
        n, k = codes.shape
        scale = (halves[..., 0:1] * subs[..., 0].float().view(n, -1, 8)).view(n, -1, 1)
        low = (halves[..., 1:2] * subs[..., 1].float().view(n, -1, 8)).view(n, -1, 1)
        return (codes.float().view(n, -1, 32) * scale - low).view(n, k).to(dtype)


@contextlib.contextmanager
def turned_off():
    """Models loaded inside run PyTorch's kernels, as without a compiler (benchmarks compare the two)."""
    global _loaded
    saved, _loaded = _loaded, False
    try:
        yield
    finally:
        _loaded = saved


ROW_LAYERS = (Q4KLinear, Q5Linear, Q6KLinear, Q8Linear)  # every layer of these kernels, each with embed_rows
