#!/usr/bin/env bash
# Long-context quality of the default model (docs/long-context.md): passkey retrieval 2K…128K with each
# RoPE method (the papers' repeated filler, then real prose), and perplexity against context length.
#
#   here, once:   bash benchmarks/passkey_run.sh prepare
#                 writes build/long-context/kjv_pentateuch.txt (Genesis–Deuteronomy, King James Version,
#                 public domain; from Debian's bible-kjv-text: ~815 KB, ~194K tokens, real long prose)
#   on a GPU:     like device_run.sh, the 98 MB GGUF goes over in two calls (64 MiB upload limit):
#     call 1 carries .whl, .device-cache/gguf.part00:           bash benchmarks/passkey_run.sh stage1
#     call 2 carries .whl, .device-cache/gguf.part01, build/long-context:   bash benchmarks/passkey_run.sh gpu
#     call 3 (same warm machine):                                 bash benchmarks/passkey_run.sh gpu-prose
#   on a CPU (2K…8K, what docs/long-context.md lists as CPU):  bash benchmarks/passkey_run.sh cpu
set -uo pipefail
stage=${1:-gpu}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TEXT=build/long-context/kjv_pentateuch.txt
TEXT2=build/long-context/kjv_new_testament.txt
METHODS=none,linear,dynamic,yarn,auto

prepare() {
  command -v bible >/dev/null || apt-get install -y -q bible-kjv >/dev/null || exit 1
  mkdir -p build/long-context
  kjv_prose "gen1:1-deu34:12" > "$TEXT"
  kjv_prose "mat1:1-rev22:21" > "$TEXT2"
  wc -c "$TEXT" "$TEXT2"
}

kjv_prose() {  # the verses of $1 as plain prose: one paragraph per chapter, no verse numbers
  bible "$1" | python3 -c '
import re, sys
chapters, verses = [], []
for line in sys.stdin.read().splitlines():
    if re.fullmatch(r"[1-3]?\s?[A-Za-z ]+ \d+", line.strip()) and not line.startswith(" "):
        chapters.append(" ".join(verses)); verses = []   # a chapter heading: "Genesis 2"
    elif line.strip():
        verses.append(re.sub(r"^\s+\d+ ", "", line).strip())   # verse numbers off, wrapped lines joined
chapters.append(" ".join(verses))
print("\n\n".join(" ".join(c.split()) for c in chapters if c.strip()))
'
}

device_env() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD:$PWD/core:$PWD/backends:$PWD/weights:/tmp/site PYTHONUNBUFFERED=1 ARBOR_HOME=/tmp/arbor
}

passkey() {  # $1: lengths, $2: trials, $3: repeat|prose
  local prose=(); [ "$3" = prose ] && prose=(--prose "$TEXT")
  python3 -m arbor_cli eval passkey --lengths "$1" --trials "$2" --rope $METHODS "${prose[@]}" --json \
    >"$OUT/passkey_$3.json" 2> >(tee "$OUT/passkey_$3.log" >&2)
}

perplexity() {  # $1: lengths
  python3 -m arbor_cli eval ppl "$TEXT" --lengths "$1" --rope none,linear,dynamic,yarn --json \
    >"$OUT/ppl.json" 2> >(tee "$OUT/ppl.log" >&2)
}

case "$stage" in
  prepare) prepare ;;
  stage1)
    device_env
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    cp .device-cache/gguf.part00 /tmp/ ;;
  gpu)  # the papers' filler and perplexity; ~10 minutes on an H100
    device_env
    mkdir -p /tmp/arbor/downloads
    [ -f /tmp/arbor/downloads/SmolLM2-135M-Instruct.Q4_1.gguf ] ||
      cat /tmp/gguf.part00 .device-cache/gguf.part01 > /tmp/arbor/downloads/SmolLM2-135M-Instruct.Q4_1.gguf
    passkey 2k,4k,8k,16k,32k,64k,128k 8 repeat
    perplexity 2k,4k,8k,16k,32k,64k,128k ;;
  gpu-prose)  # the key hidden in real prose (after `gpu`, on the same warm machine)
    device_env
    passkey 2k,4k,8k,16k,32k,64k,128k 8 prose ;;
  cpu)
    passkey 2k,4k,8k 4 repeat
    passkey 2k,4k,8k 4 prose
    perplexity 2k,4k,8k ;;
  *) echo "usage: $0 [prepare|stage1|gpu|gpu-prose|cpu]" >&2; exit 2 ;;
esac
