"""Hugging Face transformers as the peer `arbor bench --vs hf` measures beside arbor, on the same
checkpoint directory (config.json + safetensors are HF's format), in the same process. It lives
with the torch backend because it needs torch; arbor_cli reaches it through the backend seam."""

from __future__ import annotations

import time

import torch

from arbor_core.bench_rows import DECODE_TOKENS, BenchRow, prompt_for

from .load_quantized import dequantized_state


def hf_model(checkpoint, device: str, dtype: str):
    """transformers' model of the checkpoint, eager with SDPA attention. Weights kept as GGUF blocks
    (arbor_weights/quantized.py) are names transformers does not know: they are dequantized exactly
    and loaded into a model built from config.json."""
    import transformers  # a test/bench dependency, not arbor's
    from safetensors.torch import load_file

    options = {"dtype": getattr(torch, dtype), "attn_implementation": "sdpa"}
    if checkpoint.quantization is None:
        return transformers.AutoModelForCausalLM.from_pretrained(checkpoint.path, **options).to(device).eval()
    state = {}
    for path in checkpoint.weight_files:
        state.update(load_file(str(path)))
    config = transformers.AutoConfig.from_pretrained(checkpoint.path)
    model = transformers.AutoModelForCausalLM.from_config(config, **options)  # on the CPU: RoPE buffers are built
    model.load_state_dict(dequantized_state(state, checkpoint.path), strict=not config.tie_word_embeddings)
    model.tie_weights()
    return model.to(device).eval()


def bench(checkpoint, device: str, dtype: str, context: int, decode_tokens: int = DECODE_TOKENS,
          loaded: dict | None = None) -> BenchRow:
    """transformers eager (SDPA attention) at `context`: prefill, then greedy decode; `loaded` keeps the
    model between contexts."""
    row = BenchRow("transformers", context, context - decode_tokens - 1)
    cache = loaded if loaded is not None else {}
    if "model" not in cache:
        cache["model"] = hf_model(checkpoint, device, dtype)
    hf = cache["model"]
    ids = torch.tensor([prompt_for(hf.config.vocab_size, row.prompt_tokens)], device=device)
    if "warm" not in cache:  # as for arbor: library initialisation and kernel selection are not timed
        with torch.inference_mode():
            hf(ids[:, :1024], use_cache=True, logits_to_keep=1)
        cache["warm"] = True

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    try:
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            sync()
            t0 = time.perf_counter()
            out = hf(ids, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            sync()
            t1 = time.perf_counter()
            past = out.past_key_values
            for i in range(decode_tokens):
                if i == 1:
                    sync()
                    t2 = time.perf_counter()
                out = hf(token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                token.item()  # stream the token, as a generation loop does
            t3 = time.perf_counter()
        row.prefill_s = t1 - t0
        row.prefill_tokens_per_s = row.prompt_tokens / (t1 - t0)
        row.decode_tokens_per_s = (decode_tokens - 1) / (t3 - t2)
        if device.startswith("cuda"):
            row.peak_memory_bytes = torch.cuda.max_memory_allocated()
    except torch.OutOfMemoryError as e:
        row.error = f"out of memory ({str(e).splitlines()[0][:100]})"
    return row
