"""grow_model / arbor grow: a larger model that computes what the original does."""

import numpy as np
import pytest

from arbor_core.errors import UsageError


@pytest.mark.slow
@pytest.mark.parametrize("depth, width", [(2.0, 1.0), (1.0, 1.5), (1.5, 2.0)])
def test_a_grown_default_model_gives_the_originals_logits(default_checkpoint, tmp_path, depth, width):
    import arbor_cli
    from arbor_cli.cli.grow import grow_model

    model = arbor_cli.load(str(default_checkpoint.path), dtype="float32", quiet=True)
    grown = grow_model(model, depth=depth, width=width, destination=tmp_path / "grown")
    config = grown.config
    assert config.num_hidden_layers == round(30 * depth) and config.intermediate_size == round(1536 * width)
    assert config.num_attention_heads == 9 * (int(width) if width.is_integer() else 1)
    assert grown.num_parameters() > model.num_parameters()
    for prompt in ("The lighthouse keeper climbed the stairs at dusk and lit the great lamp, as every night.",
                   "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)"):
        ids = model.tokenizer.encode(prompt)
        ours, theirs = grown.logits(ids), model.logits(ids)
        assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) <= 1e-5


def test_the_cli_prints_parameters_before_and_after_and_the_path(tiny_checkpoint, tmp_path):
    import shutil
    import subprocess
    import sys

    checkpoint = tiny_checkpoint()
    src = tmp_path / "src"
    shutil.copytree(checkpoint.path, src)
    done = subprocess.run([sys.executable, "-m", "arbor_cli", "grow", str(src), str(tmp_path / "big"), "--depth", "2",
                           "--width", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "big") and "parameters" in done.stderr and "→" in done.stderr
    bad = subprocess.run([sys.executable, "-m", "arbor_cli", "grow", str(src), str(tmp_path / "small"), "--depth",
                          "0.5"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "at least 1" in bad.stderr and bad.stderr.count("\n") == 1


def test_split_neurons_get_unequal_shares_so_training_can_tell_them_apart(tiny_checkpoint):
    from arbor_weights.grow import grow_state, read_float_state

    checkpoint = tiny_checkpoint()
    state = read_float_state(checkpoint)
    grown, config = grow_state(state, checkpoint.config, width=2.0)
    down = grown["model.layers.0.mlp.down_proj.weight"]
    original = state["model.layers.0.mlp.down_proj.weight"]
    gate, inner = grown["model.layers.0.mlp.gate_proj.weight"], checkpoint.config.intermediate_size
    copy = next(j for j in range(inner, 2 * inner) if np.array_equal(gate[j], gate[0]))  # a copy of neuron 0
    assert np.allclose(down[:, 0] + down[:, copy], original[:, 0], atol=1e-6)
    assert not np.allclose(down[:, 0], down[:, copy])


def test_growth_only_grows(tiny_checkpoint):
    from arbor_weights.grow import grow_state, read_float_state

    checkpoint = tiny_checkpoint()
    with pytest.raises(UsageError, match="at least 1"):
        grow_state(read_float_state(checkpoint), checkpoint.config, depth=0.5)
