"""arbor train (backends/arbor_torch/train.py) on a tiny random model, on the CPU: exact resume, a killed
run's checkpoint, the memory-saving paths computing what the plain ones do, and LoRA adapters that
merge into the model they were trained on."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from arbor_core.errors import UsageError
from arbor_torch import train as T
from arbor_torch.train_data import pack


def rows_of(seq_len=32, seed=0):
    rng = np.random.default_rng(seed)
    return pack([list(rng.integers(0, 97, 300)) for _ in range(4)], seq_len, 0)


def config(**over):
    return T.TrainConfig(**{**dict(seq_len=32, steps=6, lr=1e-2, warmup=2, save_every=2, loss_chunk=8), **over})


@pytest.mark.parametrize("lora", [None, 4])
def test_a_resumed_run_reaches_the_losses_of_an_uninterrupted_one(tiny_checkpoint, tmp_path, lora):
    checkpoint, rows, cfg = tiny_checkpoint(), rows_of(), config(lora_rank=lora)
    whole = T.train(checkpoint, rows, tmp_path / "whole", cfg)
    first = T.train(checkpoint, rows, tmp_path / "cut", cfg, stop_after=3)  # the last checkpoint is step 2
    rest = T.train(checkpoint, rows, tmp_path / "cut", cfg, resume=True)
    assert first.losses == whole.losses[:3] and rest.losses == whole.losses[2:]
    assert whole.losses[-1] < whole.losses[0]
    lines = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6] and all(r["tokens_per_s"] > 0 for r in lines)


def test_a_run_killed_while_saving_leaves_its_last_checkpoint_whole(tiny_checkpoint, tmp_path, monkeypatch):
    from safetensors import torch as st

    checkpoint, rows, cfg = tiny_checkpoint(), rows_of(), config()
    real, calls = st.save_file, []

    def killed(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:  # the second checkpoint's first file
            raise KeyboardInterrupt
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(st, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        T.train(checkpoint, rows, tmp_path / "run", cfg)
    monkeypatch.setattr(st, "save_file", real)
    assert (tmp_path / "run" / "latest").read_text().strip() == "step-000002"
    assert not list((tmp_path / "run").glob(".tmp-*"))
    resumed = T.train(checkpoint, rows, tmp_path / "run", cfg, resume=True)
    assert resumed.steps == 6 and len(resumed.losses) == 4


def test_a_second_run_into_the_same_directory_needs_resume(tiny_checkpoint, tmp_path):
    checkpoint, rows = tiny_checkpoint(), rows_of()
    T.train(checkpoint, rows, tmp_path / "run", config(steps=2))
    with pytest.raises(UsageError, match="--resume"):
        T.train(checkpoint, rows, tmp_path / "run", config(steps=2))


def test_chunked_loss_and_checkpointed_blocks_compute_the_plain_loss_and_gradients(tiny_checkpoint):
    checkpoint = tiny_checkpoint()
    batch = torch.from_numpy(rows_of()[:2])
    results = []
    for chunk, blocks in ((10_000, False), (8, True)):
        model = T.build_model(checkpoint, config(), "cpu")
        loss = T.sequence_loss(model, batch, config(loss_chunk=chunk, grad_checkpointing=blocks))
        loss.backward()
        results.append((float(loss.detach()), model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    model = T.build_model(checkpoint, config(), "cpu")
    logits = model.lm_head(model.hidden_states(batch[:, :-1]))
    plain = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    assert results[0][0] == pytest.approx(float(plain), rel=1e-6) == results[1][0]
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-5, atol=1e-7)


def test_the_learning_rate_warms_up_then_decays_to_its_floor():
    cfg = config(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    lrs = [T.learning_rate(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_packing_joins_documents_and_overlaps_rows_by_one_token():
    rows = pack([[1, 2, 3], [4, 5, 6, 7]], 3, 0)
    assert rows.tolist() == [[1, 2, 3, 0], [0, 4, 5, 6]]
    with pytest.raises(UsageError, match="fewer than one sequence"):
        pack([[1, 2]], 8, 0)


def test_a_lora_adapter_merges_into_a_model_that_computes_what_training_ran(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file

    import arbor_torch
    from arbor_core.rope import rope_frequencies
    from arbor_weights.adapter import merge_adapter
    from arbor_weights.checkpoint import open_checkpoint

    checkpoint, rows = tiny_checkpoint(), rows_of()
    cfg = config(lora_rank=4, rope="yarn:2")
    result = T.train(checkpoint, rows, tmp_path / "run", cfg)
    assert result.written == ["adapter.safetensors", "adapter.json"]
    meta = json.loads((tmp_path / "run" / "adapter.json").read_text())
    assert meta["rope_scaling"]["rope_type"] == "yarn" and meta["rank"] == 4
    trained = T.build_model(checkpoint, cfg, "cpu")
    weights = load_file(str(tmp_path / "run" / "adapter.safetensors"))
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if name in weights:
                p.copy_(weights[name])
        ids = [int(i) for i in rows[0][:32]]
        expected = trained.lm_head(trained.hidden_states(torch.tensor([ids])))[0].numpy()
    merged = open_checkpoint(merge_adapter(checkpoint, tmp_path / "run", tmp_path / "merged"))
    assert merged.config.rope_scaling["factor"] == 2.0
    got = arbor_torch.load(merged, "cpu", "float32").logits(ids, rope_frequencies(merged.config, 32))
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-5


def test_a_grown_model_still_trains(tiny_checkpoint, tmp_path):
    from arbor_weights.checkpoint import open_checkpoint
    from arbor_weights.grow import grow_checkpoint

    path, before, after = grow_checkpoint(tiny_checkpoint(), tmp_path / "grown", depth=2.0, width=2.0)
    assert after > 2 * before
    counting = pack([list(range(97)) * 6], 32, None)  # each token predicts the next: learnable in a few steps
    result = T.train(open_checkpoint(path), counting, tmp_path / "run", config(steps=12, lr=3e-3, save_every=12))
    assert np.mean(result.losses[-4:]) < 0.75 * result.losses[0]  # 5.37 -> ~3.0 (the rows start at other phases)


@pytest.mark.slow
def test_arbor_train_on_text_with_the_default_model(default_checkpoint, tmp_path):
    import subprocess
    import sys

    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"On day {i} the keeper lit the lamp at dusk." for i in range(200)))
    done = subprocess.run([sys.executable, "-m", "arbor_cli", "train", str(text), "--out", str(tmp_path / "run"),
                           "--model", str(default_checkpoint.path), "--seq-len", "64", "--steps", "3", "--lora", "4",
                           "--grad-checkpointing", "--save-every", "3"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "run") and (tmp_path / "run" / "adapter.safetensors").is_file()
    bad = subprocess.run([sys.executable, "-m", "arbor_cli", "train", str(text), "--out", str(tmp_path / "x"),
                          "--model", str(default_checkpoint.path), "--rope", "yarn:0.5"], capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode == 2 and "--rope takes" in bad.stderr and bad.stderr.count("\n") == 1
