"""Short libFuzzer runs of the model-file parsers (fuzz/fuzz_gguf.cpp, fuzz/fuzz_safetensors.cpp),
seeded with the tiny valid files under fuzz/corpus/. The binaries come from `make fuzz`
(build-fuzz/, clang with ASan+UBSan); without them the test skips and says so."""
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _fuzz import FUZZ_DIR, ROOT, run_fuzzer  # noqa: E402


@pytest.mark.parametrize("name", ["gguf", "safetensors"])
def test_fuzz_parser(name, tmp_path):
    binary = FUZZ_DIR / f"fuzz_{name}"
    if not binary.exists():
        pytest.skip(f"{binary} not built: run `make fuzz` (needs clang) to fuzz the {name} parser")
    seeds = ROOT / "fuzz" / "corpus" / name
    assert any(seeds.iterdir()), f"no seed files in {seeds}"
    run_fuzzer(binary, seeds, tmp_path, max_len=16384)
