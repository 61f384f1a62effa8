#!/usr/bin/env bash
# The real-models issue's GPU half: the Qwen2.5-Coder-1.5B Q4_K_M file's long-context quality (pass keys in real
# prose through one attention pass and through `arbor ask`, 4K-32K), the CUDA tests of every architecture, and
# decode / 32K prefill of the Qwen2.5-1.5B shape (random weights) beside llama.cpp's CUDA build on the same weights.
#
#   here, once:  bash benchmarks/passkey_run.sh prepare        (build/long-context: KJV prose)
#                ARBOR_HOME=... bash ../shared/bench/llama_cpp_cuda.sh prep; then copy the 1.5B model's
#                tokenizer*.json (arbor's import of it) into .peer/ (git-ignored)
#                split -b 54525952 -d -a 2 qwen2.5-coder-1.5b-instruct.gguf .device-cache/q15/p   (21 pieces; the tree is ~10 MB)
#   on the GPU, consecutive calls on one warm machine (64 MiB a call):
#     1. carry .whl .peer build/long-context:  bash benchmarks/real_models_gpu.sh start
#        (installs the wheels; llama.cpp's CUDA build and the random 1.5B-shape GGUFs go on detached)
#     2. calls carrying .device-cache/q15/pNN one at a time (command: true)
#     3. bash benchmarks/real_models_gpu.sh passkeys   (the real file's pass keys; skipped without all pieces)
#     4. bash benchmarks/real_models_gpu.sh bench      (CUDA tests; the shape beside llama.cpp)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
export PYTHONPATH=$PWD:$PWD/core:$PWD/backends:$PWD/weights:$PWD/benchmarks:/tmp/site PYTHONUNBUFFERED=1 ARBOR_HOME=/tmp/arbor
case "${1:-}" in
start)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  mkdir -p /tmp/lc /tmp/rq15 && tar xzf .peer/llama.cpp.tgz -C /tmp/lc && cp .peer/tokenizer*.json /tmp/rq15/
  setsid bash -c '
    cd /tmp/lc && cmake -S . -B build -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=OFF \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
      -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF > /tmp/cmake.log 2>&1 \
      && cmake --build build -j 14 --target llama-bench llama-quantize > /tmp/build.log 2>&1
    echo "build rc=$?" > /tmp/build.rc' < /dev/null > /dev/null 2>&1 &
  ( cd "$PWD" && python3 -c "
from pathlib import Path; import gpu_bench
gpu_bench.random_checkpoint('qwen2.5-1.5b', Path('/tmp/rq15'))" \
    && cd /tmp/lc && PYTHONPATH=gguf-py python3 convert_hf_to_gguf.py /tmp/rq15 --outtype f16 \
       --outfile /tmp/rq15-f16.gguf > /tmp/convert.log 2>&1; echo "convert rc=$?" ) | tee "$OUT/start.txt"
  ls -la /tmp/rq15 /tmp/rq15-f16.gguf | tee -a "$OUT/start.txt"; exit 0 ;;
passkeys)
  Q=/tmp/q15.gguf; cat .device-cache/q15/p* > $Q 2>/dev/null
  sha256sum $Q | grep -q ^cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046 \
    || { echo "the real 1.5B file is not whole here ($(ls .device-cache/q15 | wc -l) pieces): pass keys skipped"; exit 0; }
  P=(python3 -m arbor_cli eval passkey -m $Q --device cuda --prose build/long-context/kjv_pentateuch.txt --trials 8 --json)
  timeout 280 "${P[@]}" --lengths 4k,8k,16k,32k --rope auto > "$OUT/q15_passkey_prose.json" 2> "$OUT/q15_passkey_prose.log"
  tail -3 "$OUT/q15_passkey_prose.log"; echo "prose done at $(el)s"
  timeout 280 "${P[@]}" --lengths 16k,32k --via ask > "$OUT/q15_passkey_ask.json" 2> "$OUT/q15_passkey_ask.log"
  tail -3 "$OUT/q15_passkey_ask.log"; echo "ask done at $(el)s"; exit 0 ;;
bench)
  echo "== CUDA tests"
  timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda.py tests/test_backend_contract.py \
    tests/test_architectures_a.py tests/test_gemma2.py tests/test_phi3.py -k "cuda" 2>&1 | tail -4 | tee "$OUT/cuda_tests.txt"
  echo "== the 1.5B shape beside llama.cpp at $(el)s"; cat /tmp/build.rc 2>/dev/null || tail -3 /tmp/build.log
  LB=/tmp/lc/build/bin/llama-bench
  if [ -x $LB ]; then
    /tmp/lc/build/bin/llama-quantize /tmp/rq15-f16.gguf /tmp/rq15-q4km.gguf Q4_K_M > /dev/null 2>&1
    timeout 120 $LB -m /tmp/rq15-f16.gguf,/tmp/rq15-q4km.gguf -ngl 99 -fa 1 -p 0 -n 128 -d 4096,32768 -r 2 -o md | tee "$OUT/lcpp_q15_tg.md"
    timeout 80 $LB -m /tmp/rq15-f16.gguf,/tmp/rq15-q4km.gguf -ngl 99 -fa 1 -p 32768 -n 0 -b 4096 -ub 4096 -r 1 -o md | tee "$OUT/lcpp_q15_pp.md"
  fi
  timeout 160 python3 benchmarks/gpu_bench.py --model /tmp/rq15 --contexts 4k,32k --json "$OUT/arbor_q15.json" 2>&1 | tail -8
  echo "done at $(el)s"; exit 0 ;;
*) echo "usage: $0 start|passkeys|bench"; exit 2 ;;
esac
