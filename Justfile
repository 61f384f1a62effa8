# arbor's everyday commands; each is a thin wrapper over what the README documents.

# install arbor with its test and dev tools (CPU torch pinned: an unpinned torch pulls a CUDA build)
setup:
    python -m pip install torch==2.13.0
    python -m pip install -e ".[dev]"

# the whole test suite (the README's test command)
test *ARGS:
    python -m pytest -q {{ARGS}}

# fast tests only: no default-model download, no long runs
test-fast *ARGS:
    python -m pytest -q -m "not slow" {{ARGS}}

# the pictures in docs/, redrawn from the committed --json results (needs the plot extra)
figures:
    arbor plot passkey docs/bench/long-context/passkey_repeat.json -o docs/figures/passkey_repeat.png --machine "NVIDIA H100 80GB HBM3"
    arbor plot passkey docs/bench/long-context/passkey_prose.json -o docs/figures/passkey_prose.png --machine "NVIDIA H100 80GB HBM3"
    arbor plot ppl docs/bench/long-context/ppl.json -o docs/figures/ppl.png --machine "NVIDIA H100 80GB HBM3"
    arbor plot passkey docs/bench/ask/h200_passkey_repeat.json -o docs/figures/ask_passkey_repeat_h200.png --machine "NVIDIA H200"
    arbor plot bench docs/bench/h100/bench_135m.json -o docs/figures/bench_135m_h100.png --machine "NVIDIA H100 80GB HBM3"

lint:
    ruff check core arbor_cli backends weights tests scripts

# README.md's example outputs rewritten from the real commands (--quick: skip the blocks that take minutes;
# --check: say which blocks differ, write nothing; --only TEXT: the blocks whose commands contain TEXT)
readme *ARGS:
    python scripts/readme_outputs.py {{ARGS}}

# what arbor does, on the default model
demo:
    echo "What is the capital of France?" | arbor chat
    arbor summarize README.md
    arbor info
