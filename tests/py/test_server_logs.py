"""`kiln serve` request logs against the default model: one line per request (a chat completion,
a 404, a 401, a stream), with id, route, status, token counts and times; --log_format json gives
one JSON object per line; prompts and outputs appear only with --log_requests; the API key never."""
import json
import re
import time

import pytest

from test_server_util import KilnServer, default_model, raw_request

KEY = "sk-logtest-7c1e9a44d2"  # distinctive: it must appear nowhere in the log
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "Name a colour of the zebra stripes"


def request_lines(server, n, json_mode=False, timeout=10):
    """The request lines of the log, once there are at least n (a line is written when the last
    byte of its response is, which may be a moment after the client read it)."""
    deadline = time.time() + timeout
    while True:
        text = server.log_text()
        if json_mode:
            lines = [l for l in text.splitlines() if l.startswith("{") and '"msg":"request"' in l]
        else:
            lines = [l for l in text.splitlines() if " info request " in l]
        lines = [l for l in lines if "/health" not in l]  # the helper polls /health while waiting
        if len(lines) >= n or time.time() > deadline:
            return lines


def chat(port, stream=False, headers=AUTH):
    body = json.dumps({"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 6, "stream": stream})
    return raw_request(port, "POST", "/v1/chat/completions", body, headers=headers)


@pytest.fixture(scope="module")
def plain(kiln_bin):
    with KilnServer(kiln_bin, default_model(), "--api_key", KEY) as s:
        yield s


@pytest.fixture(scope="module")
def jsonl(kiln_bin):
    with KilnServer(kiln_bin, default_model(), "--log_format", "json", "--log_requests") as s:
        yield s


def test_plain_one_line_per_request(plain):
    status, _, body = chat(plain.port)
    assert status == 200, body
    resp = json.loads(body)
    lines = request_lines(plain, 1)
    assert len(lines) == 1, plain.log_text()
    line = lines[0]
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ info request ", line), line
    assert f"id={resp['id']} method=POST route=/v1/chat/completions status=200 " in line, line
    assert f" prompt_tokens={resp['usage']['prompt_tokens']} generated_tokens={resp['usage']['completion_tokens']} " in line
    assert re.search(r" ttft_ms=\d+\.\d .* total_ms=\d+\.\d", line), line

    assert raw_request(plain.port, "GET", "/no/such/route?api_key=zzz", headers=AUTH)[0] == 404
    lines = request_lines(plain, 2)
    assert len(lines) == 2 and " method=GET route=/no/such/route status=404 " in lines[1], lines
    assert "zzz" not in lines[1]

    assert chat(plain.port, headers={"Authorization": "Bearer wrong-key-1234"})[0] == 401
    lines = request_lines(plain, 3)
    assert len(lines) == 3 and " route=/v1/chat/completions status=401 " in lines[2], lines

    status, _, body = chat(plain.port, stream=True)
    assert status == 200 and b"[DONE]" in body
    lines = request_lines(plain, 4)
    assert len(lines) == 4, lines
    assert re.search(r" id=chatcmpl-\S+ method=POST route=/v1/chat/completions status=200 .* stream=true ", lines[3])

    time.sleep(0.2)
    assert len(request_lines(plain, 5, timeout=0)) == 4, plain.log_text()
    log = plain.log_text()
    assert KEY not in log
    assert "wrong-key-1234" not in log
    assert PROMPT not in log and "prompt=" not in log and "output=" not in log  # no --log_requests


def test_json_lines_with_content(jsonl):
    status, _, body = chat(jsonl.port, headers={})
    assert status == 200, body
    resp = json.loads(body)
    assert raw_request(jsonl.port, "GET", "/missing")[0] == 404
    status, _, body = chat(jsonl.port, stream=True, headers={})
    assert status == 200
    lines = request_lines(jsonl, 3, json_mode=True)
    assert len(lines) == 3, jsonl.log_text()
    recs = [json.loads(l) for l in lines]
    r = recs[0]
    assert r["level"] == "info" and r["msg"] == "request" and re.match(r"\d{4}-\d\d-\d\dT", r["time"])
    assert r["id"] == resp["id"] and r["method"] == "POST" and r["route"] == "/v1/chat/completions"
    assert r["status"] == 200 and r["n"] == 1 and r["stream"] is False
    assert r["prompt_tokens"] == resp["usage"]["prompt_tokens"]
    assert r["generated_tokens"] == resp["usage"]["completion_tokens"]
    assert isinstance(r["ttft_ms"], float) and r["total_ms"] >= r["ttft_ms"]
    assert r["finish"] == resp["choices"][0]["finish_reason"]
    assert PROMPT in r["prompt"]  # the rendered chat prompt
    assert r["output"] == [resp["choices"][0]["message"]["content"]]
    assert recs[1]["status"] == 404 and recs[1]["route"] == "/missing" and "prompt" not in recs[1]
    assert recs[2]["stream"] is True and recs[2]["id"].startswith("chatcmpl-") and "output" in recs[2]
    # The server's other lines are JSON too (the non-JSON ones, if any, come from outside the logger).
    for l in jsonl.log_text().splitlines():
        if "kiln serve:" in l:
            assert json.loads(l)["msg"].startswith("kiln serve:")
