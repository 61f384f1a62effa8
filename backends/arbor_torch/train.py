"""Training the Transformer of model.py (no second model class): full fine-tune or LoRA, for long context.

- data (train_data.py): real text packed into sequences of seq_len + 1 tokens (documents joined by the
  end-of-text token), visited in an order fixed by the seed, so step s always sees the same sequences;
- the model: float32 master weights; LoRA (Hu et al. 2021) puts low-rank adapters on the attention
  projections, and with `train_norms` the RMSNorm weights train too (LongLoRA's recipe, Chen et al.
  2023); bf16 autocast on CUDA; the RoPE scaling (`rope`: linear or YaRN with a factor) is the one the
  trained model will run with;
- a step: `grad_accum` micro-batches of `batch` sequences, gradient clipping, AdamW, linear warmup
  then cosine decay to `min_lr_ratio` of the peak;
- memory: with `grad_checkpointing` each block's activations are recomputed in the backward pass
  (Transformer.hidden_states); the loss is taken in chunks of `loss_chunk` positions whose logits are
  recomputed in the backward pass too, so no [sequence, vocabulary] logits tensor ever exists (at 128K
  and a 49K vocabulary it would be 25 GB in float32);
- checkpoints (train_checkpoints.py) every `save_every` steps and at the end: `step-NNNNNN/` holds the
  trainable weights, the AdamW state and state.json; the file `latest` names the newest and is replaced
  atomically, so a killed run leaves the previous checkpoint whole. `resume` continues from it exactly:
  same weights, same optimizer moments, same data order, same schedule, same losses;
- log: log.jsonl, one line a step (loss, learning rate, tokens/s, peak memory).

What it writes at the end: a LoRA run writes adapter.safetensors + adapter.json (merge with
arbor_weights.adapter.merge_adapter) and a full fine-tune a normal checkpoint in `model/`.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from arbor_core.number_input import check_number
from arbor_core.rope import parse_scaling, rope_frequencies

from .arch.pieces import soft_cap
from .model import Transformer
from .train_checkpoints import first_step, save_checkpoint
from .train_data import Batches
# the data side of a run, which `arbor train` reaches through this module (arbor_cli.backends.trainer)
from .train_data import training_rows as training_rows

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class TrainConfig:
    seq_len: int = 4096
    steps: int = 100
    batch: int = 1
    grad_accum: int = 1
    lr: float = 2e-4
    warmup: int = 10  # steps of linear warmup
    min_lr_ratio: float = 0.1  # the cosine ends at this fraction of lr
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_rank: int | None = None  # None: full fine-tune
    lora_alpha: float | None = None  # default 2 x rank
    train_norms: bool = True  # with LoRA: the RMSNorm weights train too
    grad_checkpointing: bool = False
    bf16: bool = False  # autocast on CUDA
    rope: str | None = None  # "yarn:4", "linear:2"; None: the model's own RoPE
    save_every: int = 50
    seed: int = 0
    loss_chunk: int = 2048

    def check(self, model_config=None) -> None:
        """Every value a usable one (a UsageError naming the option otherwise); with `model_config`, also a
        LoRA rank the model's attention projections can hold (a rank past the narrowest one adds nothing
        but memory: --lora 100000 would allocate gigabytes of adapters)."""
        for name in ("seq_len", "steps", "batch", "grad_accum", "save_every", "loss_chunk"):
            check_number(getattr(self, name), f"--{name.replace('_', '-')}", int, minimum=1)
        check_number(self.lr, "--lr", float, above=0)
        if self.lora_rank is not None:
            narrowest = None if model_config is None else min(
                model_config.hidden_size, model_config.num_key_value_heads * model_config.head_dim)
            check_number(self.lora_rank, "--lora", int, minimum=1, maximum=narrowest)


# ---- the model ------------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """base(x) + scale * B(A(x)): the frozen weight plus a trainable rank-r update, B zero at first."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises, and the LoRA paper

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale


def build_model(checkpoint, cfg: TrainConfig, device: str) -> Transformer:
    """The checkpoint's Transformer in float32 on `device`, RoPE set for cfg.seq_len with cfg.rope, and
    (LoRA) adapters in place; its trainable parameters are the ones with requires_grad."""
    from safetensors.torch import load_file

    from arbor_weights.checkpoint import check_tensors

    from . import load_quantized

    config = checkpoint.config
    scaling = parse_scaling(cfg.rope, config.trained_context)
    if scaling:
        config = config.with_rope_scaling(scaling)
    with torch.device("meta"):
        model = Transformer(config)
    state = {}
    for path in checkpoint.weight_files:
        state.update(load_file(str(path), device="cpu"))
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    state = check_tensors(state, expected, checkpoint.path, config.tie_word_embeddings)
    state = load_quantized.dequantized_state(state, checkpoint.path)
    model.load_state_dict({k: v.to(device=device, dtype=torch.float32) for k, v in state.items()}, strict=False,
                          assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    tables = rope_frequencies(config, cfg.seq_len)
    model.set_rope(torch.from_numpy(tables.inv_freq), tables.attention_factor, cfg.seq_len)
    if cfg.lora_rank:
        torch.manual_seed(cfg.seed)
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in model.model.layers:
            for name in LORA_TARGETS:
                setattr(layer.self_attn, name, LoRALinear(getattr(layer.self_attn, name), cfg.lora_rank,
                                                          cfg.lora_alpha or 2.0 * cfg.lora_rank))
        if cfg.train_norms:
            for module in model.modules():
                if type(module).__name__ == "RMSNorm":
                    module.weight.requires_grad_(True)
    return model


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


# ---- loss -----------------------------------------------------------------------------------------
def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, head: torch.Tensor, cap: float | None) -> torch.Tensor:
    logits = soft_cap(hidden @ head.t(), cap).float()  # the logits as the model gives them (Gemma caps them)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")


