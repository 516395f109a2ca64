"""Short libFuzzer runs of the model-file parsers (fuzz/fuzz_gguf.cpp, fuzz/fuzz_safetensors.cpp),
seeded with the tiny valid files under fuzz/corpus/. The binaries come from `make fuzz`
(build-fuzz/, clang with ASan+UBSan); without them the test skips and says so."""
import os
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FUZZ_DIR = pathlib.Path(os.environ.get("KILN_FUZZ_DIR", ROOT / "build-fuzz"))
SECONDS = int(os.environ.get("KILN_FUZZ_SECONDS", "20"))


@pytest.mark.parametrize("name", ["gguf", "safetensors"])
def test_fuzz_parser(name, tmp_path):
    binary = FUZZ_DIR / f"fuzz_{name}"
    if not binary.exists():
        pytest.skip(f"{binary} not built: run `make fuzz` (needs clang) to fuzz the {name} parser")
    seeds = ROOT / "fuzz" / "corpus" / name
    assert any(seeds.iterdir()), f"no seed files in {seeds}"
    work = tmp_path / "corpus"
    work.mkdir()
    # New inputs go to the first (scratch) directory; the committed seeds are only read.
    cmd = [str(binary), str(work), str(seeds), f"-max_total_time={SECONDS}", "-rss_limit_mb=2048",
           "-max_len=16384", f"-artifact_prefix={tmp_path}/", "-print_final_stats=1"]
    # libFuzzer's log can quote the raw bytes of an input (not UTF-8): decode leniently, it is only shown.
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=SECONDS + 120)
    tail = (proc.stdout + proc.stderr)[-6000:]
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "leak-", "timeout-", "oom-")))
    assert proc.returncode == 0 and not crashes, f"fuzz_{name} failed (rc {proc.returncode}, {crashes}):\n{tail}"
    assert "Done" in tail, tail
