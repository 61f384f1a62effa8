"""Loading a model: a registry name, `hf:ORG/NAME` or a path, validated options, a backend, the
long-context adapter where --rope auto asks for one; the result is a Model (model.py)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from arbor_cli.backends import backend_module, choose_backend
from arbor_core.errors import UsageError
from arbor_core.rope import resolve_method

from .model import DTYPES, KV_BITS, MAX_CONTEXT, QUANTIZE, Model


def load(model: str | None = None, backend: str | None = None, device: str | None = None, dtype: str | None = None,
         context: int | None = None, quiet: bool = False, rope: str = "auto", kv_bits: int = 16,
         quantize: str | None = None) -> Model:
    """Load a model by registry name, `hf:ORG/NAME`, or path (HF dir, Arbor dir, .gguf file).

    kv_bits: 16 keeps the KV cache in the model's dtype; 8 stores it as int8 with a float16 scale
    per head and token, about half the memory of a 16-bit cache (docs/long-context.md).
    quantize: "int8" (per output channel) or "int4" (groups of 32) quantizes float Linear weights at load
    time for faster CPU decode (docs/performance.md). With neither quantize nor dtype, the backend picks:
    on a CPU a model stored with 4-bit layers (a Q4 GGUF) runs them as int4 with a compiled decode step;
    dtype="float32" asks for the exact float path instead.
    """
    import arbor_weights

    if context is not None and (not isinstance(context, int) or not 16 <= context <= MAX_CONTEXT):
        raise UsageError(f"--context must be an integer in 16..{MAX_CONTEXT}, got {context!r}")
    if quantize is not None and quantize not in QUANTIZE:
        raise UsageError(f"--quantize must be {' or '.join(QUANTIZE)}, got {quantize!r}")
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if kv_bits not in KV_BITS or isinstance(kv_bits, bool):
        raise UsageError(f"--kv-bits (kv_bits) must be one of {', '.join(map(str, KV_BITS))}, got {kv_bits!r}")
    try:
        resolve_method(rope)
    except ValueError as e:
        raise UsageError(str(e)) from None
    backend = choose_backend(backend)  # a bad --backend fails before any model is fetched
    checkpoint = arbor_weights.resolve(model or arbor_weights.default_model(), quiet=quiet)
    longer = arbor_weights.LONG_VARIANTS.get(checkpoint.name)
    if longer and rope == "auto" and context is not None and context > checkpoint.config.trained_context:
        # --rope auto beyond the trained context: the model's long-context adapter, where arbor ships one
        from arbor_weights.progress import Reporter

        from arbor_weights.store import installed_path

        if installed_path(longer) is None:
            # installing the long variant writes its whole checkpoint (517 MB for the 135M model): a --context
            # that cannot fit is refused first, planned on the model it is built from (the same shapes and dtypes)
            _open(checkpoint, backend, device, dtype, kv_bits, quantize, context, rope).plan(context)
        Reporter(quiet=quiet).note(f"context {context:,} is beyond {checkpoint.name}'s trained "
                                   f"{checkpoint.config.trained_context:,} tokens: using {longer} (its long-context "
                                   "adapter; --rope yarn keeps the plain model)")
        checkpoint = arbor_weights.resolve(longer, quiet=quiet)
    m = _open(checkpoint, backend, device, dtype, kv_bits, quantize, context, rope)
    if context is not None:
        m.plan(context)  # refuse at load time a --context that cannot fit
    return m


def _open(checkpoint, backend: str, device, dtype, kv_bits: int, quantize, context, rope: str) -> Model:
    """The checkpoint loaded on the backend, with its tokenizer, as a Model."""
    from arbor_core.tokenizer import load_tokenizer

    # The tokenizer is parsed on a second thread while the backend imports (tokenizers releases the GIL):
    # parsing a 151K-token tokenizer.json took 0.35 s of a start, importing torch 1.4 s
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="arbor-tokenizer") as pool:
        tokenizer = pool.submit(load_tokenizer, checkpoint.path)
        module = backend_module(backend)
        lm = module.load(checkpoint, device=device, dtype=dtype, kv_bits=kv_bits, quantize=quantize)
        return Model(checkpoint, lm, tokenizer.result(), module.NAME, context=context, rope_method=rope)
