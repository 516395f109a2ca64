#!/usr/bin/env bash
# Decode attention variants (KILN_DECODE_ATTN=v2old | t16 | b2 | v3 | v5 | auto) on the GPU machine
# (device tool) from the repo root with $BIN/{test_cuda,kiln} carried: correctness first, then
# before/after in one call.   BIN=build-attn tools/decode_attn_ab.sh [tests] [bench]
# Logs: $OUT/attn-tests.txt, $OUT/attn-bench.txt.
set -u -o pipefail
bin=${BIN:-build-attn}
out=${OUT:-./device-out}
mkdir -p "$out"
libdir=$(dirname "$(find /usr/local/cuda*/ /usr/lib /opt /usr/local/lib -name 'libcublasLt.so*' 2>/dev/null | head -1)" 2>/dev/null)
[ -n "$libdir" ] && export LD_LIBRARY_PATH="$libdir:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
cfg=configs/llama-3.1-8b.json
for part in "$@"; do
  case $part in
    tests)
      timeout 240 ./$bin/test_cuda --gtest_filter="${FILTER:-*CudaDecodeLong*:*KvFp8*:*CudaOpsGrid*:*CudaExecutor*:*CudaGolden*}" 2>&1 |
        tee "$out/attn-tests.txt" | grep -E "^\[  (FAILED|PASSED) |^\[ +OK|golden-cuda|scales|Failure|Expected|decode long|rel [0-9.e+-]+ max.*(decode|rope)" | head -150 ;;
    bench)
      run() {  # variant kv quant batch input output
        echo "=== KILN_DECODE_ATTN=$1 kv $2 quant $3 batch $4 input $5 output $6"
        KILN_DECODE_ATTN=$1 timeout 120 ./$bin/kiln bench latency $cfg --dummy_weights --quantization $3 --kv_cache_dtype $2 \
          --batch_size $4 --input_len $5 --output_len $6 --reps 1 2>&1 | grep -E "^decode |^prefill |error|Error"
      }
      {
        [ -n "${QUICK:-}" ] && { for v in v2old auto b2; do run $v fp8 fp8 256 1000 24; done
          for v in v2old auto b2; do run $v bf16 fp8 256 1000 24; done
          for v in v2old auto; do run $v bf16 fp8 1 128 256; done; exit 0; }
        for v in v2old auto t16 b2; do run $v fp8 fp8 256 1000 24; done
        for v in v2old auto; do run $v bf16 fp8 256 1000 24; done
        for v in v2old auto; do run $v bf16 fp8 1 128 256; run $v bf16 bf16 1 128 256; done
        run v2old fp8 fp8 1 128 256; run auto fp8 fp8 1 128 256
        run v2old fp8 fp8 256 1000 24; run auto fp8 fp8 256 1000 24
      } 2>&1 | tee "$out/attn-bench.txt" ;;
  esac
done
