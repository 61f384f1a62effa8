#!/bin/bash
# The compiled decode step's cost and gain where a user meets it (issue 32; docs/performance.md, "The compiled decode
# step pays for itself"): the README's chat example and `arbor generate` of N tokens, whole-command wall seconds in
# fresh processes, alternating ARBOR_COMPILE=0 / AFTER's default / BEFORE's default, with the load average.
#
#     benchmarks/compiled_step_ab.sh BEFORE AFTER [ROUNDS] [TOKENS...]     (default: 1 round, 200 and 1000 tokens)
#
# Both trees use the same compiled step (it must exist: run one generation first, or ARBOR_COMPILE=sync).
set -u
BEFORE=$1; AFTER=$2; ROUNDS=${3:-1}; shift 3 2>/dev/null || shift $#
TOKENS=${*:-200 1000}
PY=${PYTHON:-python}
Q="What is the capital of France? Answer in one sentence."
P="The history of the city of Paris"
out=$(mktemp -d)
run() {  # side tree compile command...
  local side=$1 tree=$2 mode=$3; shift 3
  local start end
  start=$(date +%s.%N)
  PYTHONPATH=$tree:$tree/core:$tree/backends:$tree/weights ARBOR_COMPILE=$mode NO_COLOR=1 "$@" >"$out/out" 2>"$out/err"
  end=$(date +%s.%N)
  printf "%-10s %-7s wall %7.2f s  load %s  %s\n" "$CASE" "$side" "$(echo "$end - $start" | bc)" \
    "$(cut -d' ' -f1 /proc/loadavg)" "$(head -c 70 "$out/out" | tr '\n' ' ')"
}
for round in $(seq "$ROUNDS"); do
  for CASE in chat $(printf "gen%s " $TOKENS); do
    for side in eager after before; do
      case $side in eager) tree=$AFTER mode=0;; after) tree=$AFTER mode=1;; before) tree=$BEFORE mode=1;; esac
      if [ "$CASE" = chat ]; then
        run $side "$tree" $mode sh -c "echo '$Q' | $PY -m arbor_cli chat"
      else
        run $side "$tree" $mode $PY -m arbor_cli generate -n "${CASE#gen}" "$P"
      fi
    done
  done
done
rm -rf "$out"
