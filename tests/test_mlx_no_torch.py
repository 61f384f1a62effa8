"""The MLX path never imports torch: a machine with only `mlx` installed runs `arbor` on it.

Each check runs in a fresh interpreter that sees this environment's packages *except* torch
(a site directory of links to everything else, so torch is absent as on a Mac with only mlx),
with a tripwire on the import system that reports every attempt to import `torch` or `torch.*`
and where it came from, even one a `try/except ImportError` would swallow. (Asking whether torch
is installed, `importlib.util.find_spec("torch")` as the backend seam does, is not an import.)
"""

import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("mlx.core")

TORCH_ENTRIES = ("torch", "torchgen", "functorch", "triton")  # and their *.dist-info

TRIPWIRE = textwrap.dedent("""
    import sys, site, traceback

    class TorchTripwire:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                stack = traceback.extract_stack()[:-1]
                util = ("importlib.util>", "importlib/util.py")  # importlib.util.find_spec only looks
                if not any(f.name == "find_spec" and f.filename.endswith(util) for f in stack):
                    frames = [f for f in stack if "importlib" not in f.filename]
                    where = f" from {{frames[-1].filename}}:{{frames[-1].lineno}}" if frames else ""
                    sys.stderr.write(f"TORCH-IMPORT {{name}}{{where}}\\n")
            return None  # torch is not in this interpreter's site: the import then fails as on a torch-less machine

    sys.meta_path.insert(0, TorchTripwire())
    site.addsitedir({site_dir!r})

    def _check_at_exit():
        if any(m == "torch" or m.startswith("torch.") for m in sys.modules):
            sys.stderr.write("TORCH-IMPORT torch is in sys.modules at exit\\n")

    import atexit
    atexit.register(_check_at_exit)
""")

API_RUN = textwrap.dedent("""
    import arbor_cli
    m = arbor_cli.load({path!r}, backend="mlx", device="cpu", quiet=True)
    result = m.generate("The capital of France is", max_new_tokens=8)
    print(result.text)
    assert m.backend == "mlx" and m.dtype == "float32"
""")

CLI_RUN = textwrap.dedent("""
    import runpy
    sys.argv = ["arbor", *{argv!r}]
    runpy.run_module("arbor_cli", run_name="__main__", alter_sys=True)
""")


@pytest.fixture(scope="module")
def site_without_torch(tmp_path_factory) -> Path:
    """A site directory linking every installed package but torch (and what only torch uses)."""
    purelib = Path(sysconfig.get_paths()["purelib"])
    site_dir = tmp_path_factory.mktemp("site-without-torch")
    for entry in purelib.iterdir():
        if entry.name.split("-")[0] not in TORCH_ENTRIES:
            (site_dir / entry.name).symlink_to(entry)
    return site_dir


def run_without_torch(site_dir: Path, body: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # -S: no site-packages of its own; the tripwire adds the torch-less site directory
    return subprocess.run([sys.executable, "-S", "-c", TRIPWIRE.format(site_dir=str(site_dir)) + body],
                          input=stdin, capture_output=True, text=True, timeout=600, check=False,
                          env={**env, "NO_COLOR": "1"})


def assert_ran_without_torch(r: subprocess.CompletedProcess) -> None:
    attempts = [line for line in r.stderr.splitlines() if line.startswith("TORCH-IMPORT")]
    assert not attempts, "torch was imported on the MLX path:\n" + "\n".join(attempts)
    assert r.returncode == 0, r.stderr[-2000:]


def test_torch_is_absent_and_attempts_are_reported(site_without_torch):
    r = run_without_torch(site_without_torch, "import mlx.core, arbor_cli\nimport torch\n")
    assert isinstance(r, subprocess.CompletedProcess) and r.returncode != 0
    assert "ModuleNotFoundError: No module named 'torch'" in r.stderr
    assert "TORCH-IMPORT torch from <string>" in r.stderr


def test_auto_picks_mlx_and_torch_is_a_clear_error_without_torch(site_without_torch):
    body = textwrap.dedent("""
        from arbor_cli.backends import select_backend
        from arbor_core.errors import BackendUnavailableError
        print(select_backend("auto").NAME)
        try:
            select_backend("torch")
        except BackendUnavailableError as e:
            print("refused:", e)
    """)
    r = run_without_torch(site_without_torch, body)
    assert_ran_without_torch(r)
    refusal = "refused: backend 'torch' is not installed here; pip install 'arbor-cli[torch]'"
    assert r.stdout.splitlines() == ["mlx", refusal]


@pytest.mark.slow
def test_the_api_loads_and_generates_without_torch(site_without_torch, default_checkpoint):
    r = run_without_torch(site_without_torch, API_RUN.format(path=str(default_checkpoint.path)))
    assert_ran_without_torch(r)
    assert "Paris" in r.stdout


@pytest.mark.slow
def test_arbor_generate_runs_without_torch(site_without_torch, default_checkpoint):
    argv = ["generate", "The capital of France is", "-n", "8", "--model", str(default_checkpoint.path),
            "--backend", "mlx", "--device", "cpu"]
    r = run_without_torch(site_without_torch, CLI_RUN.format(argv=argv))
    assert_ran_without_torch(r)
    assert "Paris" in r.stdout


@pytest.mark.slow
def test_arbor_chat_runs_without_torch_on_the_automatic_backend(site_without_torch, default_checkpoint):
    argv = ["chat", "--max-tokens", "24", "--model", str(default_checkpoint.path)]  # no --backend: auto finds mlx
    r = run_without_torch(site_without_torch, CLI_RUN.format(argv=argv), stdin="What is the capital of France?\n")
    assert_ran_without_torch(r)
    assert "Paris" in r.stdout
