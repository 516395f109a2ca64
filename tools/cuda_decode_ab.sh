#!/usr/bin/env bash
# Runs on the GPU machine (device tool) from the repo root with $BIN/kiln carried (BIN defaults to build-cuda): batch-1
# decode A/B of GEMV tuning knobs in one process family on one machine (machines differ by ~3 %).
#   tools/cuda_decode_ab.sh "ENV=.. ENV=.." "ENV=.." ...   (each argument is one configuration)
# Prints one line per configuration; full logs under $OUT/bench_ab.txt.
set -u -o pipefail
out=${OUT:-./device-out}
mkdir -p "$out"
libdir=$(dirname "$(find /usr/local/cuda*/ /usr/lib /opt /usr/local/lib -name 'libcublasLt.so*' 2>/dev/null | head -1)" 2>/dev/null)
[ -n "$libdir" ] && export LD_LIBRARY_PATH="$libdir:${LD_LIBRARY_PATH:-}"
cfg=configs/llama-3.1-8b.json
in_len=${AB_INPUT_LEN:-128}
for c in "$@"; do
  echo "== config: $c (input_len $in_len, output_len 256)" >> "$out/bench_ab.txt"
  # shellcheck disable=SC2086
  r=$(env $c ./${BIN:-build-cuda}/kiln bench latency $cfg --dummy_weights --batch_size 1 --input_len "$in_len" --output_len 256 2>&1)
  echo "$r" >> "$out/bench_ab.txt"
  step=$(echo "$r" | grep -oE "median step [0-9.]+ ms")
  roof=$(echo "$r" | grep -oE "decode at [0-9.]+%")
  printf '%-45s ctx %5s  %s  %s\n' "$c" "$in_len" "$step" "$roof"
done | tee -a "$out/bench_ab_summary.txt"
