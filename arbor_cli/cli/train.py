"""`arbor train DATA… --out DIR`: fine-tune a model (full or LoRA) on text, for long context."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from arbor_cli.backends import trainer
from arbor_core.errors import UsageError
from arbor_core.rope import parse_scaling

from .common import (
    GlobalOptions,
    console,
    handle_errors,
    max_input_bytes,
    model_options,
    notice,
    read_text_input,
    write_answer,
)


def register(app: typer.Typer) -> None:
    app.command("train", help="Fine-tune a model on text files (full, or LoRA with --lora RANK): packed sequences, "
                "AdamW with warmup and cosine decay, gradient checkpointing, checkpoints every --save-every steps "
                "and exact --resume.")(train)


@handle_errors
@model_options(without=("backend", "device", "context", "rope", "kv_bits", "quantize", "dtype"))
def train(
    data: Annotated[list[str], typer.Argument(help="Text files to train on ('-' reads stdin).", show_default=False)],
    out: Annotated[str, typer.Option("--out", help="Directory for checkpoints, the log and the result.",
                                     show_default=False)],
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per training sequence.")] = 4096,
    # not the shared --rope (a method for running beyond the trained context): the scaling trained with
    rope: Annotated[Optional[str], typer.Option("--rope", help="RoPE scaling to train with: linear:F or yarn:F "
                                                "(default: the model's own).")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps.")] = 100,
    batch: Annotated[int, typer.Option("--batch", help="Sequences per micro-batch.")] = 1,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Micro-batches per step.")] = 1,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate.")] = 2e-4,
    warmup: Annotated[int, typer.Option("--warmup", help="Steps of linear warmup.")] = 10,
    lora: Annotated[Optional[int], typer.Option("--lora", metavar="RANK", help="Train LoRA adapters of this rank "
                                                "on the attention projections (and the norms) instead of every "
                                                "weight.")] = None,
    no_norms: Annotated[bool, typer.Option("--freeze-norms", help="With --lora: keep the norm weights frozen.")]
    = False,
    grad_checkpointing: Annotated[bool, typer.Option("--grad-checkpointing", help="Recompute each block's "
                                                     "activations in the backward pass (far less memory).")] = False,
    bf16: Annotated[bool, typer.Option("--bf16", help="bfloat16 autocast (CUDA).")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")]
    = False,
    save_every: Annotated[int, typer.Option("--save-every", help="Checkpoint every N steps.")] = 50,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the data order and the adapters.")] = 0,
    device: Annotated[Optional[str], typer.Option("--device", help="cuda or cpu (default: cuda when present).")]
    = None,
    *, opts: GlobalOptions,
) -> None:
    import arbor_weights

    train_module = trainer()
    cfg = train_module.TrainConfig(seq_len=seq_len, steps=steps, batch=batch, grad_accum=grad_accum, lr=lr,
                                   warmup=warmup, lora_rank=lora, train_norms=not no_norms,
                                   grad_checkpointing=grad_checkpointing, bf16=bf16, rope=rope,
                                   save_every=save_every, seed=seed)
    cfg.check()
    checkpoint = arbor_weights.resolve(opts.model or arbor_weights.default_model())
    cfg.check(checkpoint.config)  # --lora within the model's attention projections
    parse_scaling(rope, checkpoint.config.trained_context)  # a bad --rope fails before the data is read
    texts = (read_text_input(path, max_input_bytes())[0] for path in data)  # each read when it is tokenized
    rows, tokens = train_module.training_rows(checkpoint, texts, seq_len)
    notice(f"{tokens:,} tokens of text: {len(rows):,} sequences of {seq_len:,}; "
           f"{steps * batch * grad_accum:,} sequences in {steps:,} steps")
    device = device or ("cuda" if _cuda() else "cpu")
    if bf16 and device == "cpu":
        raise UsageError("--bf16 is autocast on CUDA; on a CPU training runs in float32")
    with _progress(steps) as show:
        result = train_module.train(checkpoint, rows, out, cfg, device=device, resume=resume, on_step=show)
    if result.losses:
        notice(f"steps {result.steps - len(result.losses) + 1}–{result.steps}: loss {result.losses[0]:.4f} → "
               f"{result.losses[-1]:.4f}; wrote {', '.join(result.written) or 'checkpoints'} in {out}")
    write_answer(str(Path(out).absolute()))


@contextlib.contextmanager
def _progress(steps: int):
    """A progress bar on a terminal, else a notice every twentieth of the run; yields the on_step callback."""
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} tok/s"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=not console.is_terminal,
                  disable=not console.is_terminal) as progress:
        task = progress.add_task("training", total=steps, loss="…", rate="…")

        def show(record: dict) -> None:
            progress.update(task, completed=record["step"], loss=f"{record['loss']:.4f}",
                            rate=f"{record['tokens_per_s']:,.0f}")
            if not console.is_terminal and record["step"] % max(1, steps // 20) == 0:
                notice(f"step {record['step']}/{steps}: loss {record['loss']:.4f}, {record['tokens_per_s']:,.0f} tok/s")

        yield show


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
