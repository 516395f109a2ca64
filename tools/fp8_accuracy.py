#!/usr/bin/env python3
"""FP8 against BF16 on the same weights: perplexity on a fixed text and token-level top-1 agreement.

Converts MODEL (an HF directory or a .gguf) with `kiln convert --dtype bfloat16` and with
`--use_fp8` (per-tensor, and per-channel with --per-channel), runs `kiln perplexity --output json`
on each, and prints a markdown table for docs/PERF_fp8.md. Standard library only.

    python3 tools/fp8_accuracy.py --kiln build/kiln --model $KILN_DEFAULT_MODEL [--per-channel]

More configurations with --variant 'NAME=CONVERT FLAGS' (repeatable; --no-default drops the plain
per-tensor row), e.g. static activation scales calibrated on another text, or exclusions:

    python3 tools/fp8_accuracy.py --no-default \
        --variant 'static=--use_fp8 --calib_file tools/fp8_calib.txt' \
        --variant 'no down_proj=--use_fp8 --fp8_exclude *down_proj'

"vs BF16" is exp(mean NLL difference) - 1 with, after the sign, one standard error of that mean
over the scored tokens (the text's sampling noise: about 0.3-0.4 points on this text). The
"BF16 share" column is the fraction of decoder linear weights (q/k/v/o/gate/up/down) that the
checkpoint keeps in BF16, read from its safetensors header.
"""
import argparse
import json
import math
import os
import pathlib
import shlex
import struct
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(cmd):
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr}")
    return p.stdout, time.time() - t0


def linear_bf16_share(ckpt):
    """Fraction of decoder linear weights (by count) stored as BF16 in ckpt's rank files."""
    total = bf16 = 0
    for f in sorted(ckpt.glob("rank*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for name, t in header.items():
            if name == "__metadata__" or not name.startswith("model.layers.") or not name.endswith("_proj.weight"):
                continue
            n = math.prod(t["shape"])
            total += n
            bf16 += n if t["dtype"] == "BF16" else 0
    return bf16 / total if total else 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kiln", default=str(ROOT / "build" / "kiln"))
    ap.add_argument("--model", default=os.environ.get("KILN_DEFAULT_MODEL"))
    ap.add_argument("--text", default=str(ROOT / "tools" / "fp8_accuracy.txt"))
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--per-channel", action="store_true", help="also per-channel FP8 scales")
    ap.add_argument("--source", action="store_true", help="also the unconverted source model")
    ap.add_argument("--work", default=None, help="directory for the converted checkpoints (default: a temp dir)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                    help="another checkpoint: kiln convert flags after --dtype bfloat16 (repeatable)")
    ap.add_argument("--no-default", action="store_true", help="skip the plain --use_fp8 per-tensor row")
    a = ap.parse_args()
    if not a.model:
        sys.exit("--model (or KILN_DEFAULT_MODEL) is required")
    work = pathlib.Path(a.work or tempfile.mkdtemp(prefix="kiln_fp8_acc_"))
    tok = [] if os.path.isdir(a.model) else ["--tokenizer", a.model]
    variants = [("bf16", ["--dtype", "bfloat16"])]
    if not a.no_default:
        variants.append(("fp8 per-tensor", ["--dtype", "bfloat16", "--use_fp8"]))
    for v in a.variant:
        name, sep, flags = v.partition("=")
        if not sep or not name:
            sys.exit(f"--variant '{v}': expected NAME=FLAGS")
        variants.append((name, ["--dtype", "bfloat16"] + shlex.split(flags)))
    if a.per_channel:
        variants.append(("fp8 per-channel", ["--dtype", "bfloat16", "--use_fp8", "--fp8_scaling", "per_channel"]))
    results = {}
    if a.source:
        out, secs = run([a.kiln, "perplexity", a.model, "--file", a.text, "--ctx", str(a.ctx), "--batch", str(a.batch),
                         "--output", "json"] + tok)
        results["source"] = json.loads(out)
        results["source"]["wall"] = secs
    for name, flags in variants:
        ckpt = work / "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
        run([a.kiln, "convert", "--model_dir", a.model, "--output_dir", str(ckpt)] + flags)
        out, secs = run([a.kiln, "perplexity", str(ckpt), "--file", a.text, "--ctx", str(a.ctx), "--batch",
                         str(a.batch), "--output", "json"] + tok)
        results[name] = json.loads(out)
        results[name]["wall"] = secs
        results[name]["bytes"] = sum(f.stat().st_size for f in ckpt.glob("rank*.safetensors"))
        results[name]["bf16_share"] = linear_bf16_share(ckpt)
        print(f"{name}: perplexity {results[name]['perplexity']:.4f} ({secs:.0f} s)", file=sys.stderr)
    ref = results["bf16"]
    print(f"Text: `{os.path.relpath(a.text, ROOT)}`, {ref['tokens']} tokens ({ref['scored']} scored), "
          f"windows of {ref['ctx']}; model `{os.path.basename(a.model)}`.\n")
    print("| weights | BF16 share | file size | perplexity | vs BF16 | mean NLL | top-1 agreement with BF16 | mean |NLL diff| |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        n = len(r["argmax"])
        agree = sum(x == y for x, y in zip(r["argmax"], ref["argmax"])) / n
        dnll = sum(abs(x - y) for x, y in zip(r["nll"], ref["nll"])) / n
        size = f"{r['bytes'] / 1e6:.0f} MB" if "bytes" in r else "-"
        delta = 100.0 * (r["perplexity"] / ref["perplexity"] - 1.0)
        d = [x - y for x, y in zip(r["nll"], ref["nll"])]
        md = sum(d) / n
        se = math.sqrt(sum((x - md) ** 2 for x in d) / max(1, n - 1) / n) if name != "bf16" else 0.0
        share = f"{100.0 * r['bf16_share']:.1f}%" if "bf16_share" in r else "-"
        print(f"| {name} | {share} | {size} | {r['perplexity']:.4f} | {delta:+.2f}% ± {100.0 * se:.2f} | {r['mean_nll']:.5f} | "
              f"{100.0 * agree:.1f}% | {dnll:.4f} |")


if __name__ == "__main__":
    main()
