"""Pictures of results (arbor_cli/plots.py, `arbor plot`, `--plot`): drawn from small recorded results, read back,
and checked for size, panels and series; bad result files are one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

matplotlib = pytest.importorskip("matplotlib")

PASSKEY = {
    "model": "tiny", "backend": "torch", "device": "cpu", "machine": "test CPU, 2 cores", "date": "2026-12-03",
    "filler": "repeat", "via": "attention", "lengths": [2048, 4096, 8192], "rope": ["none", "yarn"], "trials": 4,
    "results": [{"length": n, "rope": rope, "requested": rope, "depth": (i + 0.5) / 4, "found": found, "error": None}
                for rope, hit in (("none", lambda n, i: n <= 4096), ("yarn", lambda n, i: n <= 4096 or i < 2))
                for n in (2048, 4096, 8192) for i in range(4) for found in [hit(n, i)]],
}
PPL = {
    "model": "tiny", "backend": "torch", "device": "cpu", "file": "book.txt", "window": 256, "trained_context": 4096,
    "rope": ["none", "yarn", "dynamic"],
    "rows": [{"length": n, "rope": rope, "requested": rope, "perplexity": p, "error": None}
             for rope, scale in (("none", 3.0), ("yarn", 1.1), ("dynamic", 1.4))
             for n, p in ((2048, 14.0), (4096, 13.5), (8192, 13.5 * scale))],
}
BENCH = {
    "model": "tiny", "backend": "torch", "device": "cuda", "machine": "test GPU",
    "rows": [{"engine": engine, "context": n, "prefill_tokens_per_s": 1e5 / k, "decode_tokens_per_s": 800 / k,
              "peak_memory_bytes": n * 30000 * k, "error": None}
             for engine, k in (("arbor", 1), ("transformers", 3)) for n in (4096, 32768)],
}


def write(tmp_path, name, data) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_the_passkey_heatmap_has_a_panel_per_rope_method_and_the_right_cells(tmp_path):
    from arbor_cli.plots import passkey_panels, plot_passkey

    cells = passkey_panels(PASSKEY)
    assert sorted(cells) == ["none", "yarn"]
    assert cells["yarn"][(8192, 0.125)] == [True] and cells["none"][(8192, 0.125)] == [False]
    shown = plot_passkey([PASSKEY], tmp_path / "passkey.png")
    image = matplotlib.image.imread(tmp_path / "passkey.png")
    assert shown == {"panels": 2} and image.shape[2] in (3, 4) and 500 <= image.shape[1] <= 1400


def test_perplexity_lines_one_per_method_as_svg(tmp_path):
    from arbor_cli.plots import plot_ppl

    assert plot_ppl([PPL], tmp_path / "ppl.svg") == {"series": 3}
    root = ET.parse(tmp_path / "ppl.svg").getroot()
    assert root.tag.endswith("svg")
    assert sum(1 for e in root.iter() if e.get("id", "").startswith("line2d")) >= 3


def test_bench_has_three_panels_and_a_line_per_engine(tmp_path):
    from arbor_cli.plots import plot_bench

    assert plot_bench([BENCH], tmp_path / "bench.png") == {"panels": 3, "series": 2}
    assert matplotlib.image.imread(tmp_path / "bench.png").shape[1] > 800


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "arbor_cli", *args], capture_output=True, text=True, timeout=120,
                          env=env)


def test_arbor_plot_redraws_a_saved_result(tmp_path):
    done = run("plot", "passkey", write(tmp_path, "r.json", PASSKEY), "--out", str(tmp_path / "r.svg"))
    assert done.returncode == 0 and done.stdout == "" and "2 panels" in done.stderr
    assert ET.parse(tmp_path / "r.svg").getroot().tag.endswith("svg")


@pytest.mark.parametrize("content, says", [
    (json.dumps(PASSKEY)[:200], "was it cut off"),  # truncated
    (json.dumps(PPL), "is not an `arbor eval passkey --json` result"),  # another kind
    ('{"results": []}', "is not an `arbor eval passkey --json` result"),
    ("\x00\x01binary", "is not a whole JSON result"),
])
def test_a_truncated_or_foreign_result_is_one_line_and_exit_1(tmp_path, content, says):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    done = run("plot", "passkey", str(bad), "--out", str(tmp_path / "x.png"))
    assert done.returncode == 1 and says in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "x.png").exists()


def test_a_picture_other_than_png_or_svg_is_refused_before_any_work(tmp_path):
    done = run("plot", "ppl", write(tmp_path, "p.json", PPL), "--out", str(tmp_path / "p.jpg"))
    assert done.returncode == 2 and ".png or .svg" in done.stderr


def test_without_matplotlib_the_error_names_the_extra(tmp_path):
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "matplotlib.py").write_text("raise ImportError('not installed')")
    import os

    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = run("plot", "ppl", write(tmp_path, "p.json", PPL), "--out", str(tmp_path / "p.png"), env=env)
    assert done.returncode == 2 and "pip install 'arbor-cli[plot]'" in done.stderr and "Traceback" not in done.stderr


def test_eval_ppl_plot_draws_what_it_measured(tiny_checkpoint, tmp_path):
    """--plot on a real (tiny) run: the JSON on stdout and the picture of the same rows."""
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i % 50}" for i in range(3000)))
    model = tiny_checkpoint(max_position_embeddings=256)
    (model.path / "tokenizer.json").write_text(_word_tokenizer())
    done = run("eval", "ppl", str(text), "--model", str(model.path), "--lengths", "128,256", "--rope", "none,yarn",
               "--window", "32", "--json", "--plot", str(tmp_path / "ppl.png"))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["date"] and result["machine"] and len(result["rows"]) == 4
    assert (tmp_path / "ppl.png").stat().st_size > 1000


def _word_tokenizer() -> str:
    """A word-level tokenizer.json over the tiny model's 97 ids: enough to run an evaluation."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"word{i}": i + 1 for i in range(50)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str()
