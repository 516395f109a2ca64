import subprocess


def test_version_prints_name_and_commit(kiln_bin):
    out = subprocess.run([kiln_bin, "--version"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("kiln ") and "commit" in out
