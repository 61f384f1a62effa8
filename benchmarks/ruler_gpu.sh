#!/usr/bin/env bash
# Issue 27's RULER-style tables (benchmarks/ruler_tasks.py, the held-out set) at 16K, 32K and 128K tokens, 8 trials
# a task, on a lent GPU, for the default model and the Qwen2.5-Coder-1.5B Q4_K_M file: one process per (length,
# task), all sharing the GPU (these models leave it mostly idle); every row is appended to a JSON-lines file as it
# is scored, so a process stopped at the time limit keeps what it did.
#   here, once:   the model's files in .device-cache (git-ignored), at most 64 MiB a call:
#                   default model: cp ~/.cache/arbor/models/smollm2-135m-instruct/*.json .device-cache/smol/ and
#                                  split -b 50000000 -d -a 2 <that dir>/model.safetensors .device-cache/smol/st
#                   1.5B:          split -b 54525952 -d -a 2 qwen2.5-coder-1.5b-instruct-q4_k_m.gguf .device-cache/q15/p
#                 cp -r /usr/share/common-licenses .device-cache/licenses   (the held-out haystack: the same bytes there)
#   calls on one warm machine, each carrying some pieces:  bash benchmarks/ruler_gpu.sh put
#   then:         bash benchmarks/ruler_gpu.sh smol|q15     (carry .whl: gguf and platformdirs wheels)
#   or:           bash benchmarks/ruler_gpu.sh second      (carry .whl, build/long-context: the default model's second
#                 question at 16K and 128K, benchmarks/ask_second_question.py --cold, the 135M from the smol pieces)
set -uo pipefail
stage=${1:?put, smol, q15 or second}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/pieces/smol /tmp/pieces/q15
for d in smol q15; do [ -d .device-cache/$d ] && cp .device-cache/$d/* /tmp/pieces/$d/ 2>/dev/null; done
[ -d .device-cache/licenses ] && rm -rf /tmp/pieces/licenses && cp -r .device-cache/licenses /tmp/pieces/licenses
if [ "$stage" = put ]; then ls /tmp/pieces/*; exit 0; fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:$PWD/core:$PWD/backends:$PWD/weights:$PWD/benchmarks:/tmp/site PYTHONUNBUFFERED=1 ARBOR_HOME=/tmp/arbor
rm -rf /usr/share/common-licenses && cp -r /tmp/pieces/licenses /usr/share/common-licenses
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
if [ "$stage" = smol ] || [ "$stage" = second ]; then
  M=smollm2-135m-instruct; dir=/tmp/arbor/models/$M; mkdir -p $dir
  cp /tmp/pieces/smol/*.json $dir/ && cat /tmp/pieces/smol/st* > $dir/model.safetensors
else
  Q=/tmp/q15.gguf; cat /tmp/pieces/q15/p* > $Q
  sha256sum $Q | grep -q ^cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046 || { echo "q15 not whole"; exit 1; }
  python3 -m arbor_cli pull $Q 2>&1 | tail -1; M=$(ls /tmp/arbor/models | grep cc324af0)
fi
if [ "$stage" = second ]; then
  for tokens in 16384 131072; do
    python3 benchmarks/ask_second_question.py --prose build/long-context/kjv_pentateuch.txt --tokens $tokens \
      --model $M --device cuda --cold > "$OUT/second_question_${tokens}_h100_index.json" 2> "$OUT/second_$tokens.log"
    tail -c 600 "$OUT/second_question_${tokens}_h100_index.json"; echo
  done
  exit 0
fi
LIMIT=${LIMIT:-540}; T0=$(date +%s); mkdir -p "$OUT/json"
for length in 16k 32k 128k; do
  for task in one-key absent multi-value count passkey; do
    timeout $LIMIT python3 benchmarks/ruler_run.py --set held-out --trials 8 --model $M --device cuda \
      --lengths $length --tasks $task --json "$OUT/${stage}_${length}_${task}.json" --rows "$OUT/${stage}_rows.jsonl" \
      > /dev/null 2> "$OUT/json/${length}_${task}.log" &
  done
done
wait; echo "all done at $(( $(date +%s) - T0 ))s"
mv "$OUT"/${stage}_*k_*.json "$OUT/json/" 2>/dev/null
(cd "$OUT/json" && tar czf "$OUT/${stage}_tables.tgz" . ) && rm -rf "$OUT/json"
python3 - "$OUT/${stage}_rows.jsonl" <<'PY'
import collections, json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
by = collections.defaultdict(list)
for r in rows:
    by[(r["task"], r["tokens"])].append(r)
for (task, tokens), rs in sorted(by.items()):
    extra = ""
    if task == "multi-value":
        extra = f" values {sum(r['found'] for r in rs)}/{sum(r['values'] for r in rs)} wrong {sum(r['wrong'] for r in rs)}"
    print(f"{task:12} {tokens:>7} trials {len(rs)} right {sum(r['right'] for r in rs)} other {sum(r['other'] for r in rs)}"
          f" not_found {sum(r['not_found'] for r in rs)}{extra} median_s {statistics.median(r['seconds'] for r in rs):.1f}")
PY
