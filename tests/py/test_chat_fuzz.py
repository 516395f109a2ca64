"""Short libFuzzer run of the chat-template interpreter (fuzz/fuzz_jinja.cpp), seeded with the
real templates and the snippet table. The binary comes from `make fuzz` (build-fuzz/, clang with
ASan+UBSan); without it the test skips and says so."""
import json
import pathlib
import shutil
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _fuzz import FUZZ_DIR, ROOT, run_fuzzer  # noqa: E402


def test_fuzz_jinja(tmp_path):
    binary = FUZZ_DIR / "fuzz_jinja"
    if not binary.exists():
        pytest.skip(f"{binary} not built: run `make fuzz` (needs clang) to fuzz the template interpreter")
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    snippets = json.loads((ROOT / "tests" / "chat" / "jinja_snippets.json").read_text(encoding="utf-8"))
    for i, case in enumerate(snippets["cases"]):
        (seeds / f"snippet{i}.jinja").write_text(case["template"], encoding="utf-8")
    templates = ROOT.parent / "shared" / "assets" / "templates"
    if templates.is_dir():
        for p in templates.glob("*.jinja"):
            shutil.copy(p, seeds / p.name)
    run_fuzzer(binary, seeds, tmp_path, max_len=4096, extra=["-timeout=10"])
