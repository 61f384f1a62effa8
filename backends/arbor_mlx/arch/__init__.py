"""The architectures the MLX backend runs, one module each, found by the config's `model_type` (as mlx-lm's
`_get_classes` finds `mlx_lm/models/<model_type>.py`).

An architecture module holds its family's whole block; model.py's Transformer runs any of them:
- `MODEL_TYPES`: the config model_types it runs;
- `Layer(cfg, layer)`: one decoder layer's parameters, under Hugging Face's names;
- `norm(cfg)`: the final RMSNorm;
- `embed(embed_tokens, tokens, cfg)`: token ids -> the first hidden states;
- `pre_attention(x, layer, rope, start) -> q, k, v`: the input norm, projections and RoPE;
- `post_attention(x, y, layer)`: o_proj, the residuals, the norms around and the MLP.
Attention itself (`Attention.attend`, over the layer's KV cache) is shared: layers.py.
"""

from __future__ import annotations

from types import ModuleType

from arbor_core.config import ArborConfig
from arbor_core.errors import ConfigError

from . import gemma2, gemma3, llama, qwen3, smollm3

ARCHITECTURES: dict[str, ModuleType] = {model_type: module for module in (llama, gemma2, gemma3, qwen3, smollm3)
                                        for model_type in module.MODEL_TYPES}


def architecture(config: ArborConfig) -> ModuleType:
    """The module of `config.model_type`'s block."""
    try:
        return ARCHITECTURES[config.model_type]
    except KeyError:
        raise ConfigError(f"the mlx backend has no block for model_type {config.model_type!r}; it runs "
                          f"{', '.join(sorted(ARCHITECTURES))}") from None
