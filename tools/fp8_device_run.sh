#!/usr/bin/env bash
# Runs on the GPU machine (device tool) from the repo root with $BIN/{test_cuda,kiln} carried
# (BIN defaults to build-cuda): FP8 correctness and speed in one call.
#   BIN=build-lead tools/fp8_device_run.sh [tests] [latency] [throughput] [kvthroughput] [final]
# Logs go to $OUT (or ./device-out), one file per part.
set -u -o pipefail
bin=${BIN:-build-cuda}
out=${OUT:-./device-out}
mkdir -p "$out"
libdir=$(dirname "$(find /usr/local/cuda*/ /usr/lib /opt /usr/local/lib -name 'libcublasLt.so*' 2>/dev/null | head -1)" 2>/dev/null)
[ -n "$libdir" ] && export LD_LIBRARY_PATH="$libdir:${LD_LIBRARY_PATH:-}"
{
  date -u +"date %Y-%m-%dT%H:%M:%SZ"
  echo "commit $(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown) (+ working tree as carried)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
  echo "libcublasLt dir: $libdir"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"
cfg=configs/llama-3.1-8b.json
rc=0
for part in "$@"; do
  case $part in
    tests)
      timeout 300 ./$bin/test_cuda 2>&1 | tee "$out/test_cuda.txt" |
        grep -E "^\[  (FAILED|PASSED|SKIPPED) |^\[ +OK|fp8|executor\]|FAILED|Failure|error" | head -120
      rc=$((rc | $?)) ;;
    latency)
      ( set -x
        ./$bin/kiln bench latency $cfg --dummy_weights --quantization fp8 --batch_size 1 --input_len 2048 --output_len 64 --output json
        ./$bin/kiln bench latency $cfg --dummy_weights --quantization fp8 --batch_size 1 --input_len 128 --output_len 256 --output json
        ./$bin/kiln bench latency $cfg --dummy_weights --quantization bf16 --batch_size 1 --input_len 128 --output_len 256
      ) 2>&1 | tee "$out/bench_latency.txt" | grep -vE '^\{' ;;
    throughput)
      ( set -x
        timeout 200 ./$bin/kiln bench throughput $cfg --dummy_weights --quantization fp8 --num_requests 256 --input_len 128 --output_len 128 --output json
      ) 2>&1 | tee "$out/bench_throughput.txt" | tail -5 ;;
    kvthroughput)
      ( set -x
        timeout 200 ./$bin/kiln bench throughput $cfg --dummy_weights --quantization fp8 --kv_cache_dtype fp8 --num_requests 256 --input_len 128 --output_len 128 --output json
        timeout 280 ./$bin/kiln bench throughput $cfg --dummy_weights --quantization fp8 --kv_cache_dtype fp8 --num_requests 256 --input_len 1000 --output_len 1000 --output json
      ) 2>&1 | tee "$out/bench_kvthroughput.txt" | tail -8 ;;
    final)
      # Issue #6's three trtllm-bench workloads (FP8 weights + FP8 KV), then BF16 for issue #5.
      ( set -x
        for io in "128 128" "1000 1000" "2048 128"; do
          set -- $io
          timeout 150 ./$bin/kiln bench throughput $cfg --dummy_weights --quantization fp8 --kv_cache_dtype fp8 \
            --num_requests 256 --input_len $1 --output_len $2 --output json
        done
        timeout 60 ./$bin/kiln bench throughput $cfg --dummy_weights --quantization bf16 --kv_cache_dtype bf16 --num_requests 256 --input_len 128 --output_len 128
        timeout 150 ./$bin/kiln bench throughput $cfg --dummy_weights --quantization bf16 --kv_cache_dtype bf16 --num_requests 256 --input_len 1000 --output_len 1000
        ./$bin/kiln bench latency $cfg --dummy_weights --quantization bf16 --batch_size 1 --input_len 2048 --output_len 64
      ) 2>&1 | tee "$out/bench_final.txt" | grep -E "^\+|throughput  |decode  |prefill  |roofline|gemm  " ;;
  esac
done
exit $rc
