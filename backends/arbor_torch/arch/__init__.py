"""The architecture families of the torch backend, one file each, found by config.model_type.

A family module holds its block as plain functions (embed, pre_attention, post_attention, final) that the
eager forward (model.py), the CUDA graph step (cuda_graph.py) and the compiled CPU step (decode_step.py)
all call, the facts model.py builds its modules from (NORM_OFFSET, QK_NORM, SANDWICH), which decode
strategies may run it (decode_strategies: "eager", "cuda_graph", "compiled_cpu") and the config model_types
it runs (MODEL_TYPES).
"""

from __future__ import annotations

from types import ModuleType

from arbor_core.config import ArborConfig

from . import gemma2, gemma3, llama, qwen3, smollm3

# each family module names the config model_types it runs (MODEL_TYPES), as the MLX backend's do
FAMILIES: dict[str, ModuleType] = {model_type: module for module in (llama, gemma2, gemma3, qwen3, smollm3)
                                   for model_type in module.MODEL_TYPES}


def family(config: ArborConfig) -> ModuleType:
    """The family module of config.model_type (the config accepts only the types listed here)."""
    return FAMILIES[config.model_type]
