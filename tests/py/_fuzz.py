"""One short libFuzzer run for the fuzz tests (test_formats_fuzz.py, test_chat_fuzz.py): the binaries
come from `make fuzz` (build-fuzz/, or KILN_FUZZ_DIR), each runs KILN_FUZZ_SECONDS (20)."""
import os
import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[2]
FUZZ_DIR = pathlib.Path(os.environ.get("KILN_FUZZ_DIR", ROOT / "build-fuzz"))
SECONDS = int(os.environ.get("KILN_FUZZ_SECONDS", "20"))


def run_fuzzer(binary, seeds, tmp_path, max_len, extra=()):
    """Runs `binary` over a scratch corpus (new inputs go there; `seeds` is only read) and asserts it
    finished cleanly: exit status 0, no crash / leak / timeout / oom artifact, libFuzzer's "Done"."""
    work = tmp_path / "corpus"
    work.mkdir()
    cmd = [str(binary), str(work), str(seeds), f"-max_total_time={SECONDS}", "-rss_limit_mb=2048",
           f"-max_len={max_len}", *extra, f"-artifact_prefix={tmp_path}/", "-print_final_stats=1"]
    # libFuzzer's log can quote the raw bytes of an input (not UTF-8): decode leniently, it is only shown.
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=SECONDS + 120)
    tail = (proc.stdout + proc.stderr)[-6000:]
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "leak-", "timeout-", "oom-")))
    assert proc.returncode == 0 and not crashes, f"{binary.name} failed (rc {proc.returncode}, {crashes}):\n{tail}"
    assert "Done" in tail, tail
