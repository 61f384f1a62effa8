#!/usr/bin/env bash
# The long-context adapter measured on one lent GPU (issue 15), beside the plain model in the same run:
# the adapter (ADAPTER, default build/long-context/adapter: adapter.json + adapter.safetensors, trained by
# long_adapter_gpu.sh on Genesis-Deuteronomy and the New Testament) merged into the default model, then
#   - passkey in repeated filler, TRIALS per length (random depths), at LENGTHS, adapter and plain (--rope auto);
#   - passkey hidden in held-out prose (Joshua-Malachi, KJV, never trained on) at PROSE_LENGTHS;
#   - perplexity of the held-out text's last 256 tokens at PPL_LENGTHS, adapter and plain.
# Run after long_adapter_gpu.sh on the same warm machine (its model file and /tmp/adapter are there), or
#   call 1 (carry .whl, .device-cache/gguf.part00):                       bash benchmarks/long_adapter_eval.sh 1
#   call 2 (carry .whl, .device-cache/gguf.part01, build/long-context):   bash benchmarks/long_adapter_eval.sh 2
set -uo pipefail
stage=${1:-2}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ADAPTER=${ADAPTER:-build/long-context/adapter}; TRIALS=${TRIALS:-8}
LENGTHS=${LENGTHS:-8k,16k,32k,64k,128k}; PROSE_LENGTHS=${PROSE_LENGTHS:-16k,32k}; PPL_LENGTHS=${PPL_LENGTHS:-8k,16k,32k,64k,128k}
HELD_OUT=build/long-context/kjv_joshua_malachi.txt
for part in .device-cache/gguf.part*; do [ -f "$part" ] && cp "$part" /tmp/; done
[ "$stage" = 1 ] && { ls -la /tmp/gguf.part*; exit 0; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=$PWD:$PWD/core:$PWD/backends:$PWD/weights:/tmp/site PYTHONUNBUFFERED=1 ARBOR_HOME=${ARBOR_HOME:-/tmp/arbor}
mkdir -p "$ARBOR_HOME/downloads"
gguf=$ARBOR_HOME/downloads/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$gguf" ] || cat /tmp/gguf.part00 /tmp/gguf.part01 > "$gguf"
python3 -c "
import arbor_weights
from arbor_weights.adapter import merge_adapter
print(merge_adapter(arbor_weights.resolve('smollm2-135m-instruct', quiet=True), '$ADAPTER', '/tmp/merged'))"
ev() { local name=$1; shift; python3 -m arbor_cli eval "$@" --json > "$OUT/$name.json" 2> "$OUT/$name.log"; }
ev passkey_adapter passkey --model /tmp/merged --lengths "$LENGTHS" --trials "$TRIALS" &
ev passkey_base passkey --lengths "$LENGTHS" --trials "$TRIALS" &
ev passkey_adapter_prose passkey --model /tmp/merged --lengths "$PROSE_LENGTHS" --trials "$TRIALS" --prose "$HELD_OUT" &
ev passkey_base_prose passkey --lengths "$PROSE_LENGTHS" --trials "$TRIALS" --prose "$HELD_OUT" &
wait
ev ppl_adapter ppl "$HELD_OUT" --model /tmp/merged --lengths "$PPL_LENGTHS" &
ev ppl_base ppl "$HELD_OUT" --lengths "$PPL_LENGTHS" &
wait
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
for f in sorted(Path(sys.argv[1]).glob("p*_*.json")):
    r = json.loads(f.read_text())
    if "accuracy" in r:
        print(f.stem, r["accuracy"])
    elif "rows" in r:
        print(f.stem, [(x["length"], round(x["perplexity"], 3)) for x in r["rows"]])
PY
