"""The snippet table tests/chat replays (tests/chat/jinja_snippets.json) must be what Python jinja2
renders today under transformers' settings: regenerate with tools/chat_snippets.py --write."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_snippet_fixture_matches_jinja2():
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "chat_snippets.py"), "--check"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
