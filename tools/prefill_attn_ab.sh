#!/usr/bin/env bash
# Prefill attention v1 (KILN_PREFILL_ATTN=v1, wmma) vs v2 (default, mma.sync + GQA group per block)
# on the GPU machine (device tool) from the repo root with $BIN/{test_cuda,kiln} carried:
# correctness first, then the whole prefill step and the op profile before/after in one call.
#   BIN=build-pattn tools/prefill_attn_ab.sh [tests] [bench]
# Logs: $OUT/pattn-tests.txt, $OUT/pattn-bench.txt.
set -u -o pipefail
bin=${BIN:-build-pattn}
out=${OUT:-./device-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
cfg=configs/llama-3.1-8b.json
for part in "$@"; do
  case $part in
    tests)
      timeout 300 ./$bin/test_cuda --gtest_filter="${FILTER:-*CudaPrefillLong*:*CudaOpsGrid*:*CudaKvFp8Grid*:*CudaExecutor*:*CudaGolden*:*CudaKvFp8Golden*:*CudaDecodeLong*}" 2>&1 |
        tee "$out/pattn-tests.txt" | grep -E "^\[  (FAILED|PASSED) |^\[  SKIPPED|Failure|Expected|first mismatch|prefill long" | head -120 ;;
    bench)
      run() {  # variant kv batch input
        echo "=== KILN_PREFILL_ATTN=$1 kv $2 batch $3 input $4"
        KILN_PREFILL_ATTN=$1 KILN_PROFILE_OPS=1 KILN_CUDA_GRAPHS=0 timeout 120 ./$bin/kiln bench latency $cfg --dummy_weights \
          --quantization fp8 --kv_cache_dtype $2 --batch_size $3 --input_len $4 --output_len 4 --reps 2 2>&1 |
          grep -E "^prefill |attention|error|Error"
      }
      {
        for v in v1 v2; do run $v fp8 4 2048; done
        for v in v1 v2; do run $v fp8 64 128; done
        for v in v1 v2; do run $v bf16 4 2048; done
        for v in v1 v2; do run $v bf16 64 128; done
      } 2>&1 | tee "$out/pattn-bench.txt" ;;
  esac
done
