"""Pulling `hf:ORG/NAME` from the Hugging Face Hub: a HF checkpoint is already in arbor's format,
so this is a filtered snapshot download and nothing else. huggingface_hub is an optional extra.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from arbor_core.errors import PullError, UsageError

from .progress import Reporter

# Weights, configs, tokenizers; never pickles, and not the duplicate "consolidated" or original/
# copies some repos carry (they would double the download).
ALLOW_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model"]
IGNORE_PATTERNS = ["consolidated*", "original/*"]


def parse_repo_id(spec: str) -> str:
    """'hf:ORG/NAME' -> 'ORG/NAME'."""
    repo_id = spec.removeprefix("hf:").strip()
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise UsageError(f"{spec!r} is not a Hub model: write hf:ORG/NAME, e.g. hf:HuggingFaceTB/SmolLM2-135M")
    return repo_id


def install_name(repo_id: str) -> str:
    """The cache directory name for a Hub repo, in the Hub cache's own ORG--NAME style."""
    return repo_id.replace("/", "--")


def download_snapshot(repo_id: str, dest: Path, *, reporter: Reporter) -> None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise PullError("hf: models need huggingface_hub: pip install 'arbor-cli[hub]'") from None
    with reporter.stage(f"downloading hf:{repo_id} from the Hugging Face Hub"):
        try:
            snapshot_download(repo_id, local_dir=dest, allow_patterns=ALLOW_PATTERNS,
                              ignore_patterns=IGNORE_PATTERNS)
        except Exception as e:  # noqa: BLE001 - the hub raises a different class per failure and per version
            raise PullError(describe_hub_error(repo_id, e)) from None
    shutil.rmtree(dest / ".cache", ignore_errors=True)  # the hub's download bookkeeping, not model files


def describe_hub_error(repo_id: str, error: Exception) -> str:
    kind, text = type(error).__name__, str(error).splitlines()[0] if str(error) else ""
    if kind == "OfflineModeIsEnabled" or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return f"cannot download hf:{repo_id}: the Hub is offline (HF_HUB_OFFLINE is set); unset it or use a local path"
    if kind == "GatedRepoError":
        return f"hf:{repo_id} is gated: accept its license on huggingface.co, then log in (`hf auth login`)"
    if kind == "RepositoryNotFoundError":
        return f"hf:{repo_id} does not exist on the Hugging Face Hub (or is private: log in with `hf auth login`)"
    if kind in ("LocalEntryNotFoundError", "ConnectError", "ConnectionError", "ConnectTimeout"):
        return f"cannot download hf:{repo_id}: huggingface.co is unreachable (offline?); check the network and retry"
    return f"cannot download hf:{repo_id}: {kind}: {text}"
