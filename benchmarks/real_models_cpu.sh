#!/usr/bin/env bash
# The real-models issue's CPU table: arbor's default configuration beside llama.cpp (llama-cpp-python) on the same
# Qwen2.5-Coder GGUFs, on this machine, nothing else running: decode and 512-token prefill (cpu_bench.py, engines
# alternating, fresh random prompts each repetition) with greedy parity, resident memory chatting at 8K
# (chat_memory.py), the cached checkpoint against the GGUF, and cold start to the first token (cold_start.py).
#
#   ARBOR_HOME=/tmp/bench-home bash benchmarks/real_models_cpu.sh Q05.gguf Q15.gguf   -> build/bench/real-models/
set -uo pipefail
out=build/bench/real-models; mkdir -p "$out"
export ARBOR_HOME=${ARBOR_HOME:?set ARBOR_HOME: the models are imported there}
for gguf in "$@"; do
  name=$(basename "$gguf" .gguf)
  echo "== $name: import, then one untimed generate (compiles the decode step once)"
  arbor generate "Hi" --max-tokens 4 -m "$gguf" > /dev/null
  python benchmarks/cpu_bench.py --gguf "$gguf" --reps 5 --parity --json "$out/cpu_bench_$name.json"
  python benchmarks/chat_memory.py --gguf "$gguf" --context 8192 --json "$out/chat_memory_$name.json"
  python benchmarks/cold_start.py --model "$gguf" --reps 5 --json "$out/cold_start_$name.json"
  echo "GGUF $(stat -c %s "$gguf") bytes; cached checkpoint(s):"
  du -sb "$ARBOR_HOME"/models/* | grep -v "\.tmp"
done
