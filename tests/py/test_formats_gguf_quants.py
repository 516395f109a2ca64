"""Differential test of kiln's ggml dequantization against gguf-py (the reference Python package of
ggml/llama.cpp).

gguf-py quantizes random tensors (types it can quantize) and also takes fully random block bytes
(every bit pattern, for all listed types), dequantizes them with its numpy code, and writes both the
quantized tensor "q.<TYPE>.<kind>" and its f32 dequantization "ref.<TYPE>.<kind>" into one GGUF with
its own GGUFWriter. The C++ test GgufQuantFixture.MatchesReference (tests/formats/) then reads that
file with kiln's GGUF reader, dequantizes every q.* tensor and compares with ref.*; this script
checks that it ran and compared every type.
"""
import os
import pathlib
import subprocess

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="gguf-py not installed in the venv (Makefile PIP_TEST)")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.constants import GGML_QUANT_SIZES  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]

TYPES = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]

# Byte offsets of the f16 scale fields in each block: random bytes there could be inf/NaN, which
# would make the comparison meaningless, so they are overwritten with finite random scales.
F16_FIELDS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}


def formats_test_binary():
    explicit = os.environ.get("KILN_TEST_FORMATS")
    if explicit:
        return pathlib.Path(explicit)
    kiln_bin = os.environ.get("KILN_BIN", str(ROOT / "build" / "kiln"))
    return pathlib.Path(kiln_bin).parent / "test_formats"


def random_blocks(rng, name, rows, cols):
    block_elems, block_bytes = GGML_QUANT_SIZES[T[name]]
    n_blocks = rows * cols // block_elems
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for off in F16_FIELDS[name]:
        scales = (rng.standard_normal(n_blocks) * 0.05).astype(np.float16)
        raw[:, off:off + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(rows, cols // block_elems * block_bytes)


def build_fixture(path):
    rng = np.random.default_rng(1234)
    rows, cols = 6, 512
    w = gguf.GGUFWriter(str(path), arch="kiln-test")
    expected = []
    for name in TYPES:
        qt = T[name]
        x = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 3.0, size=(rows, 1))).astype(np.float32)
        # Outliers so the scale/min search of each block gets exercised.
        x[0, 5] = 40.0
        x[1, 300] = -25.0
        variants = {}
        if name == "F32":
            variants["quantized"] = (x, x.copy())
        elif name == "F16":
            h = x.astype(np.float16)
            variants["quantized"] = (h, h.astype(np.float32))
        else:
            try:
                q = gguf.quants.quantize(x, qt)
                variants["quantized"] = (q, gguf.quants.dequantize(q, qt))
            except NotImplementedError:
                pass  # gguf-py dequantizes the K types but cannot quantize them
            if name in F16_FIELDS:
                q = random_blocks(rng, name, rows, cols)
                variants["random"] = (q, gguf.quants.dequantize(q, qt))
        assert variants, name
        for kind, (q, ref) in variants.items():
            ref = np.asarray(ref, dtype=np.float32).reshape(rows, cols)
            assert np.all(np.isfinite(ref)), (name, kind)
            if name in ("F32", "F16"):
                w.add_tensor(f"q.{name}.{kind}", q)
            else:
                w.add_tensor(f"q.{name}.{kind}", q, raw_dtype=qt)
            w.add_tensor(f"ref.{name}.{kind}", ref)
            expected.append(f"q.{name}.{kind}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def test_dequantize_matches_gguf_py(tmp_path):
    binary = formats_test_binary()
    if not binary.exists():
        pytest.fail(f"{binary} not found: build the test_formats target (make build) or set KILN_TEST_FORMATS")
    fixture = tmp_path / "quants.gguf"
    expected = build_fixture(fixture)
    # Every listed type has at least one variant, and every quant type a random-bytes one.
    assert {e.split(".")[1] for e in expected} == set(TYPES)
    env = dict(os.environ, KILN_GGUF_QUANT_FIXTURE=str(fixture))
    proc = subprocess.run([str(binary), "--gtest_filter=GgufQuantFixture.*"], env=env,
                          capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "[  SKIPPED ]" not in out, out
    for name in expected:
        assert f"compared {name} " in out, f"{name} was not compared:\n{out}"
