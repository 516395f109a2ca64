"""Shared fixtures for the Python-driven tests (differential tests against reference packages,
end-to-end tests with the official openai SDK). Paths come from the Makefile's environment."""
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
ASSETS = ROOT.parent / "shared" / "assets"


@pytest.fixture(scope="session")
def kiln_bin():
    path = os.environ.get("KILN_BIN", str(ROOT / "build" / "kiln"))
    if not os.path.exists(path):
        pytest.fail(f"kiln binary not found at {path}: run `make build` first")
    return path


@pytest.fixture(scope="session")
def assets():
    if not ASSETS.is_dir():
        pytest.skip(f"../shared/assets not found at {ASSETS}: reference-asset tests skipped")
    return ASSETS
