"""Function-preserving growth of a Llama-family checkpoint (`arbor grow SRC DST`, arbor_cli/cli/grow.py: grow_model).

The grown model computes exactly what the original did, and can then be trained (train.py):

- depth: new blocks are copies of the block before them with their output projections (o_proj and
  down_proj) zeroed, so each is `x + 0 + 0`: an identity that gradients reach through those
  projections. They are spread evenly between the original blocks.
- width: Net2Net's neuron splitting (Chen, Goodfellow & Shlens 2016). An MLP neuron is copied (its
  gate_proj and up_proj rows) and its down_proj column shared between the copies; a whole key/value
  group of attention heads is copied (its k/v rows and the query heads that read it) and their
  o_proj columns shared. The shares are unequal (drawn from [0.3, 0.7], summing to one), so the copies
  receive different gradients and can grow apart: equal halves would keep them twins forever.
  `width` scales the MLP's neurons by any factor >= 1, and the attention heads by it when it is a
  whole number (a head cannot be split in two).

Works on numpy state dicts with HF names (float32; GGUF blocks are dequantized first), so the result
is a normal checkpoint that every backend loads.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np

from arbor_core.errors import UsageError
from arbor_core.number_input import check_number

from .export import TOKENIZER_FILES
from .quantized import dequantize_state
from .safetensors_file import write_safetensors

LAYER = "model.layers.{}."
SHARE_RANGE = (0.3, 0.7)


def grow_state(state: dict[str, np.ndarray], config, depth: float = 1.0, width: float = 1.0, seed: int = 0
               ) -> tuple[dict[str, np.ndarray], object]:
    """(state, config) grown by `depth` (layers x depth, rounded) and `width` (see the module docstring)."""
    check_number(depth, "--depth", minimum=1)  # growth only; never NaN or infinite
    check_number(width, "--width", minimum=1)
    rng = np.random.default_rng(seed)
    state = {k: np.asarray(v, dtype=np.float32) for k, v in state.items()}
    if width > 1:
        state, config = _widen(state, config, width, rng)
    if depth > 1:
        state, config = _deepen(state, config, depth)
    return state, config


def _shares(copies: int, rng) -> np.ndarray:
    """`copies` positive weights summing to one, unequal (one copy: [1])."""
    if copies == 1:
        return np.ones(1, dtype=np.float32)
    raw = rng.uniform(*SHARE_RANGE, size=copies)
    return (raw / raw.sum()).astype(np.float32)


def _widen(state, config, width: float, rng):
    inner = config.intermediate_size
    new_inner = int(round(inner * width))
    heads = int(width) if float(width).is_integer() else 1
    sources = np.concatenate([np.arange(inner), rng.choice(inner, new_inner - inner, replace=new_inner - inner > inner)])
    for i in range(config.num_hidden_layers):
        p = LAYER.format(i)
        for name in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
            state[p + name] = state[p + name][sources]
        down = state[p + "mlp.down_proj.weight"]  # (hidden, inner)
        widened = down[:, sources].copy()
        for neuron in range(inner):
            copies = np.flatnonzero(sources == neuron)
            widened[:, copies] *= _shares(len(copies), rng)
        state[p + "mlp.down_proj.weight"] = widened
        if heads > 1:
            _more_heads(state, p, config, heads, rng)
    changes = {"intermediate_size": new_inner}
    if heads > 1:
        changes.update(num_attention_heads=config.num_attention_heads * heads,
                       num_key_value_heads=config.num_key_value_heads * heads, head_dim=config.head_dim)
    return state, dataclasses.replace(config, **changes)


def _more_heads(state, p: str, config, copies: int, rng) -> None:
    """Each key/value group (a k/v head and the query heads that read it) copied `copies` times: copy r
    of group k is group r * kv + k, so query head h still reads k/v head h // group_size."""
    hd, n_q = config.head_dim, config.num_attention_heads

    def rows(name: str) -> None:  # (heads * hd, ...) -> the copies stacked: [copy 0 | copy 1 | ...]
        for suffix in ("weight", "bias"):
            key = f"{p}self_attn.{name}.{suffix}"
            if key in state:
                state[key] = np.concatenate([state[key]] * copies, axis=0)

    for name in ("q_proj", "k_proj", "v_proj"):
        rows(name)
    out = state[p + "self_attn.o_proj.weight"].reshape(-1, n_q, hd)  # (hidden, heads, hd)
    shares = np.stack([_shares(copies, rng) for _ in range(n_q)], axis=1)  # (copies, heads)
    state[p + "self_attn.o_proj.weight"] = np.concatenate(
        [out * shares[r][None, :, None] for r in range(copies)], axis=1).reshape(out.shape[0], -1)
    # query head r * n_q + h reads k/v head (r * n_q + h) // group = r * n_kv + h // group: its group's copy


