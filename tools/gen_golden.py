#!/usr/bin/env python3
"""Golden fixtures from Hugging Face transformers, the reference no one here wrote.

For small random-weight models of each supported family (and, with --default-model, the default
SmolLM2 GGUF dequantized by transformers' own GGUF loader) this writes, per model, a directory:
  config.json, model.safetensors      (tiny models only: the weights the C++ test loads)
  golden.json                         prompt ids, 32-token greedy continuation, versions, gaps
  logits.bin                          float32 [len(prompt), vocab] first-step logits (all prompt rows;
                                      the default model: last row only)
Everything is computed in float32. The greedy loop is explicit (no generate()), so EOS does not end
it. `top2_gap` records the smallest top-1/top-2 logit gap of each greedy step: a C++ test can only
be asked to reproduce a choice whose gap is above its logit tolerance.

Run where torch + transformers are: python3 tools/gen_golden.py --out tests/golden [--default-model F.gguf]
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM

PROMPT_LEN = 12
NEW_TOKENS = 32

BASE = dict(vocab_size=1024, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5, initializer_range=0.25, bos_token_id=1, eos_token_id=2)

FAMILIES = {
    # Llama 3.1: llama3 rope scaling (original context small enough that all three frequency bands
    # occur at head_dim 16), untied lm_head, eos as a list, bf16 weights.
    "llama31": dict(cls="LlamaConfig", dtype=torch.bfloat16, cfg=dict(
        BASE, head_dim=16, rope_theta=500000.0, tie_word_embeddings=False, eos_token_id=[2, 3],
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64))),
    # Qwen2: q/k/v biases, tied head, f32 weights.
    "qwen2": dict(cls="Qwen2Config", dtype=torch.float32, cfg=dict(
        BASE, rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False)),
    # Mistral: f16 weights, no sliding window.
    "mistral": dict(cls="MistralConfig", dtype=torch.float16, cfg=dict(
        BASE, rope_theta=10000.0, tie_word_embeddings=False, sliding_window=None)),
    # Qwen3: q/k RMSNorm, head_dim (32) independent of hidden/heads (16), bf16 weights.
    "qwen3": dict(cls="Qwen3Config", dtype=torch.bfloat16, cfg=dict(
        BASE, head_dim=32, rope_theta=1000000.0, tie_word_embeddings=True)),
    # Llama 2 style: linear rope scaling, f32.
    "llama_linear": dict(cls="LlamaConfig", dtype=torch.float32, cfg=dict(
        BASE, rope_theta=10000.0, tie_word_embeddings=False,
        rope_scaling=dict(rope_type="linear", factor=2.0))),
}


def greedy(model, prompt):
    ids = torch.tensor([prompt], dtype=torch.long)
    with torch.no_grad():
        first = model(ids).logits[0].float()  # [P, V]
        out, gaps = [], []
        for _ in range(NEW_TOKENS):
            logits = model(ids).logits[0, -1].float()
            top2 = torch.topk(logits, 2).values
            gaps.append(float(top2[0] - top2[1]))
            nxt = int(torch.argmax(logits))
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return first.numpy().astype(np.float32), out, gaps


def versions():
    return {"transformers": transformers.__version__, "torch": torch.__version__,
            "python": sys.version.split()[0]}


MIN_GAP = 0.01  # greedy choices closer than this are re-rolled (C++ tolerance is 1e-3)


def make_family(name, spec, out_dir, seed):
    for attempt in range(50):
        gaps = make_family_once(name, spec, out_dir, seed + 1000 * attempt)
        if min(gaps) > MIN_GAP:
            return
    raise SystemExit(f"{name}: no seed gave greedy gaps above {MIN_GAP}")


def make_family_once(name, spec, out_dir, seed):
    torch.manual_seed(seed)
    cfg_cls = getattr(transformers, spec["cls"])
    cfg = cfg_cls(**spec["cfg"])
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.eval()
    with torch.no_grad():  # norms away from 1 so a missing norm weight shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif n.endswith(".bias"):
                p.copy_(0.3 * torch.randn_like(p))
    # Store in the family's dtype, then compute from exactly the stored values in float32.
    model = model.to(spec["dtype"])
    d = os.path.join(out_dir, name)
    os.makedirs(d, exist_ok=True)
    model.save_pretrained(d, safe_serialization=True)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    model.eval()
    rng = np.random.default_rng(seed)
    prompt = [int(x) for x in rng.integers(4, cfg.vocab_size, PROMPT_LEN)]
    logits, toks, gaps = greedy(model, prompt)
    logits.tofile(os.path.join(d, "logits.bin"))
    for junk in ("generation_config.json",):
        p = os.path.join(d, junk)
        if os.path.exists(p):
            os.remove(p)
    json.dump({"model": name, "prompt_ids": prompt, "greedy_ids": toks, "top2_gap": gaps,
               "logits_shape": list(logits.shape), "logits_rows": "all prompt positions",
               "weights_dtype": str(spec["dtype"]), "compute_dtype": "float32", "seed": seed,
               "versions": versions()},
              open(os.path.join(d, "golden.json"), "w"), indent=1)
    print(f"{name}: seed {seed} prompt {prompt[:4]}... greedy {toks[:8]}... min gap {min(gaps):.4g}")
    return gaps


def make_default(gguf_path, out_dir):
    d = os.path.join(out_dir, "smollm2_q4_1")
    os.makedirs(d, exist_ok=True)
    folder, fname = os.path.split(os.path.abspath(gguf_path))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    model.eval()
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    prompt = tok("The capital of France is", add_special_tokens=False)["input_ids"]
    logits, toks, gaps = greedy(model, prompt)
    logits[-1:].tofile(os.path.join(d, "logits.bin"))
    import hashlib
    sha = hashlib.sha256(open(gguf_path, "rb").read()).hexdigest()
    json.dump({"model": "SmolLM2-135M-Instruct.Q4_1.gguf", "gguf_sha256": sha, "prompt_text": "The capital of France is",
               "prompt_ids": prompt, "greedy_ids": toks, "top2_gap": gaps,
               "logits_shape": [1, logits.shape[1]], "logits_rows": "last prompt position",
               "weights_dtype": "GGUF Q4_1/Q8_0 dequantized by transformers (gguf-py)", "compute_dtype": "float32",
               "versions": versions()}, open(os.path.join(d, "golden.json"), "w"), indent=1)
    print(f"default: prompt {prompt} greedy {toks[:8]}... min gap {min(gaps):.4g}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/golden")
    ap.add_argument("--only", default="")
    ap.add_argument("--default-model", default="")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    if a.default_model:
        make_default(a.default_model, a.out)
    for i, (name, spec) in enumerate(FAMILIES.items()):
        if a.only and name not in a.only.split(","):
            continue
        if a.default_model and not a.only:
            continue
        make_family(name, spec, a.out, seed=1234 + i)


if __name__ == "__main__":
    main()
