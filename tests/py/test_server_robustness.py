"""`kiln serve` under hostile or unlucky clients, against the default model: a table of malformed
requests gets the right status and the server stays healthy; a 10 MB body is refused with 413; a
client sending one byte a second is cut off by --request_timeout; a client killed mid-stream gets
its KV blocks back in the pool; SIGTERM lets an in-flight stream finish and exits 0; /health is
503 while the model loads."""
import json
import socket
import threading
import time

import pytest

from test_server_util import API_KEY, KilnServer, default_model, metric, raw_request

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(kiln_bin):
    with KilnServer(kiln_bin, default_model(), "--api_key", API_KEY, "--request_timeout", "3",
                    "--max_seq_len", "1024") as s:
        yield s


MALFORMED = [
    ("invalid json", "POST", "/v1/completions", '{"prompt": "x",', 400),
    ("not an object", "POST", "/v1/completions", '["x"]', 400),
    ("prompt wrong type", "POST", "/v1/completions", '{"prompt": {"a": 1}}', 400),
    ("max_tokens string", "POST", "/v1/completions", '{"prompt": "x", "max_tokens": "5"}', 400),
    ("max_tokens negative", "POST", "/v1/completions", '{"prompt": "x", "max_tokens": -3}', 400),
    ("max_tokens huge", "POST", "/v1/completions", '{"prompt": "x", "max_tokens": 1e400}', 400),
    ("max_tokens over context", "POST", "/v1/completions", '{"prompt": "x", "max_tokens": 100000}', 400),
    ("n zero", "POST", "/v1/completions", '{"prompt": "x", "n": 0}', 400),
    ("n huge", "POST", "/v1/completions", '{"prompt": "x", "n": 99999999999}', 400),
    ("temperature nan-ish", "POST", "/v1/completions", '{"prompt": "x", "temperature": "NaN"}', 400),
    ("top_p zero", "POST", "/v1/completions", '{"prompt": "x", "top_p": 0}', 400),
    ("logprobs too many", "POST", "/v1/completions", '{"prompt": "x", "logprobs": 50}', 400),
    ("token id out of vocab", "POST", "/v1/completions", '{"prompt": [1, 99999999]}', 400),
    ("five stops", "POST", "/v1/completions", '{"prompt": "x", "stop": ["a","b","c","d","e"]}', 400),
    ("logit_bias bad key", "POST", "/v1/completions", '{"prompt": "x", "logit_bias": {"abc": 1}}', 400),
    ("unknown role", "POST", "/v1/chat/completions", '{"messages": [{"role": "alien", "content": "x"}]}', 400),
    ("messages empty", "POST", "/v1/chat/completions", '{"messages": []}', 400),
    ("content wrong type", "POST", "/v1/chat/completions", '{"messages": [{"role": "user", "content": 3}]}', 400),
    ("image part", "POST", "/v1/chat/completions",
     '{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}', 400),
    ("deeply nested", "POST", "/v1/completions", '{"prompt": ' + "[" * 10000 + "]" * 10000 + "}", 400),
    ("invalid utf-8", "POST", "/v1/completions", b'{"prompt": "\xff\xfe"}', 400),
    ("unknown model", "POST", "/v1/completions", '{"model": "gpt-5", "prompt": "x"}', 404),
    ("unknown route", "GET", "/v1/nothing", "", 404),
    ("wrong method", "GET", "/v1/chat/completions", "", 405),
    ("tokenize no input", "POST", "/tokenize", "{}", 400),
    ("detokenize bad ids", "POST", "/detokenize", '{"tokens": [-1]}', 400),
]


@pytest.mark.parametrize("name,method,path,body,status", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_requests(server, name, method, path, body, status):
    got, headers, resp = raw_request(server.port, method, path, body, headers=AUTH)
    assert got == status, resp
    err = json.loads(resp)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if status == 405:
        assert headers.get("allow")
    assert raw_request(server.port, "GET", "/health")[0] == 200


def test_auth(server):
    body = '{"prompt": "x", "max_tokens": 1}'
    assert raw_request(server.port, "POST", "/v1/completions", body)[0] == 401
    assert raw_request(server.port, "POST", "/v1/completions", body, headers={"Authorization": "Bearer nope"})[0] == 401
    assert raw_request(server.port, "GET", "/metrics")[0] == 401
    assert raw_request(server.port, "GET", "/health")[0] == 200
    assert raw_request(server.port, "POST", "/v1/completions", body, headers=AUTH)[0] == 200


def test_ten_megabyte_body_is_413(server):
    body = '{"prompt": "' + "a" * (10 << 20) + '"}'
    status, _, resp = raw_request(server.port, "POST", "/v1/completions", body, headers=AUTH)
    assert status == 413, resp
    assert raw_request(server.port, "GET", "/health")[0] == 200


def test_one_byte_a_second_is_cut_off(server):
    req = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: 40\r\n\r\n" + b'{"prompt": "x", "max_tokens": 1}' + b" " * 8)
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    t0 = time.time()
    response = b""
    try:
        for byte in req:
            s.sendall(bytes([byte]))
            # Meanwhile the server keeps serving everyone else.
            if byte == ord("\n"):
                assert raw_request(server.port, "GET", "/health")[0] == 200
            time.sleep(1.0)
            if time.time() - t0 > 8:
                break
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            response += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    s.close()
    assert time.time() - t0 < 9, "the slow client held its connection past --request_timeout"
    assert response.startswith(b"HTTP/1.1 408"), response
    assert raw_request(server.port, "GET", "/health")[0] == 200


def test_client_killed_mid_stream_frees_kv_blocks(server):
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True})
    s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    s.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode())
    received = b""
    while received.count(b"data: ") < 3:
        received += s.recv(4096)
    assert metric(server.port, "kiln_kv_blocks_used") > 0
    # Killed: RST, no FIN handshake.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()
    deadline = time.time() + 10
    while time.time() < deadline and metric(server.port, "kiln_kv_blocks_used") != 0:
        time.sleep(0.05)
    assert metric(server.port, "kiln_kv_blocks_used") == 0
    assert metric(server.port, "kiln_num_requests_running") == 0
    text = raw_request(server.port, "GET", "/metrics", headers=AUTH)[2].decode()
    assert 'kiln_request_success_total{finish_reason="abort"}' in text
    assert raw_request(server.port, "GET", "/health")[0] == 200


def test_loading_503_then_sigterm_finishes_in_flight(kiln_bin):
    srv = KilnServer(kiln_bin, default_model(), wait_ready=False)
    try:
        # The listener is up before the model: /health answers (503 while loading, then 200).
        first = raw_request(srv.port, "GET", "/health")[0]
        assert first in (503, 200)
        srv.wait_ready()
        body = json.dumps({"prompt": "Count: 1, 2, 3,", "max_tokens": 40, "ignore_eos": True, "stream": True})
        result = {}

        def client():
            result["response"] = raw_request(srv.port, "POST", "/v1/completions", body, timeout=60)

        t = threading.Thread(target=client)
        t.start()
        time.sleep(0.5)  # the stream is under way
        rc = srv.stop()
        t.join()
        assert rc == 0, srv.log_text()
        status, _, resp = result["response"]
        assert status == 200
        events = [e for e in resp.decode().split("\n\n") if e.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
    finally:
        srv.close()
