"""Bad model files through the real binary: `kiln run` and `kiln info` exit non-zero with one clear
message naming the file (and the tensor/field), and never crash (no signal, no abort)."""
import json
import os
import pathlib
import shutil
import struct
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "llama31"


def run(kiln_bin, *args):
    p = subprocess.run([kiln_bin, *args], capture_output=True, text=True, timeout=120)
    return p.returncode, p.stderr + p.stdout


def write_safetensors(path, tensors):
    """tensors: {name: (dtype, shape, bytes)} -> a minimal safetensors file."""
    header, data, off = {}, b"", 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        data += raw
        off += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def copy_golden(tmp_path):
    d = tmp_path / "model"
    shutil.copytree(GOLDEN, d)
    return d


def assert_clean_failure(rc, out, *needles):
    assert rc not in (0,) and rc > 0, f"expected a non-zero exit without a signal, got {rc}: {out}"
    for n in needles:
        assert n in out, f"{n!r} not in message: {out}"
    assert "internal check failed" not in out and "Segmentation" not in out, out


@pytest.fixture
def default_model():
    p = os.environ.get("KILN_DEFAULT_MODEL")
    if not p or not os.path.exists(p):
        pytest.skip("KILN_DEFAULT_MODEL not set (make test sets it)")
    return pathlib.Path(p)


@pytest.mark.parametrize("cut", [3, 24, 4096, 1 << 20, 60 << 20])
def test_truncated_gguf(kiln_bin, default_model, tmp_path, cut):
    bad = tmp_path / "cut.gguf"
    with open(default_model, "rb") as f:
        bad.write_bytes(f.read(cut))
    rc, out = run(kiln_bin, "run", str(bad), "--prompt_ids", "1,2,3", "--max_tokens", "2")
    assert_clean_failure(rc, out, str(bad))


def test_not_a_gguf(kiln_bin, tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"GGUX" + b"\0" * 100)
    rc, out = run(kiln_bin, "info", str(bad))
    assert_clean_failure(rc, out, str(bad))


def test_missing_tensor_is_named(kiln_bin, tmp_path):
    d = copy_golden(tmp_path)
    (d / "model.safetensors").unlink()
    cfg = json.loads((d / "config.json").read_text())
    h = cfg["hidden_size"]
    write_safetensors(d / "model.safetensors", {"model.embed_tokens.weight": ("F32", [cfg["vocab_size"], h], b"\0" * (4 * cfg["vocab_size"] * h))})
    rc, out = run(kiln_bin, "run", str(d), "--prompt_ids", "1,2", "--max_tokens", "1")
    assert_clean_failure(rc, out, "missing tensor", "model.norm.weight")


def test_shape_disagreeing_with_config_is_named(kiln_bin, tmp_path):
    d = copy_golden(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = cfg["intermediate_size"] * 2
    (d / "config.json").write_text(json.dumps(cfg))
    rc, out = run(kiln_bin, "run", str(d), "--prompt_ids", "1,2", "--max_tokens", "1")
    assert_clean_failure(rc, out, "model.safetensors", "mlp.gate_proj.weight", "config.json implies")


def test_unsupported_dtype_is_named(kiln_bin, tmp_path):
    d = copy_golden(tmp_path)
    (d / "model.safetensors").unlink()
    write_safetensors(d / "model.safetensors", {"model.embed_tokens.weight": ("F64", [2, 2], b"\0" * 32)})
    rc, out = run(kiln_bin, "info", str(d))
    assert_clean_failure(rc, out, "model.embed_tokens.weight", "F64")


def test_unsupported_architecture(kiln_bin, tmp_path):
    d = copy_golden(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    rc, out = run(kiln_bin, "run", str(d), "--prompt_ids", "1", "--max_tokens", "1")
    assert_clean_failure(rc, out, "GPTNeoXForCausalLM", "supported: LlamaForCausalLM")


def test_corrupt_config_json(kiln_bin, tmp_path):
    d = copy_golden(tmp_path)
    (d / "config.json").write_text("{ not json")
    rc, out = run(kiln_bin, "info", str(d))
    assert_clean_failure(rc, out, "config.json", "not valid JSON")


def test_prompt_id_outside_vocabulary(kiln_bin):
    rc, out = run(kiln_bin, "run", str(GOLDEN), "--prompt_ids", "1,99999", "--max_tokens", "1")
    assert_clean_failure(rc, out, "99999", "outside the vocabulary")


@pytest.mark.parametrize("verb", ["latency", "throughput"])
def test_bench_plan_gemms_needs_dummy_weights_on_a_gpu(kiln_bin, verb):
    # --plan_gemms times cuBLASLt candidates for dummy weights; on the CPU, or for a real model
    # (whose engine carries its plan), it is refused with the reason, never ignored.
    rc, out = run(kiln_bin, "bench", verb, str(GOLDEN), "--plan_gemms", "--device", "cpu", "--output_len", "1")
    assert_clean_failure(rc, out, "--plan_gemms needs --dummy_weights and a cuda device")
    rc, out = run(kiln_bin, "bench", verb, str(GOLDEN / "config.json"), "--dummy_weights", "--plan_gemms",
                  "--device", "cpu", "--output_len", "1")
    assert_clean_failure(rc, out, "--plan_gemms needs --dummy_weights and a cuda device")
