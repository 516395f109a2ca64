#!/usr/bin/env bash
# The reference guide's workflow, command for command, on a small model (CPU or GPU):
#   kiln convert (FP8 weights + FP8 KV scales) -> kiln build -> kiln serve -> /v1/completions.
# Usage: tools/seed_parity.sh MODEL [WORKDIR]    (MODEL: HF directory or .gguf)
# Env: KILN_BIN (default build/kiln), PORT (default: a free one), READY_TIMEOUT (s, default 120).
# Exit: 0 pass, 1 failure, 77 the serve half was skipped (no `kiln serve` in this binary).
set -euo pipefail
KILN=${KILN_BIN:-build/kiln}
MODEL=${1:?usage: tools/seed_parity.sh MODEL [WORKDIR]}
WORK=${2:-$(mktemp -d -t kiln_seed_parity.XXXXXX)}
PORT=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
READY_TIMEOUT=${READY_TIMEOUT:-120}
C=$WORK/ckpt
E=$WORK/engine

step() { echo "== $*"; }

step "kiln convert --model_dir $MODEL --output_dir $C --use_fp8 --fp8_kv_cache"
"$KILN" convert --model_dir "$MODEL" --output_dir "$C" --use_fp8 --fp8_kv_cache

step "kiln build --checkpoint_dir $C --output_dir $E ..."
"$KILN" build --checkpoint_dir "$C" --output_dir "$E" --gemm_plugin auto --gpt_attention_plugin auto \
  --max_batch_size 1 --max_input_len 2048 --max_seq_len 2560
for f in config.json plan.json rank0.safetensors; do
  [ -f "$E/$f" ] || { echo "FAIL: engine has no $f"; exit 1; }
done

if ! "$KILN" serve --help >/dev/null 2>&1; then
  echo "SKIP: this kiln has no 'serve' verb; convert + build passed, serve + curl not run"
  exit 77
fi

# A GGUF source keeps its vocabulary in tokenizer.gguf (the engine has no tokenizer.json).
TOK=()
if [ ! -f "$E/tokenizer.json" ] && [ -f "$E/tokenizer.gguf" ]; then TOK=(--tokenizer "$E/tokenizer.gguf"); fi

step "kiln serve $E --port $PORT ${TOK[*]}"
t0=$(date +%s.%N)
"$KILN" serve "$E" --port "$PORT" "${TOK[@]}" >"$WORK/serve.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null || true' EXIT
ready=0
for _ in $(seq 1 $((READY_TIMEOUT * 10))); do
  if curl -sf "localhost:$PORT/health" >/dev/null 2>&1; then ready=1; break; fi
  kill -0 $PID 2>/dev/null || break
  sleep 0.1
done
if [ $ready != 1 ]; then
  echo "FAIL: /health did not answer within ${READY_TIMEOUT}s"; tail -20 "$WORK/serve.log"; exit 1
fi
printf 'ready after %s s\n' "$(python3 -c "print(round($(date +%s.%N) - $t0, 2))")"

NAME=$(curl -s "localhost:$PORT/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
step "curl localhost:$PORT/v1/completions (model $NAME)"
BODY=$(python3 -c 'import json,sys; print(json.dumps({"model": sys.argv[1], "prompt": "The capital of France is", "max_tokens": 16}))' "$NAME")
RESP=$(curl -s "localhost:$PORT/v1/completions" -H 'Content-Type: application/json' -d "$BODY")
echo "$RESP"
echo "$RESP" | python3 -c '
import json, sys
r = json.load(sys.stdin)
text = r["choices"][0]["text"]
assert r["object"] == "text_completion", r
assert r["usage"]["completion_tokens"] > 0, r
print("completion:", repr(text))
' || { echo "FAIL: no completion came back"; tail -20 "$WORK/serve.log"; exit 1; }
echo "PASS"
