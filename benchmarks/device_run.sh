#!/usr/bin/env bash
# Runs arbor's CUDA tests and GPU benchmarks on a lent H100 (see docs/performance.md).
# The device has no package index and a 64 MiB upload limit: wheels come in .whl/, and the default
# model's 98 MB GGUF in two parts (.device-cache/gguf.part00, .part01) over two calls.
#   stage 1: keep part00, run the kernel tests and a random-weight benchmark
#   stage 2: join the parts, run every CUDA test on the real model, then the benchmarks
set -uo pipefail
stage=${1:-2}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:$PWD/backends:$PWD/weights:/tmp/site PYTHONUNBUFFERED=1 ARBOR_HOME=/tmp/arbor
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
for part in .device-cache/gguf.part*; do [ -f "$part" ] && cp "$part" /tmp/; done
if [ "$stage" = 1 ]; then
  python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k split_kv 2>&1 | tee "$OUT/test_kernels.txt" | tail -5
  python3 benchmarks/gpu_bench.py --random-shape smollm2-135m --contexts 4k,32k,128k --json "$OUT/bench_135m_random.json" 2>&1 | tail -8
  exit 0
fi
mkdir -p /tmp/arbor/downloads
cat /tmp/gguf.part00 /tmp/gguf.part01 > /tmp/arbor/downloads/SmolLM2-135M-Instruct.Q4_1.gguf
sha256sum /tmp/arbor/downloads/SmolLM2-135M-Instruct.Q4_1.gguf
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_torch_backend.py 2>&1 | tee "$OUT/test_cuda.txt" | tail -15
python3 benchmarks/gpu_bench.py --contexts 4k,32k,128k --vs-hf --json "$OUT/bench_135m.json" 2>&1 | tee "$OUT/bench_135m.txt" | tail -8
python3 benchmarks/gpu_bench.py --random-shape smollm2-1.7b --contexts 4k,128k --vs-hf --json "$OUT/bench_1p7b.json" 2>&1 | tee "$OUT/bench_1p7b.txt" | tail -8
for chunk in 4096 16384 32768; do  # prefill chunk size: speed against peak memory at 128K
  ARBOR_PREFILL_CHUNK=$chunk python3 benchmarks/gpu_bench.py --random-shape smollm2-135m --contexts 128k --tokens 8 2>&1 | tail -1 | sed "s/^/chunk $chunk: /"
done | tee "$OUT/prefill_chunks.txt"
