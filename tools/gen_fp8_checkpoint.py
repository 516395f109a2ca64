#!/usr/bin/env python3
"""Writes a random-weight Hugging Face checkpoint laid out like NVIDIA's ModelOpt FP8 releases
(e.g. nvidia/Llama-3.1-8B-Instruct-FP8): every decoder linear is float8_e4m3fn with a per-tensor
`weight_scale` and a static `input_scale`, k_proj/v_proj carry `k_scale`/`v_scale`, embeddings,
norms and lm_head stay bfloat16, hf_quant_config.json names the algorithm. For speed and start-up
measurements of the real convert -> build -> serve path at 8B scale on the GPU machine (no
download there). Weights are random (std 0.02), so outputs are meaningless text.

    python3 tools/gen_fp8_checkpoint.py --config configs/llama-3.1-8b.json --out /tmp/hf8b \
        [--tokenizer_dir DIR] [--device cuda]
"""
import argparse
import json
import os
import shutil

import torch
from safetensors.torch import save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer_dir", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shard_gb", type=float, default=4.0)
    a = ap.parse_args()
    cfg = json.load(open(a.config))
    H, I, V, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim", H // nh)
    os.makedirs(a.out, exist_ok=True)
    g = torch.Generator(device=a.device).manual_seed(0)

    def bf16(shape, std):
        return (torch.randn(shape, generator=g, device=a.device) * std).to(torch.bfloat16).cpu()

    def fp8(shape, std):
        w = torch.randn(shape, generator=g, device=a.device) * std
        scale = w.abs().max().float() / 448.0
        return (w / scale).to(torch.float8_e4m3fn).cpu(), scale.reshape(()).cpu()

    shards, cur, cur_bytes, index = [], {}, 0, {}

    def put(name, t):
        nonlocal cur, cur_bytes
        cur[name] = t.contiguous()
        cur_bytes += t.numel() * t.element_size()
        if cur_bytes >= a.shard_gb * 1e9:
            flush()

    def flush():
        nonlocal cur, cur_bytes
        if not cur:
            return
        shards.append(cur)
        name = f"model-{len(shards):05d}.safetensors"
        save_file(cur, os.path.join(a.out, name), metadata={"format": "pt"})
        for k in cur:
            index[k] = name
        cur, cur_bytes = {}, 0

    put("model.embed_tokens.weight", bf16((V, H), 1.0))
    for i in range(L):
        p = f"model.layers.{i}."
        put(p + "input_layernorm.weight", torch.ones(H, dtype=torch.bfloat16))
        put(p + "post_attention_layernorm.weight", torch.ones(H, dtype=torch.bfloat16))
        for proj, shape in (("self_attn.q_proj", (nh * hd, H)), ("self_attn.k_proj", (nkv * hd, H)),
                            ("self_attn.v_proj", (nkv * hd, H)), ("self_attn.o_proj", (H, nh * hd)),
                            ("mlp.gate_proj", (I, H)), ("mlp.up_proj", (I, H)), ("mlp.down_proj", (H, I))):
            w, s = fp8(shape, 0.02)
            put(p + proj + ".weight", w)
            put(p + proj + ".weight_scale", s.float())
            put(p + proj + ".input_scale", torch.tensor(0.02, dtype=torch.float32))
        put(p + "self_attn.k_proj.k_scale", torch.tensor(0.05, dtype=torch.float32))
        put(p + "self_attn.v_proj.v_scale", torch.tensor(0.05, dtype=torch.float32))
    put("model.norm.weight", torch.ones(H, dtype=torch.bfloat16))
    put("lm_head.weight", bf16((V, H), 0.02))
    flush()
    total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
    json.dump({"metadata": {"total_size": total}, "weight_map": index},
              open(os.path.join(a.out, "model.safetensors.index.json"), "w"), indent=1)
    c = dict(cfg)
    c["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}
    json.dump(c, open(os.path.join(a.out, "config.json"), "w"), indent=1)
    json.dump({"producer": {"name": "modelopt"},
               "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]}},
              open(os.path.join(a.out, "hf_quant_config.json"), "w"), indent=1)
    if a.tokenizer_dir:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            if os.path.exists(os.path.join(a.tokenizer_dir, f)):
                shutil.copy(os.path.join(a.tokenizer_dir, f), a.out)
    print(f"wrote {a.out}: {len(shards)} shards, {total / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
