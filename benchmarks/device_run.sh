#!/usr/bin/env bash
# Runs arbor's CUDA tests and GPU benchmarks on a lent H100 (see docs/performance.md).
# The device has no package index and a 64 MiB upload limit: wheels come in .whl/, and the default
# model's 98 MB GGUF in two parts (.device-cache/gguf.part00, .part01) over two calls.
#   stage 1 (carry .whl, .device-cache/gguf.part00): keep part00, run the kernel tests
#   stage 2 (carry .whl, .device-cache/gguf.part01): join the parts, every CUDA test, arbor vs transformers
#   stage 3 (carry .whl, build/long-context; same warm machine): prefill kernels, arbor bench, int8 KV
set -uo pipefail
stage=${1:-2}  # 1, 2 or 3, back to back on one warm machine
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:$PWD/core:$PWD/backends:$PWD/weights:/tmp/site PYTHONUNBUFFERED=1 ARBOR_HOME=/tmp/arbor
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
for part in .device-cache/gguf.part*; do [ -f "$part" ] && cp "$part" /tmp/; done
if [ "$stage" = 1 ]; then  # kernels only; part00 stays in /tmp for stage 2
  python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "split_kv or prefix_attention_kernels" 2>&1 | tee "$OUT/test_kernels.txt" | tail -5
  exit 0
fi
mkdir -p /tmp/arbor/downloads
[ -f /tmp/arbor/downloads/SmolLM2-135M-Instruct.Q4_1.gguf ] || cat /tmp/gguf.part00 /tmp/gguf.part01 > /tmp/arbor/downloads/SmolLM2-135M-Instruct.Q4_1.gguf
sha256sum /tmp/arbor/downloads/SmolLM2-135M-Instruct.Q4_1.gguf
if [ "$stage" = 2 ]; then  # every CUDA test on the real model, then arbor vs transformers
  python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_torch_backend.py tests/test_prefix_attention.py \
    tests/test_kv_cache.py 2>&1 | tee "$OUT/test_cuda.txt" | tail -15
  python3 benchmarks/gpu_bench.py --contexts 4k,32k,128k --vs-hf --json "$OUT/bench_135m.json" 2>&1 | tee "$OUT/bench_135m.txt" | tail -8
  python3 benchmarks/gpu_bench.py --random-shape smollm2-1.7b --contexts 4k,128k --vs-hf --json "$OUT/bench_1p7b.json" 2>&1 | tee "$OUT/bench_1p7b.txt" | tail -8
  exit 0
fi
# stage 3: prefill attention kernels at 128K, arbor bench as a user runs it, the int8 KV cache
for kernel in cudnn flash efficient; do
  ARBOR_PREFILL_ATTENTION=$kernel python3 benchmarks/gpu_bench.py --contexts 128k --tokens 8 2>&1 | tail -1 | sed "s/^/$kernel: /"
done | tee "$OUT/prefill_kernels.txt"
python3 -m arbor_cli bench --contexts 4k,32k,128k 2>&1 | tee "$OUT/arbor_bench.txt" | tail -12
python3 benchmarks/kv_int8_gpu.py --json "$OUT/kv_int8.json" 2>&1 | tee "$OUT/kv_int8.txt" | tail -12
