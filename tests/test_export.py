"""`arbor export SRC DST --format hf`: a directory transformers loads with arbor's logits and tokens."""

import json
import subprocess
import sys

import numpy as np
import pytest

from arbor_core.errors import UsageError


@pytest.mark.slow
def test_the_exported_default_model_loads_in_transformers_with_arbors_logits(default_checkpoint, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import arbor_cli

    out = tmp_path / "smol-hf"
    done = subprocess.run([sys.executable, "-m", "arbor_cli", "export", str(default_checkpoint.path), str(out),
                           "--dtype", "float32"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)  # stdout: only the answer
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and "rope_scaling" not in config and config["torch_dtype"] == "float32"

    model = arbor_cli.load(str(default_checkpoint.path), dtype="float32", quiet=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "The lighthouse keeper climbed the stairs at dusk and lit the great lamp, as every night since 1698."
    ids = model.tokenizer.encode(text)
    assert tokenizer(text)["input_ids"] == ids
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert list(getattr(rendered, "input_ids", rendered)) == model.tokenizer.encode_chat(messages)
    ours = model.logits(ids)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].numpy()
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) <= 1e-4


@pytest.mark.slow
def test_an_export_for_a_longer_context_carries_the_rope_scaling_arbor_runs(default_checkpoint, tmp_path):
    import arbor_core.rope
    from arbor_weights.export import export_hf

    path = export_hf(default_checkpoint, tmp_path / "long", dtype="bfloat16",
                     rope_scaling=arbor_core.rope.scaling_for_context(default_checkpoint.config, 32768))
    config = json.loads((path / "config.json").read_text())
    assert config["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}
    assert config["max_position_embeddings"] == 8192 and config["torch_dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.norm.weight").dtype.__str__() == "torch.bfloat16"


def test_bfloat16_bits_round_to_nearest_even_as_torch_does():
    torch = pytest.importorskip("torch")
    from arbor_weights.safetensors_file import to_bfloat16_bits

    values = np.random.default_rng(0).normal(0, 3, 4096).astype(np.float32)
    values[:4] = [1.00390625, 1.01171875, -2.0, 0.0]  # exact halfway cases, both ways
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(to_bfloat16_bits(values), expected)


def test_export_refuses_a_non_empty_destination_and_an_unknown_dtype(tiny_checkpoint, tmp_path):
    from arbor_weights.export import export_hf

    checkpoint = tiny_checkpoint()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(UsageError, match="not an empty directory"):
        export_hf(checkpoint, tmp_path / "full")
    with pytest.raises(UsageError, match="bfloat16 or float32"):
        export_hf(checkpoint, tmp_path / "new", dtype="int4")
    with pytest.raises(UsageError, match="no tokenizer"):
        export_hf(checkpoint, tmp_path / "new")  # the tiny checkpoint has no tokenizer files
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".tmp-*"))