def _deepen(state, config, depth: float):
    layers = config.num_hidden_layers
    new_layers = int(round(layers * depth))
    extra = new_layers - layers
    after = [j * layers // extra for j in range(extra)]  # the original block each new one follows: spread evenly
    order: list[tuple[int, bool]] = []  # (source block, is a new identity block)
    for i in range(layers):
        order.append((i, False))
        order += [(i, True)] * after.count(i)
    grown = {k: v for k, v in state.items() if not k.startswith("model.layers.")}
    for new_index, (source, identity) in enumerate(order):
        src, dst = LAYER.format(source), LAYER.format(new_index)
        for key, value in state.items():
            if key.startswith(src):
                tail = key[len(src):]
                zero = identity and tail in ("self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.down_proj.weight")
                grown[dst + tail] = np.zeros_like(value) if zero else value.copy()
    return grown, dataclasses.replace(config, num_hidden_layers=new_layers)


def parameters_from_config(config, depth: float = 1.0, width: float = 1.0) -> int:
    """About how many parameters `config` has grown by `depth` and `width` (an upper bound: width is taken to
    widen the attention too), from its shapes alone."""
    h, inter = config.hidden_size, config.intermediate_size * width
    q, kv = config.num_attention_heads * config.head_dim * width, config.num_key_value_heads * config.head_dim * width
    layer = 2 * h * q + 2 * h * kv + 3 * h * inter + 4 * h
    head = 0 if config.tie_word_embeddings else config.vocab_size * h
    return int(config.vocab_size * h + head + h + layer * round(config.num_hidden_layers * depth))


def check_memory_for_growth(config, depth: float, width: float) -> None:
    """A UsageError when the source's and the grown model's float32 states do not fit the memory available
    now (both are held while the grown one is built and written)."""
    import psutil

    check_number(depth, "--depth", minimum=1)
    check_number(width, "--width", minimum=1)
    need = 4 * (parameters_from_config(config) + parameters_from_config(config, depth, width))
    available = psutil.virtual_memory().available
    if need > available:
        raise UsageError(f"growing by --depth {depth:g} --width {width:g} gives "
                         f"{round(config.num_hidden_layers * depth):,} layers and needs about {need / 1e9:,.1f} GB "
                         f"of memory; {available / 1e9:,.1f} GB is available: choose a smaller growth")


def parameter_count(state: dict[str, np.ndarray], config) -> int:
    """Parameters as a model counts them (a tied head is the embedding, counted once)."""
    return int(sum(v.size for k, v in state.items() if not (config.tie_word_embeddings and k == "lm_head.weight")))


def read_float_state(checkpoint) -> dict[str, np.ndarray]:
    """Every tensor of `checkpoint` as float32 numpy, GGUF blocks dequantized."""
    from safetensors.numpy import load_file

    state: dict[str, np.ndarray] = {}
    for file in checkpoint.weight_files:
        state.update(load_file(str(file)))
    return {k: np.asarray(v, dtype=np.float32) for k, v in dequantize_state(state, str(checkpoint.path)).items()}


def write_checkpoint(state: dict[str, np.ndarray], config, destination: str | Path, tokenizer_from: Path | None = None
                     ) -> Path:
    """A normal Arbor checkpoint (config.json, float32 model.safetensors, the tokenizer files) at
    `destination`, absent or empty; written beside it and renamed into place."""
    import uuid

    dst = Path(destination).expanduser().absolute()
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UsageError(f"{dst} already exists and is not an empty directory")
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = dst.parent / f".tmp-{dst.name}-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    try:
        write_safetensors(work / "model.safetensors", [(k, state[k].shape, "float32") for k in sorted(state)],
                          lambda k: state[k])
        config = dataclasses.replace(config, extra={k: v for k, v in config.extra.items() if k != "quantization"})
        config.save(work / "config.json")
        for name in TOKENIZER_FILES:
            if tokenizer_from is not None and (tokenizer_from / name).is_file():
                shutil.copyfile(tokenizer_from / name, work / name)
        if dst.exists():
            dst.rmdir()
        work.rename(dst)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return dst


def grow_checkpoint(checkpoint, destination: str | Path, depth: float = 1.0, width: float = 1.0, seed: int = 0
                    ) -> tuple[Path, int, int]:
    """`checkpoint` grown and written at `destination`: (its path, parameters before, after). A growth whose
    float32 state this machine's memory cannot hold beside the source's is refused before anything is read."""
    check_memory_for_growth(checkpoint.config, depth, width)
    state = read_float_state(checkpoint)
    before = parameter_count(state, checkpoint.config)
    grown, config = grow_state(state, checkpoint.config, depth, width, seed)
    path = write_checkpoint(grown, config, destination, Path(checkpoint.path))
    return path, before, parameter_count(grown, config)


def grown_destination(checkpoint, depth: float, width: float, seed: int) -> Path:
    """Where a growth of `checkpoint` is kept when no destination is named: under the cache, named for it."""
    from .store import cache_dir

    return cache_dir() / "grown" / f"{Path(str(checkpoint.path)).name}-grown-d{depth:g}-w{width:g}-s{seed}"
