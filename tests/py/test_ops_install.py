"""`cmake --install BUILD --prefix PREFIX` gives a working kiln: PREFIX/bin/kiln, the systemd unit
and its env example under PREFIX/share/kiln/, the guides under PREFIX/share/doc/kiln/.

The build directory is the one holding $KILN_BIN (as `make pytest` sets it), else $KILN_BUILD_DIR,
else build/. Skipped visibly when it is not configured or kiln is not built in it.
"""
import os
import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

# What the install must hold, relative to PREFIX -> the source file it copies.
SHARE_FILES = {
    "share/kiln/kiln.service": "deploy/kiln.service",
    "share/kiln/kiln.env.example": "deploy/kiln.env.example",
    "share/kiln/kiln.sysusers": "deploy/kiln.sysusers",
    "share/kiln/nginx-kiln.conf": "deploy/nginx-kiln.conf",
    "share/doc/kiln/README.md": "README.md",
}


def build_dir():
    cands = []
    if os.environ.get("KILN_BIN"):
        cands.append(pathlib.Path(os.environ["KILN_BIN"]).resolve().parent)
    if os.environ.get("KILN_BUILD_DIR"):
        cands.append(pathlib.Path(os.environ["KILN_BUILD_DIR"]))
    cands.append(ROOT / "build")
    for d in cands:
        if (d / "CMakeCache.txt").exists() and (d / "cmake_install.cmake").exists():
            return d
    return None


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    build = build_dir()
    if build is None:
        pytest.skip("no configured CMake build dir (KILN_BIN's dir, $KILN_BUILD_DIR or build/): install not tested")
    if not (build / "kiln").exists():
        pytest.skip(f"{build}/kiln is not built: install not tested")
    if not shutil.which("cmake"):
        pytest.skip("cmake not on PATH")
    prefix = tmp_path_factory.mktemp("prefix")
    r = subprocess.run(["cmake", "--install", str(build), "--prefix", str(prefix)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return prefix


def installed_version(prefix, tmp_path):
    # From an empty directory with a bare PATH: the installed binary stands alone.
    r = subprocess.run([str(prefix / "bin" / "kiln"), "--version"], capture_output=True, text=True,
                       cwd=tmp_path, env={"PATH": "/usr/bin:/bin"}, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_bin_kiln_runs_version(prefix, tmp_path):
    out = installed_version(prefix, tmp_path)
    assert re.match(r"kiln \d+\.\d+\.\d+", out), out
    assert re.search(r"commit [0-9a-f]{7,}|commit unknown", out), out


def test_version_names_cuda_and_gpu_targets(prefix, tmp_path):
    out = installed_version(prefix, tmp_path).lower()
    # "CUDA 13.0.x, GPU targets 90a" or "CUDA off (CPU only)"
    assert "cuda" in out and re.search(r"gpu targets [0-9a-z;]+|cuda off", out), out


def test_bin_kiln_has_no_libstdcxx_dependency(prefix):
    ldd = shutil.which("ldd")
    if not ldd:
        pytest.skip("ldd not available")
    out = subprocess.run([ldd, str(prefix / "bin" / "kiln")], capture_output=True, text=True).stdout
    assert "libstdc++" not in out, out


@pytest.mark.parametrize("dest,src", sorted(SHARE_FILES.items()))
def test_share_files_installed(prefix, dest, src):
    path = prefix / dest
    assert path.is_file(), f"{dest} not installed (CMake: install(FILES {src} ...))"
    assert path.read_bytes() == (ROOT / src).read_bytes()


def test_guides_installed(prefix):
    docdir = prefix / "share" / "doc" / "kiln"
    assert docdir.is_dir(), "share/doc/kiln/ not installed"
    guides = sorted(p.name for p in (ROOT / "docs" / "guides").glob("*.md"))
    assert guides, "docs/guides/ has no guide"
    installed = sorted(p.name for p in (docdir / "guides").glob("*.md")) if (docdir / "guides").is_dir() else []
    assert installed == guides
