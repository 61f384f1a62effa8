#!/usr/bin/env bash
# The long-context adapter of the default model (issue 15), trained on one lent GPU.
#   here, once:  bash benchmarks/passkey_run.sh prepare   (build/long-context: KJV text, public domain, Debian)
#                split -b 50M -d SmolLM2-135M-Instruct.Q4_1.gguf .device-cache/gguf.part
#   call 1 (carry .whl, .device-cache/gguf.part00):                        bash benchmarks/long_adapter_gpu.sh 1
#   call 2 (carry .whl, .device-cache/gguf.part01, build/long-context):    bash benchmarks/long_adapter_gpu.sh 2
#   then, on the same warm machine: bash benchmarks/long_adapter_eval.sh (ADAPTER=/tmp/adapter)
# Call 2: peak memory with and without gradient checkpointing (2 steps each at SEQ; MEMORY=0 skips it),
# then LoRA training for STEPS steps (or as many as fit TRAIN_S seconds, from the first run's speed);
# the adapter lands in $OUT and /tmp/adapter as soon as it is trained.
set -uo pipefail
stage=${1:-2}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SEQ=${SEQ:-32768}; ROPE=${ROPE:-yarn:16}; RANK=${RANK:-16}; LR=${LR:-2e-4}; TRAIN_S=${TRAIN_S:-210}
LENGTHS=${LENGTHS:-32k,64k,128k}; PPL_LENGTHS=${PPL_LENGTHS:-8k,64k,128k}; BF16=${BF16---bf16}  # BF16= for a CPU dry run
DATA="build/long-context/kjv_pentateuch.txt build/long-context/kjv_new_testament.txt"
for part in .device-cache/gguf.part*; do [ -f "$part" ] && cp "$part" /tmp/; done
[ "$stage" = 1 ] && { ls -la /tmp/gguf.part*; exit 0; }
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD:$PWD/core:$PWD/backends:$PWD/weights:/tmp/site PYTHONUNBUFFERED=1 ARBOR_HOME=${ARBOR_HOME:-/tmp/arbor}
mkdir -p "$ARBOR_HOME/downloads"
gguf=$ARBOR_HOME/downloads/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$gguf" ] || [ ! -f /tmp/gguf.part00 ] || cat /tmp/gguf.part00 /tmp/gguf.part01 > "$gguf"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
train() {  # $1: out dir, $2: steps, rest: extra flags
  local dir=$1 steps=$2; shift 2
  python3 -m arbor_cli train $DATA --out "$dir" --seq-len "$SEQ" --rope "$ROPE" --lora "$RANK" --lr "$LR" \
    --steps "$steps" --warmup $(( steps / 10 + 1 )) --save-every "${SAVE_EVERY:-100}" $BF16 "$@" 2>&1 | tail -2
}
if [ "${MEMORY:-1}" = 1 ]; then
  for mode in checkpointing plain; do  # peak memory of 2 steps, with and without per-block recomputation
    flag=(); [ "$mode" = checkpointing ] && flag=(--grad-checkpointing)
    rm -rf "/tmp/mem-$mode"; train "/tmp/mem-$mode" 2 "${flag[@]}"
    tail -1 "/tmp/mem-$mode/log.jsonl" | sed "s/^/$mode: /" | tee -a "$OUT/memory.txt"
  done
fi
if [ -n "${STEPS:-}" ]; then
  steps=$STEPS
else  # the step time of the memory run (MEMORY=1) sizes the training to TRAIN_S
  [ -f /tmp/mem-checkpointing/log.jsonl ] || { echo "MEMORY=0 needs STEPS=N" >&2; exit 2; }
  per_step=$(python3 -c "import json; r=[json.loads(l) for l in open('/tmp/mem-checkpointing/log.jsonl')]; print(r[-1]['elapsed_s'] - r[0]['elapsed_s'])")
  steps=$(python3 -c "print(max(10, int($TRAIN_S / max($per_step, 0.01))))")
fi
echo "training $steps steps of $SEQ tokens, rope $ROPE, LoRA $RANK, lr $LR" | tee "$OUT/train.txt"
t0=$(date +%s)
train /tmp/adapter "$steps" --grad-checkpointing | tee -a "$OUT/train.txt"
echo "trained in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/train.txt"
cp /tmp/adapter/log.jsonl "$OUT/train_log.jsonl"; cp /tmp/adapter/adapter.json /tmp/adapter/adapter.safetensors "$OUT/" 2>/dev/null
ls -la "$OUT"
