"""Fixtures shared across test modules."""

import pytest


@pytest.fixture(scope="session")
def default_gguf():
    """The default model's GGUF file, downloaded once into the real user cache (or $ARBOR_HOME)."""
    import arbor_weights

    return arbor_weights.default_gguf_path(quiet=True)


@pytest.fixture(scope="session")
def default_checkpoint():
    """The default model pulled and converted once, in the real user cache, so CI downloads it once."""
    import arbor_weights

    return arbor_weights.resolve(arbor_weights.DEFAULT_MODEL, quiet=True)


@pytest.fixture(scope="session")
def default_model(default_checkpoint):
    """The default model loaded once on CPU in float32 through the public API."""
    import arbor_cli

    return arbor_cli.load(str(default_checkpoint.path), backend="torch", device="cpu", dtype="float32", quiet=True)
