"""Helpers for the `kiln serve` end-to-end tests: start a live server on a free port (--port 0; the
bound port is read from its log), wait for /health, raw-socket requests for malformed input, and
/metrics parsing. No tests here."""
import os
import re
import signal
import socket
import subprocess
import tempfile
import time

import pytest

API_KEY = "test-key"


def default_model():
    path = os.environ.get("KILN_DEFAULT_MODEL")
    if not path:
        pytest.skip("KILN_DEFAULT_MODEL is not set: `kiln serve` end-to-end tests need the default model (make model)")
    if not os.path.exists(path):
        pytest.skip(f"KILN_DEFAULT_MODEL={path} does not exist")
    return path


class KilnServer:
    """A `kiln serve` process. Use as a context manager; stop() sends SIGTERM and returns the exit code."""

    def __init__(self, kiln_bin, model, *extra_args, wait_ready=True):
        self.log = tempfile.NamedTemporaryFile(prefix="kiln-serve-", suffix=".log", delete=False)
        args = [kiln_bin, "serve", model, "--port", "0", "--served_model_name", "smol", *extra_args]
        args += ["--device", os.environ.get("KILN_TEST_DEVICE", "cpu")]  # KILN_TEST_DEVICE=cuda: the GPU run
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        self.port = self._wait_port()
        self.base = f"http://127.0.0.1:{self.port}"
        if wait_ready:
            self.wait_ready()

    def log_text(self):
        with open(self.log.name, "r", errors="replace") as f:
            return f.read()

    def _wait_port(self, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = re.search(r"listening on http://[^:]+:(\d+)", self.log_text())
            if m:
                return int(m.group(1))
            if self.proc.poll() is not None:
                raise RuntimeError(f"kiln serve exited with {self.proc.returncode}:\n{self.log_text()}")
            time.sleep(0.02)
        raise RuntimeError(f"kiln serve did not start listening:\n{self.log_text()}")

    def wait_ready(self, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            status, _, _ = raw_request(self.port, "GET", "/health")
            if status == 200:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"kiln serve exited with {self.proc.returncode}:\n{self.log_text()}")
            time.sleep(0.1)
        raise RuntimeError(f"kiln serve not ready after {timeout} s:\n{self.log_text()}")

    def stop(self, timeout=60):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def close(self):
        self.stop()
        if os.path.exists(self.log.name):
            os.unlink(self.log.name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def raw_request(port, method, path, body=b"", headers=None, timeout=30):
    """One request over a fresh socket; returns (status, headers dict, body bytes). (0, {}, b"") if the
    connection failed or closed without a response."""
    headers = dict(headers or {})
    if isinstance(body, str):
        body = body.encode()
    if body or method == "POST":
        headers.setdefault("Content-Type", "application/json")
        headers["Content-Length"] = str(len(body))
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            try:
                s.sendall(head.encode() + body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server answered (413) and closed before taking the whole body
            return read_response(s)
    except OSError:
        return 0, {}, b""


def read_response(s):
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    if b"\r\n\r\n" not in data:
        return 0, {}, b""
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    if hdrs.get("transfer-encoding") == "chunked":
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            n = int(size_line, 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        body = out
    return status, hdrs, body


def metric(port, name, api_key=API_KEY):
    status, _, body = raw_request(port, "GET", "/metrics", headers={"Authorization": f"Bearer {api_key}"})
    assert status == 200, body
    m = re.search(rf"^{re.escape(name)} (\S+)$", body.decode(), re.M)
    return float(m.group(1)) if m else None
