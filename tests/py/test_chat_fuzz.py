"""Short libFuzzer run of the chat-template interpreter (fuzz/fuzz_jinja.cpp), seeded with the
real templates and the snippet table. The binary comes from `make fuzz` (build-fuzz/, clang with
ASan+UBSan); without it the test skips and says so."""
import json
import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FUZZ_DIR = pathlib.Path(os.environ.get("KILN_FUZZ_DIR", ROOT / "build-fuzz"))
SECONDS = int(os.environ.get("KILN_FUZZ_SECONDS", "20"))


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
    work = tmp_path / "corpus"
    work.mkdir()
    cmd = [str(binary), str(work), str(seeds), f"-max_total_time={SECONDS}", "-rss_limit_mb=2048",
           "-max_len=4096", "-timeout=10", f"-artifact_prefix={tmp_path}/", "-print_final_stats=1"]
    # libFuzzer's log can quote the raw bytes of an input (not UTF-8): decode leniently, it is only shown.
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=SECONDS + 120)
    tail = (proc.stdout + proc.stderr)[-6000:]
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "leak-", "timeout-", "oom-")))
    assert proc.returncode == 0 and not crashes, f"fuzz_jinja failed (rc {proc.returncode}, {crashes}):\n{tail}"
    assert "Done" in tail, tail
