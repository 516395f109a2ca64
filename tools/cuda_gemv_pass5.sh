#!/usr/bin/env bash
# Runs on the GPU machine (device tool) from the repo root with build-cuda/{kiln,test_cuda} carried:
# PERF_cuda.md decode pass 5 in one call: GEMV tests, standalone GEMV timing (bf16 and FP8, 8B shapes)
# per configuration, then batch-1 decode A/B (tools/cuda_decode_ab.sh, alternating), then the FP8
# decode bench when this kiln has --quantization.
#   tools/cuda_gemv_pass5.sh "ENV=.. ENV=.." ...   (each argument one configuration; first = reference)
set -u -o pipefail
out=${OUT:-./device-out}
mkdir -p "$out"
libdir=$(dirname "$(find /usr/local/cuda*/ /usr/lib /opt /usr/local/lib -name 'libcublasLt.so*' 2>/dev/null | head -1)" 2>/dev/null)
[ -n "$libdir" ] && export LD_LIBRARY_PATH="$libdir:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv > "$out/env.txt" 2>&1
cat "$out/env.txt"
filter=${GEMV_TESTS:-'CudaKernels.Gemv*Reference:Shapes/CudaOpsGrid.*:CudaExecutor.MatchesCpu*'}
./build-cuda/test_cuda --gtest_filter="$filter" 2>&1 | tee "$out/test_cuda.txt" |
  grep -E "^\[  (FAILED|PASSED) |^\[       OK|gemv-fp8|Failure" | head -40
for c in "$@"; do
  echo "== gemv timing: $c"
  # shellcheck disable=SC2086
  env $c ./build-cuda/test_cuda --gtest_filter=CudaKernels.GemvTiming8B 2>&1 | grep -E "gemv-timing|FAILED"
done 2>&1 | tee "$out/gemv_timing.txt"
for rep in 1 2; do tools/cuda_decode_ab.sh "$@"; done
if ./build-cuda/kiln bench latency --help 2>&1 | grep -q quantization; then
  for q in auto fp8; do
    ./build-cuda/kiln bench latency configs/llama-3.1-8b.json --dummy_weights --batch_size 1 --input_len 128 \
      --output_len 256 --quantization $q 2>&1 | tee -a "$out/bench_fp8.txt" | grep -E "decode|roofline|error|M=1|^ +[0-9]"
  done
fi
