#!/usr/bin/env bash
# Runs on the GPU machine (device tool) from the repo root: `kiln run --device cuda` on the golden
# fixtures (free-running greedy vs the transformers reference and vs --device cpu) and the server
# end-to-end pytest suite with KILN_TEST_DEVICE=cuda. Carried: dev-out/bin/kiln (a stripped
# build-cuda/kiln), dev-out/tiny/smol4.gguf (tools/make_tiny_gguf.py --layers 4 of the default
# model) and .whl (openai + pydantic wheels, absent from the GPU image). Logs under $OUT.
set -u -o pipefail
out=${OUT:-./device-out}
mkdir -p "$out"
K=${KILN:-$PWD/dev-out/bin/kiln}
M=${MODEL:-$PWD/dev-out/tiny/smol4.gguf}
libdir=$(dirname "$(find /usr/local/cuda*/ /usr/lib /opt /usr/local/lib -name 'libcublasLt.so*' 2>/dev/null | head -1)" 2>/dev/null)
[ -n "$libdir" ] && export LD_LIBRARY_PATH="$libdir:${LD_LIBRARY_PATH:-}"
{ date -u +"date %Y-%m-%dT%H:%M:%SZ"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; } > "$out/env.txt" 2>&1
cat "$out/env.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site

{
  for g in llama31 qwen2 mistral qwen3 llama_linear; do
    ids=$(python3 -c "import json;print(','.join(map(str,json.load(open('tests/golden/$g/golden.json'))['prompt_ids'])))")
    ref=$(python3 -c "import json;print(','.join(map(str,json.load(open('tests/golden/$g/golden.json'))['greedy_ids'])))")
    for dev in cuda cpu; do
      got=$("$K" run tests/golden/$g --prompt_ids "$ids" --max_tokens 32 --ignore_eos --device $dev --output json |
            python3 -c "import json,sys;print(','.join(map(str,json.load(sys.stdin)['generated_ids'])))")
      same=$(python3 -c "a='$ref'.split(',');b='$got'.split(',');n=next((i for i,(x,y) in enumerate(zip(a,b)) if x!=y),len(a));print(n)")
      echo "run-golden $g $dev: first $same/32 free-running greedy tokens match transformers"
    done
    # seeded sampling: same tokens on both devices (host sampler on both today)
    a=$("$K" run tests/golden/$g --prompt_ids "$ids" --max_tokens 24 --ignore_eos --temperature 0.8 --top_p 0.9 --seed 11 --device cuda --output json | python3 -c "import json,sys;print(json.load(sys.stdin)['generated_ids'])")
    b=$("$K" run tests/golden/$g --prompt_ids "$ids" --max_tokens 24 --ignore_eos --temperature 0.8 --top_p 0.9 --seed 11 --device cpu --output json | python3 -c "import json,sys;print(json.load(sys.stdin)['generated_ids'])")
    echo "run-seeded $g: cuda $a"; echo "run-seeded $g: cpu  $b"
  done
  set -x
  "$K" run "$M" --prompt "The capital of France is" --max_tokens 16 --device cuda
  "$K" run "$M" --prompt "The capital of France is" --max_tokens 16 --device cpu
  "$K" run "$M" --prompt "x" --max_tokens 2 --device tpu
  set +x
} 2>&1 | tee "$out/run_cuda.txt"

cd tests/py && PYTHONUNBUFFERED=1 KILN_BIN="$K" KILN_DEFAULT_MODEL="$M" KILN_TEST_DEVICE=${KILN_TEST_DEVICE:-cuda} \
  timeout ${PYTEST_TIMEOUT:-400} python3 -m pytest -q -rfEs -p no:cacheprovider ${PYTEST_ARGS:-test_openai_e2e.py test_server_robustness.py test_server_bench.py} 2>&1 | tee "$out/pytest_cuda.txt"
