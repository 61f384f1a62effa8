"""Log-probabilities from a backend's logits, in float64 on the host (scoring a prompt, perplexity)."""

from __future__ import annotations

import numpy as np


def negative_log_likelihood(logits: np.ndarray, target: int) -> float:
    z = logits.astype(np.float64)
    top = z.max()
    return float(top + np.log(np.exp(z - top).sum()) - z[target])


def logits_to_numpy(logits) -> np.ndarray:
    """A backend's logits as numpy. Numpy's array protocol reads CPU tensors and MLX arrays; an
    accelerator tensor is first copied to the host through its `.cpu()`."""
    to_host = getattr(logits, "cpu", None)
    return np.asarray(to_host() if callable(to_host) else logits, dtype=np.float32)


def log_probs_of(z: np.ndarray, targets: list[int]) -> list[float]:
    """log p of targets[i] under the logits row z[i] ([rows, vocab]; rows past the targets are ignored)."""
    z = z[:len(targets)]
    top = z.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(z - top).sum(axis=1, dtype=np.float64))
    return (z[np.arange(len(z)), targets] - log_norm).tolist()
