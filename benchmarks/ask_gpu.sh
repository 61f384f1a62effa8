#!/usr/bin/env bash
# arbor ask on a lent GPU (issue 13; docs/long-context.md, "arbor ask"): the CUDA tests of what ask adds,
# the second question's time against the first's, and pass-key retrieval through ask at 16K-128K.
# The device has no package index and a 64 MiB upload limit (see device_run.sh): wheels in .whl/, the
# default model's GGUF in two parts over two calls on the same warm machine.
#   here, once:  bash benchmarks/passkey_run.sh prepare   (build/long-context: the KJV prose)
#                split -b 50M -d SmolLM2-135M-Instruct.Q4_1.gguf .device-cache/gguf.part
#   call 1 (carry .whl, .device-cache/gguf.part00):                         bash benchmarks/ask_gpu.sh 1
#   call 2 (carry .whl, .device-cache/gguf.part01, build/long-context):     bash benchmarks/ask_gpu.sh 2
set -uo pipefail
stage=${1:-2}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TEXT=build/long-context/kjv_pentateuch.txt
for part in .device-cache/gguf.part*; do [ -f "$part" ] && cp "$part" /tmp/; done
[ "$stage" = 1 ] && { ls -la /tmp/gguf.part*; exit 0; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:$PWD/core:$PWD/backends:$PWD/weights:/tmp/site PYTHONUNBUFFERED=1 ARBOR_HOME=/tmp/arbor
mkdir -p /tmp/arbor/downloads
gguf=/tmp/arbor/downloads/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$gguf" ] || cat /tmp/gguf.part00 /tmp/gguf.part01 > "$gguf"
sha256sum "$gguf" | tee "$OUT/gpu.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/gpu.txt"
if [ "${ARBOR_ASK_TESTS:-1}" = 1 ]; then
  python3 -m pytest -q -p no:cacheprovider tests/test_backend_contract.py tests/test_model.py tests/test_cuda.py \
    -k "every_position or log_probs or cuda" 2>&1 | tee "$OUT/test_cuda.txt" | tail -4
fi
python3 benchmarks/ask_second_question.py --prose "$TEXT" --tokens 16384 > "$OUT/ask_second_16k.json" \
  2> >(tail -3 >&2); tail -c 300 "$OUT/ask_second_16k.json"
for filler in repeat prose; do  # both at once: the 135M model leaves the GPU mostly idle
  prose=(); [ "$filler" = prose ] && prose=(--prose "$TEXT")
  python3 -m arbor_cli eval passkey --via ask --lengths 16k,32k,64k,128k --trials 8 "${prose[@]}" --json \
    > "$OUT/ask_passkey_$filler.json" 2> "$OUT/ask_passkey_$filler.log" &
done
wait
for filler in repeat prose; do grep -o '"accuracy": {[^}]*}}' "$OUT/ask_passkey_$filler.json"; done
