#!/usr/bin/env bash
# A/B speed check on a GPU: benchmarks/gpu_bench.py of this tree against an older tree (e.g. the commit
# before a refactor, unpacked with `git archive COMMIT arbor_cli core backends weights benchmarks`), alternating
# runs in one session on random weights of the SmolLM2-135M shape, so the two are measured side by side.
#   benchmarks/ab_gpu.sh OLD_TREE [ROUNDS] [CONTEXTS]   (extra packages: EXTRA_SITE=dir on PYTHONPATH)
set -uo pipefail
old=$(cd "$1" && pwd); rounds=${2:-2}; contexts=${3:-4k,32k,128k}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
new=$PWD
site=${EXTRA_SITE:-}
for round in $(seq "$rounds"); do
  for side in new old; do
    tree=$new; [ "$side" = old ] && tree=$old
    PYTHONPATH=$tree:$tree/core:$tree/backends:$tree/weights${site:+:$site} python3 "$tree/benchmarks/gpu_bench.py" \
      --random-shape smollm2-135m --contexts "$contexts" --json "$OUT/ab_${side}_$round.json" 2>/dev/null \
      | tail -n +1 > "$OUT/ab_${side}_$round.txt"
    echo "== $side round $round"; cat "$OUT/ab_${side}_$round.txt"
  done
done
