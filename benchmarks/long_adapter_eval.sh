#!/usr/bin/env bash
# The long-context adapter measured on held-out text (issue 15): the adapter trained by long_adapter_gpu.sh
# (on Genesis-Deuteronomy and the New Testament) merged into the default model, then perplexity on
# Joshua-Malachi (KJV, never seen in training) beside the base model's, and passkey retrieval, 8 trials.
#   call 1 (carry .whl, .device-cache/gguf.part00):                       bash benchmarks/long_adapter_eval.sh 1
#   call 2 (carry .whl, .device-cache/gguf.part01, build/long-context):   bash benchmarks/long_adapter_eval.sh 2
#   (build/long-context/adapter/ holds adapter.json and adapter.safetensors)
set -uo pipefail
stage=${1:-2}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
HELD_OUT=build/long-context/kjv_prophets.txt
for part in .device-cache/gguf.part*; do [ -f "$part" ] && cp "$part" /tmp/; done
[ "$stage" = 1 ] && { ls -la /tmp/gguf.part*; exit 0; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=$PWD:$PWD/backends:$PWD/weights:/tmp/site PYTHONUNBUFFERED=1 ARBOR_HOME=/tmp/arbor
mkdir -p /tmp/arbor/downloads
gguf=/tmp/arbor/downloads/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$gguf" ] || cat /tmp/gguf.part00 /tmp/gguf.part01 > "$gguf"
python3 -c "
import arbor_weights
from arbor_weights.adapter import merge_adapter
print(merge_adapter(arbor_weights.resolve('smollm2-135m-instruct', quiet=True), 'build/long-context/adapter', '/tmp/merged'))"
python3 -m arbor_cli eval passkey --model /tmp/merged --lengths 8k,32k,64k,128k --trials 8 --json \
  > "$OUT/passkey_adapter8.json" 2>/dev/null &
python3 -m arbor_cli eval passkey --model /tmp/merged --lengths 16k,32k --trials 8 --prose "$HELD_OUT" --json \
  > "$OUT/passkey_adapter_prose.json" 2>/dev/null &
python3 -m arbor_cli eval ppl "$HELD_OUT" --model /tmp/merged --lengths 8k,64k,128k --json > "$OUT/ppl_adapter.json" 2>/dev/null &
python3 -m arbor_cli eval ppl "$HELD_OUT" --lengths 8k,64k,128k --json > "$OUT/ppl_base.json" 2>/dev/null &
wait
for f in passkey_adapter8 passkey_adapter_prose; do grep -o '"accuracy": {[^}]*}}' "$OUT/$f.json" | sed "s/^/$f: /"; done
for f in ppl_adapter ppl_base; do python3 -c "import json; r=json.load(open('$OUT/$f.json')); print('$f', [(x['length'], x['perplexity']) for x in r['rows']])"; done
