"""A training run's checkpoints on disk (train.py writes one every `save_every` steps and at the end).

`out/step-NNNNNN/` holds the trainable weights (trainable.safetensors), the AdamW state
(optimizer.safetensors) and state.json (the step, the run's config, the optimizer's param groups). The
file `latest` names the newest and is replaced atomically, so a killed run leaves the previous
checkpoint whole; the last KEEP_CHECKPOINTS are kept. Resuming puts weights and moments back exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from torch import nn

from arbor_core.errors import CorruptModelError, UsageError

KEEP_CHECKPOINTS = 2


def first_step(out: Path, resume: bool, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer) -> int:
    """0 for a new run; with `resume`, the step of the latest checkpoint in `out`, its weights and AdamW
    state put back. A new run never writes over an old one."""
    found = latest_checkpoint(out) if resume else None
    if resume and found is None and any(out.glob("step-*")):
        raise UsageError(f"{out} has checkpoints but no readable 'latest'")
    if found is not None:
        return load_checkpoint(found, params, optimizer)["step"]
    if not resume and latest_checkpoint(out) is not None:
        raise UsageError(f"{out} already holds a training run; --resume continues it, or choose another --out")
    return 0


def save_checkpoint(out: Path, step: int, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
                    config: dict, extra: dict) -> Path:
    """out/step-NNNNNN (written under a temporary name, then renamed), then `latest` replaced atomically."""
    from safetensors.torch import save_file

    name = f"step-{step:06d}"
    work = out / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    try:
        save_file({k: p.detach().cpu().contiguous() for k, p in params.items()}, str(work / "trainable.safetensors"))
        state = optimizer.state_dict()
        tensors = {f"{index}.{key}": value.detach().cpu().contiguous()
                   for index, entries in state["state"].items() for key, value in entries.items()
                   if torch.is_tensor(value)}
        save_file(tensors, str(work / "optimizer.safetensors"))
        groups = [{k: v for k, v in g.items()} for g in state["param_groups"]]
        (work / "state.json").write_text(json.dumps({"step": step, "config": config, "param_groups": groups,
                                                     **extra}, indent=1), encoding="utf-8")
        final = out / name
        if final.exists():
            shutil.rmtree(final)
        work.rename(final)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    pointer = out / f".latest-{uuid.uuid4().hex[:8]}"
    pointer.write_text(name + "\n", encoding="utf-8")
    os.replace(pointer, out / "latest")
    kept = sorted(p for p in out.glob("step-*") if p.is_dir())
    for old in kept[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    try:
        name = (out / "latest").read_text(encoding="utf-8").strip()
    except OSError:
        return None
    path = out / name
    return path if (path / "state.json").is_file() else None


def load_checkpoint(path: Path, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer) -> dict:
    """Put a checkpoint's trainable weights and AdamW state back; its state.json. A file cut short or
    written over is a CorruptModelError that names the checkpoint (the run is left as it is)."""
    from safetensors import SafetensorError

    try:
        return _load_checkpoint(path, params, optimizer)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CorruptModelError(f"the checkpoint {path} is damaged ({type(e).__name__}: {str(e).splitlines()[0]}); "
                                f"write an earlier step-* into {path.parent / 'latest'} to resume from it, or "
                                "start a new --out") from None


def _load_checkpoint(path: Path, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer) -> dict:
    from safetensors.torch import load_file

    weights = load_file(str(path / "trainable.safetensors"))
    if set(weights) != set(params):
        raise UsageError(f"{path} holds another model's trainable weights (or another --lora); start a new --out")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    info = json.loads((path / "state.json").read_text(encoding="utf-8"))
    tensors = load_file(str(path / "optimizer.safetensors"))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    device = next(iter(params.values())).device
    optimizer.load_state_dict({"state": {i: {k: (v if k == "step" else v.to(device)) for k, v in s.items()}
                                         for i, s in state.items()},
                               "param_groups": info["param_groups"]})
    return info
