#!/usr/bin/env bash
# Runs on the GPU machine (device tool), repo root, $BIN/kiln carried and the Llama-3.1 tokenizer in
# $TOK_DIR: the reference guide's workflow at 8B scale with an FP8 (ModelOpt-layout) checkpoint of
# random weights: generate -> kiln convert -> kiln build -> kiln serve (time to /health 200 with
# the engine in the page cache) -> curl /v1/completions -> kiln bench serve at concurrency
# $CONCS (1000/1000 by default). Logs to $OUT.
#   BIN=build-lead TOK_DIR=.device-data/llama31 tools/fp8_e2e_8b.sh
set -u -o pipefail
bin=${BIN:-build-cuda}
out=${OUT:-./device-out}
tok=${TOK_DIR:-.device-data/llama31}
work=${WORK:-/tmp/kiln8b}
concs=${CONCS:-"1 16 64 256"}
in_len=${IN_LEN:-1000}
out_len=${OUT_LEN:-1000}
mkdir -p "$out" "$work"
libdir=$(dirname "$(find /usr/local/cuda*/ /usr/lib /opt /usr/local/lib -name 'libcublasLt.so*' 2>/dev/null | head -1)" 2>/dev/null)
[ -n "$libdir" ] && export LD_LIBRARY_PATH="$libdir:${LD_LIBRARY_PATH:-}"
py=$(command -v python3)
for p in /opt/torch/.venv/bin/python /usr/local/bin/python3; do [ -x "$p" ] && "$p" -c 'import torch' 2>/dev/null && py=$p && break; done
log=$out/e2e_8b.txt
{
  date -u +"date %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  set -x
  if [ ! -f "$work/hf/config.json" ]; then
    time "$py" tools/gen_fp8_checkpoint.py --config configs/llama-3.1-8b.json --out "$work/hf" --tokenizer_dir "$tok"
  fi
  time ./$bin/kiln convert --model_dir "$work/hf" --output_dir "$work/ckpt"
  time ./$bin/kiln build --checkpoint_dir "$work/ckpt" --output_dir "$work/engine" --gemm_plugin auto \
    --gpt_attention_plugin auto --max_batch_size 256 --max_input_len 2048 --max_seq_len 4096 --max_num_tokens 8192
  cat "$work/engine/plan.json" | head -c 1500; echo
  du -sh "$work/engine"
  if [ "${THROUGHPUT:-0}" = 1 ]; then
    # trtllm-bench's workloads on the built engine (planned GEMMs, the checkpoint's FP8 KV scales).
    for io in "128 128" "1000 1000" "2048 128"; do
      set -- $io
      timeout 150 ./$bin/kiln bench throughput "$work/engine" --num_requests 256 --input_len $1 --output_len $2 --output json
    done
  fi
  cat "$work/engine"/* > /dev/null   # the engine in the page cache, as the 10 s target states
  set +x
  t0=$(date +%s.%N)
  ./$bin/kiln serve "$work/engine" --host 0.0.0.0 --port 8000 --max_batch_size 256 > "$out/serve_8b.log" 2>&1 &
  pid=$!
  ready=0
  for _ in $(seq 1 1200); do
    if curl -sf localhost:8000/health >/dev/null 2>&1; then ready=1; break; fi
    kill -0 $pid 2>/dev/null || break
    sleep 0.05
  done
  t1=$(date +%s.%N)
  echo "ready=$ready after $(python3 -c "print(round($t1 - $t0, 2))") s (kiln serve ENGINE -> GET /health 200)"
  if [ $ready = 1 ]; then
    name=$(curl -s localhost:8000/v1/models | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
    curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \
      -d "{\"model\": \"$name\", \"prompt\": \"The capital of France is\", \"max_tokens\": 16}"; echo
    for c in $concs; do
      n=$((c * 2)); [ $c -ge 64 ] && n=$c; [ $c -eq 1 ] && n=3
      ./$bin/kiln bench serve --url http://127.0.0.1:8000 --concurrency $c --num_prompts $n \
        --input_len $in_len --output_len $out_len --output json --seed $c
    done
  fi
  kill -TERM $pid 2>/dev/null; wait $pid
  echo "serve exit code $?"
  tail -5 "$out/serve_8b.log"
} 2>&1 | tee "$log"