def sequence_loss(model: Transformer, tokens: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Mean next-token cross-entropy of `tokens` (B, T + 1), the head applied `loss_chunk` positions at a time."""
    from torch.utils.checkpoint import checkpoint

    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    hidden = model.hidden_states(inputs, checkpoint_blocks=cfg.grad_checkpointing)
    head = model.lm_head.weight
    total = hidden.new_zeros((), dtype=torch.float32)
    for begin in range(0, inputs.shape[1], cfg.loss_chunk):
        part = slice(begin, begin + cfg.loss_chunk)
        total = total + checkpoint(_chunk_loss, hidden[:, part], targets[:, part], head,
                                   model.config.final_logit_softcapping, use_reentrant=False)
    return total / targets.numel()


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# ---- the loop -------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    out: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # of the steps this run made
    peak_memory_bytes: int = 0
    written: list[str] = field(default_factory=list)


def train(checkpoint, rows: np.ndarray, out: str | Path, cfg: TrainConfig, *, device: str = "cpu",
          resume: bool = False, on_step: Callable[[dict], None] = lambda record: None,
          stop_after: int | None = None) -> TrainResult:
    """Train `checkpoint` on `rows` (train_data.pack's output) into `out`. `stop_after`: end this run after that many
    steps (a test's stand-in for a run cut short; the checkpoint cadence is unchanged)."""
    cfg.check()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = build_model(checkpoint, cfg, device)
    params = trainable(model)
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    start = first_step(out, resume, params, optimizer)
    batches = Batches(rows, cfg.batch, cfg.grad_accum, cfg.seed)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    result = TrainResult(out, start)
    log = open(out / "log.jsonl", "a", encoding="utf-8")
    t0, tokens = time.perf_counter(), 0
    try:
        for step in range(start, cfg.steps):
            if stop_after is not None and step - start >= stop_after:
                break
            lr = learning_rate(step, cfg)
            micro_batches = batches.micro_batches(step, device)
            loss_sum, norm, seen = _optimizer_step(model, optimizer, params, micro_batches, lr, cfg)
            tokens += seen
            elapsed = time.perf_counter() - t0
            peak = torch.cuda.max_memory_allocated(device) if cuda else 0
            record = {"step": step + 1, "loss": loss_sum, "lr": lr, "grad_norm": norm, "tokens": tokens,
                      "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0, "elapsed_s": elapsed,
                      "peak_memory_bytes": peak}
            log.write(json.dumps(record) + "\n")
            log.flush()
            result.losses.append(loss_sum)
            result.steps, result.peak_memory_bytes = step + 1, peak
            on_step(record)
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                save_checkpoint(out, step + 1, params, optimizer, asdict(cfg), {"base": str(checkpoint.name)})
    finally:
        log.close()
    if result.steps == cfg.steps:
        result.written = write_result(checkpoint, model, cfg, out)
    return result


def _optimizer_step(model: Transformer, optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter],
                    micro_batches, lr: float, cfg: TrainConfig) -> tuple[float, float, int]:
    """One step at learning rate `lr`: the gradients of every micro-batch, clipped, then AdamW. The
    step's loss, the gradient norm before clipping, and the tokens it trained on."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum, tokens = 0.0, 0
    for batch in micro_batches:
        autocast = cfg.bf16 and batch.device.type == "cuda"
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = sequence_loss(model, batch, cfg) / cfg.grad_accum
        loss.backward()
        loss_sum += float(loss.detach())
        tokens += batch.shape[0] * (batch.shape[1] - 1)
    norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, norm, tokens


def write_result(checkpoint, model: Transformer, cfg: TrainConfig, out: Path) -> list[str]:
    """What the finished run leaves: the adapter (LoRA) or the whole model (full fine-tune)."""
    from safetensors.torch import save_file

    scaling = parse_scaling(cfg.rope, checkpoint.config.trained_context)
    if cfg.lora_rank:
        tensors = {k: p.detach().cpu().contiguous() for k, p in trainable(model).items()}
        save_file(tensors, str(out / "adapter.safetensors"))
        from arbor_weights.checkpoint import read_provenance

        meta = {"base": str(checkpoint.name), "base_sha256": read_provenance(Path(checkpoint.path)).get("sha256"),
                "rank": cfg.lora_rank, "alpha": cfg.lora_alpha or 2.0 * cfg.lora_rank, "targets": list(LORA_TARGETS),
                "train_norms": cfg.train_norms, "rope_scaling": scaling, "train": asdict(cfg)}
        (out / "adapter.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        return ["adapter.safetensors", "adapter.json"]
    from arbor_weights.grow import write_checkpoint

    state = {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()
             if not (checkpoint.config.tie_word_embeddings and k == "lm_head.weight")}
    config = checkpoint.config.with_rope_scaling(scaling) if scaling else checkpoint.config
    target = out / "model"
    if target.exists():
        shutil.rmtree(target)
    write_checkpoint(state, config, target, Path(checkpoint.path))
    return ["model"]
