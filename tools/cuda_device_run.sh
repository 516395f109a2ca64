#!/usr/bin/env bash
# Runs on the GPU machine (device tool) from the repo root with build-cuda/{test_cuda,kiln} carried:
#   tools/cuda_device_run.sh [tests|bench|throughput|all]
# Logs go to $OUT (or ./device-out), one file per part, so they can be saved under docs/device-logs.
set -u -o pipefail
mode=${1:-all}
out=${OUT:-./device-out}
mkdir -p "$out"
{
  date -u +"date %Y-%m-%dT%H:%M:%SZ"
  echo "commit $(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
  ldconfig -p | grep -i cublaslt || true
} > "$out/env.txt" 2>&1
# libcublasLt: the loader path, else the CUDA toolkit or the pip wheels of the image.
libdir=$(dirname "$(find /usr/local/cuda*/ /usr/lib /opt /usr/local/lib -name 'libcublasLt.so*' 2>/dev/null | head -1)" 2>/dev/null)
[ -n "$libdir" ] && export LD_LIBRARY_PATH="$libdir:${LD_LIBRARY_PATH:-}"
echo "libcublasLt dir: $libdir" >> "$out/env.txt"
cat "$out/env.txt"
rc=0
if [ "$mode" = tests ] || [ "$mode" = all ]; then
  ./build-cuda/test_cuda 2>&1 | tee "$out/test_cuda.txt" | grep -E "^\[  (FAILED|PASSED|SKIPPED) |golden-cuda|executor\]|FAILED|Failure|error" | head -80
  rc=$((rc | $?))
fi
if [ "$mode" = bench ] || [ "$mode" = all ]; then
  cfg=configs/llama-3.1-8b.json
  ( set -x
    ./build-cuda/kiln bench latency $cfg --dummy_weights --batch_size 1 --input_len 2048 --output_len 128 --output json
    ./build-cuda/kiln bench latency $cfg --dummy_weights --batch_size 1 --input_len 128 --output_len 256 --output json
  ) 2>&1 | tee "$out/bench_latency.txt"
fi
if [ "$mode" = throughput ] || [ "$mode" = all ]; then
  cfg=configs/llama-3.1-8b.json
  ( set -x
    timeout 240 ./build-cuda/kiln bench throughput $cfg --dummy_weights --num_requests 256 --input_len 128 --output_len 128 --output json
    timeout 240 ./build-cuda/kiln bench throughput $cfg --dummy_weights --num_requests 256 --input_len 1000 --output_len 1000 --output json
  ) 2>&1 | tee "$out/bench_throughput.txt"
fi
exit $rc
