"""What a JSON schema's token mask costs per token on this machine (arbor_cli/constrained.py).

Loads the default model as `arbor` does (CPU: int4 + the compiled decode step), answers PROMPTS under each
schema of SCHEMAS (greedy), then replays each answer's tokens through a fresh TokenConstraint, timing the
mask (llguidance's bitmask, unpacked to bool [vocab]) and the consume per token; times the backend applying
the mask to a [vocab] logits tensor; and sets constrained decode tok/s beside unconstrained (the same
prompts, each run to the constrained answer's length with ignore_eos) from the generations' own timings.
Prints one JSON object. Usage: python benchmarks/schema_mask_cost.py [MODEL]
"""

import json
import statistics
import sys
import time

import numpy as np

import arbor_cli
from arbor_cli.constrained import TokenConstraint, schema_text

SCHEMAS = [
    {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
     "properties": {"name": {"type": "string", "pattern": "^[A-Z][a-z]+$"},
                    "age": {"type": "integer", "minimum": 18, "maximum": 99}, "city": {"type": "string"}}},
    {"type": "object", "additionalProperties": False, "required": ["colours"],
     "properties": {"colours": {"type": "array", "minItems": 2, "maxItems": 4, "items": {"type": "string"}}}},
    {"type": "object", "additionalProperties": False, "required": ["mood", "reason"],
     "properties": {"mood": {"enum": ["happy", "sad", "angry"]}, "reason": {"type": "string", "maxLength": 80}}},
]
PROMPTS = ["Describe a person you know.", "Tell me about your favourite things.", "How do you feel today?"]


def main() -> None:
    model = arbor_cli.load(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m-instruct", quiet=True)
    model.generate("Hi", max_new_tokens=2, ignore_eos=True)  # warm: the compiled step, the tokenizer trie
    mask_us, consume_us, masked_rates, plain_rates, tokens = [], [], [], [], 0
    for schema in SCHEMAS:
        text = schema_text(schema)
        for prompt in PROMPTS:
            messages = [{"role": "user", "content": prompt + " Answer in JSON."}]
            r = model.chat(messages, max_new_tokens=150, schema=schema)
            json.loads(r.text)  # an answer that does not parse is a bug: let it raise
            plain = model.chat(messages, max_new_tokens=len(r.tokens), ignore_eos=True)
            masked_rates.append(r.timings["decode_tokens_per_s"])
            plain_rates.append(plain.timings["decode_tokens_per_s"])
            constraint = TokenConstraint(model.tokenizer, text)
            for token in r.tokens:
                t0 = time.perf_counter()
                constraint.allowed()
                t1 = time.perf_counter()
                constraint.consume(token)
                t2 = time.perf_counter()
                mask_us.append((t1 - t0) * 1e6)
                consume_us.append((t2 - t1) * 1e6)
            tokens += len(r.tokens)
    apply_us = backend_apply_us(model)
    print(json.dumps({
        "vocab": model.tokenizer.vocab_size, "tokens": tokens,
        "mask_median_us": round(statistics.median(mask_us), 1),
        "mask_p90_us": round(float(np.percentile(mask_us, 90)), 1),
        "consume_median_us": round(statistics.median(consume_us), 1),
        "backend_apply_median_us": round(apply_us, 1),
        "constrained_decode_tok_s": round(statistics.median(masked_rates), 1),
        "unconstrained_decode_tok_s": round(statistics.median(plain_rates), 1),
    }))


def backend_apply_us(model) -> float:
    """The backend's share: masking [vocab] logits and picking greedily, minus the pick alone."""
    from arbor_core.backend import SamplingParams

    logits = model.lm.prefill(model.tokenizer.encode("Hi"), model.lm.new_cache(16), 16)
    allowed = np.zeros(len(logits), dtype=bool)
    allowed[::7] = True
    rng, params = model.lm.new_rng(0), SamplingParams()
    runs = []
    for mask in (allowed, None):
        times = []
        for _ in range(300):
            t0 = time.perf_counter()
            model.lm.sample(logits, params, rng, [], allowed=mask) if mask is not None else \
                model.lm.sample(logits, params, rng, [])
            times.append(time.perf_counter() - t0)
        runs.append(statistics.median(times) * 1e6)
    return runs[0] - runs[1]


if __name__ == "__main__":
    main()
