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

lint:
    ruff check arbor_cli backends weights tests

# what arbor does, on the default model
demo:
    echo "What is the capital of France?" | arbor chat
    arbor summarize README.md
    arbor info
