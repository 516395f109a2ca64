"""`kiln bench serve` against a live `kiln serve` on the default model: every request completes
and the vLLM-style metrics are present and consistent."""
import json
import subprocess

from test_server_util import API_KEY, KilnServer, default_model


def test_bench_serve_reports_metrics(kiln_bin):
    with KilnServer(kiln_bin, default_model(), "--api_key", API_KEY) as s:
        out = subprocess.run([kiln_bin, "bench", "serve", "--url", s.base, "--api_key", API_KEY, "--concurrency", "3",
                              "--num_prompts", "6", "--input_len", "8", "--output_len", "4", "--output", "json"],
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr
        assert "Serving Benchmark Result" in out.stdout
        r = json.loads(out.stdout.strip().splitlines()[-1])
        assert r["completed"] == 6 and r["failed"] == 0
        assert r["total_input_tokens"] == 48 and r["total_output_tokens"] == 24  # ignore_eos: exactly output_len
        assert r["model"] == "smol"
        for k in ("ttft", "tpot", "itl", "e2el"):
            assert 0 < r[k]["median_ms"] <= r[k]["p99_ms"], (k, r[k])
        assert r["ttft"]["p99_ms"] <= r["e2el"]["p99_ms"]
        assert r["output_throughput"] > 0 and r["request_throughput"] > 0
        # A wrong key fails loudly.
        bad = subprocess.run([kiln_bin, "bench", "serve", "--url", s.base, "--api_key", "nope", "--num_prompts", "1"],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0 and "401" in bad.stderr
