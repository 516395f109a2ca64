#!/usr/bin/env python3
"""Write a copy of a llama-family GGUF with only its first N transformer layers: same vocabulary,
tokenizer, chat template and tensor formats, a fraction of the bytes. Its text is gibberish, but the
server end-to-end tests check protocol behaviour and self-consistency, not quality, so a cut-down
default model (SmolLM2-135M Q4_1, 93 MB -> ~30 MB at 8 layers) can travel to a GPU machine.

  .venv/bin/python tools/make_tiny_gguf.py IN.gguf OUT.gguf --layers 8
"""
import argparse
import re
import sys

import gguf


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--layers", type=int, default=8)
    a = ap.parse_args()

    r = gguf.GGUFReader(a.src)
    arch = r.fields["general.architecture"].contents()
    n_key = f"{arch}.block_count"
    n_src = int(r.fields[n_key].contents())
    if not 1 <= a.layers <= n_src:
        sys.exit(f"--layers must be in 1..{n_src} ({a.src} has {n_src})")

    w = gguf.GGUFWriter(a.dst, arch)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # the writer emits the header and the architecture itself
        vtype = f.types[0]
        value = a.layers if name == n_key else f.contents()
        sub = f.types[1] if vtype == gguf.GGUFValueType.ARRAY and len(f.types) > 1 else None
        w.add_key_value(name, value, vtype, sub_type=sub)

    blk = re.compile(r"^blk\.(\d+)\.")
    kept = 0
    for t in r.tensors:
        m = blk.match(t.name)
        if m and int(m.group(1)) >= a.layers:
            continue
        w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
        kept += 1

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"{a.dst}: {a.layers}/{n_src} layers, {kept} of {len(r.tensors)} tensors")


if __name__ == "__main__":
    main()
