#!/usr/bin/env bash
# Issue 30 (batching) and issue 27 (the cached question) on a lent GPU, in two calls on one warm machine.
#   call 1 (carry .whl, .device-cache/smol/config.json, tokenizer.json, tokenizer_config.json, st00):
#       bash benchmarks/batch_gpu.sh batch
#     SmolLM2-135M's shape with random bf16 weights (benchmarks/gpu_bench.random_checkpoint) and its real
#     tokenizer: batch_decode.py (B sequences stepped together against one), then serve_load.py with 16 clients
#     against `arbor serve --parallel 1` and `--parallel 16` (random weights: every reply runs to --max-tokens).
#   call 2 (carry .whl, .device-cache/smol/st01, build/long-context):   bash benchmarks/batch_gpu.sh second
#     the real 135M joined from the smol pieces (ruler_gpu.sh's), ask_second_question.py --cold at 16K and 128K.
set -uo pipefail
stage=${1:?batch or second}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/pieces/smol
[ -d .device-cache/smol ] && cp .device-cache/smol/* /tmp/pieces/smol/ 2>/dev/null
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:$PWD/core:$PWD/backends:$PWD/weights:$PWD/benchmarks:/tmp/site PYTHONUNBUFFERED=1 ARBOR_HOME=/tmp/arbor
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
if [ "$stage" = batch ]; then
  R=/tmp/rand135; mkdir -p $R
  python3 - <<'PY' || exit 1
from pathlib import Path
import gpu_bench
gpu_bench.random_checkpoint("smollm2-135m", Path("/tmp/rand135"))
PY
  cp /tmp/pieces/smol/tokenizer.json /tmp/pieces/smol/tokenizer_config.json $R/
  timeout 70 python3 benchmarks/batch_decode.py --model $R --device cuda --batches 1,4,16,64 --context-tokens 4000 \
    > "$OUT/batch_decode_h100.json" 2> "$OUT/batch_decode.log"; tail -c 1500 "$OUT/batch_decode_h100.json"
  for p in 1 16; do
    timeout 60 python3 benchmarks/serve_load.py --model $R --clients 16 --requests 2 --queue-size 16 --max-tokens 128 \
      --stream --parallel $p > "$OUT/serve_parallel_${p}_h100.json" 2> "$OUT/serve_$p.log"
    tail -c 800 "$OUT/serve_parallel_${p}_h100.json"; echo
  done
  exit 0
fi
M=smollm2-135m-instruct; dir=/tmp/arbor/models/$M; mkdir -p $dir
cp /tmp/pieces/smol/*.json $dir/ && cat /tmp/pieces/smol/st* > $dir/model.safetensors
for tokens in 16384 131072; do
  timeout 200 python3 benchmarks/ask_second_question.py --prose build/long-context/kjv_pentateuch.txt --tokens $tokens \
    --model $M --device cuda --cold > "$OUT/second_question_${tokens}_h100_index.json" 2> "$OUT/second_$tokens.log"
  tail -c 700 "$OUT/second_question_${tokens}_h100_index.json"; echo
done
