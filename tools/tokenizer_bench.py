#!/usr/bin/env python3
"""Encode throughput of kiln's tokenizer against HF `tokenizers`, both on one thread.

    .venv/bin/python tools/tokenizer_bench.py [--kiln build/kiln] [--size 10000000] [--repeat 3]

Builds a seeded mixed corpus (tools/tokenizer_corpus.py: prose in several languages, code, numbers,
emoji; ~10 MB), splits it into lines at '\\n' (keeping the '\\n'), and encodes every line separately
without special tokens:
  kiln:        `kiln tokenize TOKENIZER --bench CORPUS --repeat R` (C++ loop over the lines)
  hf batch:    Tokenizer.encode_batch(lines) with RAYON_NUM_THREADS=1, TOKENIZERS_PARALLELISM=false
  hf loop:     for line in lines: Tokenizer.encode(line)   (adds Python call overhead)
Best of R runs each, in CPU time (process time: robust on a shared machine) and wall time. Also
checks that both give the same total number of tokens.
"""
import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import tokenizer_corpus  # noqa: E402

from tokenizers import Tokenizer  # noqa: E402


def split_lines(text):
    parts = text.split("\n")
    lines = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def best_of(r, fn):
    """Best wall time and best CPU time (process time) of r runs, and fn's result."""
    best, best_cpu, out = float("inf"), float("inf"), None
    for _ in range(r):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return best, best_cpu, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kiln", default=os.environ.get("KILN_BIN", str(ROOT / "build" / "kiln")))
    ap.add_argument("--assets", default=str(ROOT.parent / "shared" / "assets"))
    ap.add_argument("--tokenizers", default="llama-3.1,qwen3,mistral-7b")
    ap.add_argument("--size", type=int, default=10_000_000)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--corpus", help="use this file instead of generating one")
    ap.add_argument("--no-loop", action="store_true", help="skip the (slow) HF Python-loop measurement")
    args = ap.parse_args()

    if args.corpus:
        text = pathlib.Path(args.corpus).read_text(encoding="utf-8")
        corpus_path = args.corpus
    else:
        text = tokenizer_corpus.mixed_corpus(args.seed, args.size)
        tmp = tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False)
        tmp.write(text)
        tmp.close()
        corpus_path = tmp.name
    nbytes = len(text.encode("utf-8"))
    lines = split_lines(text)
    print(f"corpus: {nbytes} bytes, {len(lines)} lines (seed {args.seed}); machine: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cpus; python {platform.python_version()}")
    rows = []
    for name in args.tokenizers.split(","):
        path = pathlib.Path(args.assets) / "tokenizers" / name / "tokenizer.json"
        r = subprocess.run([args.kiln, "tokenize", str(path), "--bench", corpus_path, "--repeat", str(args.repeat)],
                           capture_output=True, text=True, check=True)
        k = json.loads(r.stdout)
        hf = Tokenizer.from_file(str(path))
        t_batch, c_batch, enc = best_of(args.repeat, lambda: hf.encode_batch(lines, add_special_tokens=False))
        hf_tokens = sum(len(e.ids) for e in enc)
        row = {"tokenizer": name, "kiln_mb_s": k["mb_per_s"], "hf_batch_mb_s": nbytes / 1e6 / t_batch,
               "kiln_mb_cpu_s": k["mb_per_cpu_s"], "hf_batch_mb_cpu_s": nbytes / 1e6 / c_batch,
               "kiln_tokens": k["tokens"], "hf_tokens": hf_tokens}
        if not args.no_loop:
            t_loop, c_loop, _ = best_of(1, lambda: [hf.encode(l, add_special_tokens=False) for l in lines])
            row["hf_loop_mb_s"] = nbytes / 1e6 / t_loop
            row["hf_loop_mb_cpu_s"] = nbytes / 1e6 / c_loop
        row["speedup_vs_batch"] = row["kiln_mb_s"] / row["hf_batch_mb_s"]
        row["cpu_speedup_vs_batch"] = row["kiln_mb_cpu_s"] / row["hf_batch_mb_cpu_s"]
        rows.append(row)
        print(json.dumps(row))
    print()
    print("MB/s per CPU second (wall-clock MB/s in parentheses):")
    print("| tokenizer | kiln | HF encode_batch | HF encode loop | kiln / HF batch | tokens kiln / HF |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        loop = f"{r['hf_loop_mb_cpu_s']:.2f} ({r['hf_loop_mb_s']:.2f})" if "hf_loop_mb_s" in r else "-"
        print(f"| {r['tokenizer']} | {r['kiln_mb_cpu_s']:.2f} ({r['kiln_mb_s']:.2f}) | "
              f"{r['hf_batch_mb_cpu_s']:.2f} ({r['hf_batch_mb_s']:.2f}) | {loop} | "
              f"{r['cpu_speedup_vs_batch']:.1f}x ({r['speedup_vs_batch']:.1f}x) | {r['kiln_tokens']} / {r['hf_tokens']} |")
    if not args.corpus:
        os.unlink(corpus_path)


if __name__ == "__main__":
    main()
