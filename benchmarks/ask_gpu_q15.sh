#!/usr/bin/env bash
# Issue 27's tables for the Qwen2.5-Coder-1.5B Q4_K_M file on a lent GPU: the held-out RULER-style tasks
# (benchmarks/ruler_tasks.py) at 16K, 32K and 128K tokens, 8 trials each, and the real questions
# (benchmarks/ask_real_questions.py: Python's language reference, the GPL v3). Several processes share the GPU
# (a 1.5B model leaves it mostly idle); every row is also appended to a JSON-lines file as it is scored.
#   here, once: split the GGUF into .device-cache/q15/pNN (see real_models_gpu.sh) and copy this machine's
#               /usr/share/common-licenses to .device-cache/licenses (the held-out haystack is those texts:
#               the same bytes on both machines)
#   calls carrying .device-cache/q15/pNN one at a time, the first also .whl and .device-cache/licenses; then
#               bash benchmarks/ask_gpu_q15.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:$PWD/core:$PWD/backends:$PWD/weights:$PWD/benchmarks:/tmp/site PYTHONUNBUFFERED=1 ARBOR_HOME=/tmp/arbor
rm -rf /usr/share/common-licenses && cp -r .device-cache/licenses /usr/share/common-licenses
Q=/tmp/q15.gguf; cat .device-cache/q15/p* > $Q
sha256sum $Q | grep -q ^cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046 || { echo "q15 not whole"; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m arbor_cli pull $Q 2>&1 | tail -1; M=$(ls /tmp/arbor/models | grep ^q15)
LIMIT=${LIMIT:-330}
R=(timeout $LIMIT python3 benchmarks/ruler_run.py --set held-out --trials 8 --model $M --device cuda)
"${R[@]}" --lengths 16k --json "$OUT/ruler_16k.json" --rows "$OUT/rows.jsonl" > /dev/null 2> /tmp/r16.log &
"${R[@]}" --lengths 32k --json "$OUT/ruler_32k.json" --rows "$OUT/rows.jsonl" > /dev/null 2> /tmp/r32.log &
for tasks in one-key,absent multi-value count passkey; do
  "${R[@]}" --lengths 128k --tasks $tasks --json "$OUT/ruler_128k_${tasks%%,*}.json" --rows "$OUT/rows.jsonl" \
    > /dev/null 2> /tmp/r128_${tasks%%,*}.log &
done
timeout $LIMIT python3 benchmarks/ask_real_questions.py --model $M --device cuda --json "$OUT/real_questions.json" \
  > "$OUT/real_questions.txt" 2> /tmp/real.log &
wait; echo "all done at $(el)s"; cat "$OUT/real_questions.txt"
python3 - "$OUT/rows.jsonl" <<'PY'
import json, sys, collections
rows = [json.loads(l) for l in open(sys.argv[1])]
by = collections.defaultdict(list)
for r in rows: by[(r["task"], r["tokens"])].append(r)
for (task, tokens), rs in sorted(by.items()):
    print(f"{task:12} {tokens:>7} trials {len(rs)} right {sum(r['right'] for r in rs)} other {sum(r['other'] for r in rs)}")
PY
