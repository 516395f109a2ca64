#!/usr/bin/env bash
# One device call for the end-to-end checks (GPU machine, repo root). Carried: dev-out/bin/kiln,
# dev-out/tiny/smol1.gguf, .whl, .device-data/llama31.tgz (the Llama-3.1 tokenizer, compressed to
# fit the carry limit). 1) the 8B FP8 convert -> build -> serve -> bench serve path
# (tools/fp8_e2e_8b.sh), 2) the reference guide's seed-parity script on the GPU, 3) the server's
# pytest end-to-end suite with --device cuda (tools/cuda_device_e2e.sh). Logs under $OUT.
set -u -o pipefail
out=${OUT:-./device-out}
mkdir -p "$out" .device-data
tar xzf .device-data/llama31.tgz -C .device-data
export BIN=dev-out/bin TOK_DIR=.device-data/llama31 THROUGHPUT=1
bash tools/fp8_e2e_8b.sh 2>&1 | grep -vE '^\{"' | grep -E "ready=|real|kiln build|planned|error|FAIL|throughput  |workload|Output token throughput|Median (TTFT|ITL)|P99 (TTFT|ITL)|concurrency" | head -70
libdir=$(dirname "$(find /usr/local/cuda*/ /usr/lib /opt /usr/local/lib -name 'libcublasLt.so*' 2>/dev/null | head -1)" 2>/dev/null)
[ -n "$libdir" ] && export LD_LIBRARY_PATH="$libdir:${LD_LIBRARY_PATH:-}"
KILN_BIN=dev-out/bin/kiln timeout 120 bash tools/seed_parity.sh dev-out/tiny/smol1.gguf /tmp/seed_parity 2>&1 | tee "$out/seed_parity_gpu.txt" | tail -4
grep -h "cuda:" /tmp/seed_parity/serve.log | head -2 | tee -a "$out/seed_parity_gpu.txt"
KILN=$PWD/dev-out/bin/kiln MODEL=$PWD/dev-out/tiny/smol1.gguf PYTEST_TIMEOUT=300 bash tools/cuda_device_e2e.sh 2>&1 | tail -15
