#!/usr/bin/env bash
# The figures of docs/performance.md's "CPU default" section, in one go, on a quiet machine:
#   bash benchmarks/cpu_default_report.sh            # the default model
#   BIG=1 bash benchmarks/cpu_default_report.sh      # also the 1.7B-shaped GGUF (make_random_gguf.py first)
# Raw JSON goes to docs/bench/cpu/. Needs llama-cpp-python (the peer) and the KJV text for perplexity
# (bash benchmarks/passkey_run.sh prepare).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=docs/bench/cpu
mkdir -p "$OUT"
python benchmarks/cpu_bench.py --reps 5 --modes float32 --parity --json "$OUT/default_vs_llama_cpp.json"
python benchmarks/cold_start.py --reps 5 --json "$OUT/cold_start.json"
python benchmarks/chat_memory.py --context 8192 --json "$OUT/chat_memory.json"
for mode in default float32; do
  flag=(); [ "$mode" = float32 ] && flag=(--dtype float32)
  arbor eval ppl build/long-context/kjv_pentateuch.txt --lengths 2k --window 1024 --device cpu "${flag[@]}" --json \
    > "$OUT/ppl_$mode.json"
done
if [ "${BIG:-0}" = 1 ]; then
  big=build/bench/smollm2-1.7b-random.Q4_1.gguf
  python benchmarks/cpu_bench.py --gguf "$big" --reps 3 --decode 32 --json "$OUT/default_vs_llama_cpp_1p7b.json"
  python benchmarks/chat_memory.py --gguf "$big" --context 8192 --json "$OUT/chat_memory_1p7b.json"
fi
du -b "$(python -c 'import arbor_weights; print(arbor_weights.resolve(arbor_weights.DEFAULT_MODEL, quiet=True).path)')" \
  > "$OUT/default_model_bytes.txt"
