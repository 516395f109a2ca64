# Regenerates the fuzz seed corpus (tiny valid files): run from the repo root with the venv that has gguf and numpy.
import json, struct, numpy as np, gguf
rng = np.random.default_rng(7)
def st(path, tensors, meta=None):
    hdr = {}
    if meta: hdr["__metadata__"] = meta
    off = 0; data = b""
    for name, dt, shape, raw in tensors:
        hdr[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(raw)]}
        off += len(raw); data += raw
    h = json.dumps(hdr).encode()
    h += b" " * (-len(h) % 8)
    open(path, "wb").write(struct.pack("<Q", len(h)) + h + data)
d = "fuzz/corpus/safetensors/"
st(d + "small.safetensors", [("w", "F32", [2, 3], np.arange(6, dtype=np.float32).tobytes()),
                             ("b", "BF16", [3], b"\x80\x3f" * 3)], {"format": "pt"})
st(d + "fp8.safetensors", [("l.weight", "F8_E4M3", [4, 4], bytes(range(16))),
                           ("l.weight_scale", "F32", [], struct.pack("<f", 0.5)),
                           ("ids", "I64", [2], struct.pack("<qq", 1, -2)),
                           ("mask", "BOOL", [3], b"\x01\x00\x01"),
                           ("e", "F16", [0, 2], b"")])
st(d + "ints.safetensors", [("a", "I8", [2], b"\x01\xff"), ("b", "U8", [1], b"\x07"), ("c", "I32", [1, 1], b"\x01\x00\x00\x00")])
open(d + "empty.safetensors", "wb").write(struct.pack("<Q", 8) + b"{}      ")

def gg(path, types, extra_kv=True):
    w = gguf.GGUFWriter(path, arch="llama")
    if extra_kv:
        w.add_uint32("llama.block_count", 1)
        w.add_float32("llama.rope.freq_base", 10000.0)
        w.add_bool("b", True)
        w.add_int8("i8", -3); w.add_uint16("u16", 7); w.add_int64("i64", -9); w.add_float64("f64", 0.25)
        w.add_array("tokenizer.ggml.tokens", ["<s>", "a", "\u0120b"])
        w.add_array("tokenizer.ggml.scores", [0.0, -1.0, -2.0])
        w.add_array("tokenizer.ggml.token_type", [3, 1, 1])
        w.add_string("tokenizer.chat_template", "{% for m in messages %}{{ m.content }}{% endfor %}")
    for name in types:
        qt = gguf.GGMLQuantizationType[name]
        be, bb = gguf.constants.GGML_QUANT_SIZES[qt]
        if name == "F32":
            w.add_tensor("t." + name, rng.standard_normal((2, 4)).astype(np.float32))
        elif name == "F16":
            w.add_tensor("t." + name, rng.standard_normal((2, 4)).astype(np.float16))
        else:
            raw = rng.integers(0, 256, size=(2, bb * (256 // be) if be < 256 else bb), dtype=np.uint8)
            w.add_tensor("t." + name, raw, raw_dtype=qt)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
d = "fuzz/corpus/gguf/"
gg(d + "f32_f16.gguf", ["F32", "F16"])
gg(d + "q4.gguf", ["Q4_0", "Q4_1", "Q8_0"], extra_kv=False)
gg(d + "k.gguf", ["Q4_K", "Q6_K"], extra_kv=False)
gg(d + "q5_k23.gguf", ["Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q5_K", "BF16"], extra_kv=False)
