#!/usr/bin/env python3
"""Prompt-logprob fixtures for kiln's `echo` + `logprobs` (issue #4), from Hugging Face transformers.

For a tests/golden random-weight family (weights already there: config.json + model.safetensors,
written by tools/gen_golden.py), runs transformers in float32 over a fixed prompt and writes
tests/golden/<family>/prompt_logprobs.json:

  prompt_ids        the prompt (a fixed, seeded list of ids, longer than golden.json's prompt so
                    the C++ test can split it into several prefill chunks)
  target_logprobs   [len - 1] log P(prompt[i + 1] | prompt[:i + 1]), float32 log-softmax
  top2_ids          [len - 1][2] the two most likely next tokens at position i
  top2_logprobs     [len - 1][2] their logprobs

Replayed by tests/runtime/prompt_logprobs_golden_test.cpp (kiln's CPU engine, tolerance 1e-3).
Existing fixture files are not touched. Run where torch + transformers are installed:

    python3 tools/gen_prompt_logprobs.py --golden tests/golden --families llama31 qwen2
"""
import argparse
import json
import os
import random

import torch
from transformers import AutoModelForCausalLM

PROMPT_LEN = 23
PROMPT_SEED = 4


def make(family_dir, name):
    model = AutoModelForCausalLM.from_pretrained(family_dir, dtype=torch.float32)
    model.eval()
    vocab = model.config.vocab_size
    rng = random.Random(PROMPT_SEED)
    prompt = [rng.randrange(3, vocab) for _ in range(PROMPT_LEN)]
    with torch.no_grad():
        logits = model(torch.tensor([prompt], dtype=torch.long)).logits[0].float()  # [len, vocab]
    lp = torch.log_softmax(logits, dim=-1)
    targets = torch.tensor(prompt[1:], dtype=torch.long)
    target_lp = lp[:-1].gather(1, targets[:, None])[:, 0]
    top = torch.topk(lp[:-1], 2, dim=-1)
    import transformers
    out = {
        "model": name,
        "prompt_ids": prompt,
        "target_logprobs": [float(x) for x in target_lp],
        "top2_ids": [[int(i) for i in row] for row in top.indices],
        "top2_logprobs": [[float(x) for x in row] for row in top.values],
        "compute_dtype": "float32",
        "prompt_seed": PROMPT_SEED,
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
    }
    path = os.path.join(family_dir, "prompt_logprobs.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"wrote {path}: {len(prompt)} prompt tokens, {len(prompt) - 1} rows")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--golden", default="tests/golden")
    ap.add_argument("--families", nargs="+", default=["llama31", "qwen2"])
    a = ap.parse_args()
    for name in a.families:
        d = os.path.join(a.golden, name)
        if not os.path.exists(os.path.join(d, "model.safetensors")):
            raise SystemExit(f"{d}: no model.safetensors (run tools/gen_golden.py first)")
        make(d, name)


if __name__ == "__main__":
    main()
