"""A tiny stand-in for `kiln serve` to develop and test web/chat.html without a model: serves the
page at GET /, lists one model, and fakes the OpenAI chat answer, plain or as an SSE stream (fast replies, or a slow
endless one when the last user message contains "long", for the stop button). Records every
chat request and whether the client hung up, so tests can check what the page sent.

    python tests/py/_chat_stub.py [--port 8000] [--api_key KEY]   # then open http://127.0.0.1:8000/
"""
import argparse
import json
import pathlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT = pathlib.Path(__file__).resolve().parents[2]
PAGE = ROOT / "web" / "chat.html"
MODEL = "stub-model"
REPLY = "Hello from the stub! The capital of France is Paris."


class StubState:
    def __init__(self, api_key="", model=MODEL):
        self.api_key = api_key
        self.model = model
        self.chat_requests = []   # parsed JSON bodies of POST /v1/chat/completions
        self.aborted = threading.Event()  # set when a streamed reply's client went away
        self.lock = threading.Lock()


def _handler(state):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet under pytest
            pass

        def _send(self, status, ctype, body, extra=()):
            data = body.encode() if isinstance(body, str) else body
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            for k, v in extra:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status, message, code=None, extra=()):
            body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
            self._send(status, "application/json", json.dumps(body), extra)

        def _authorized(self):
            if not state.api_key:
                return True
            auth = self.headers.get("Authorization", "")
            if auth == "Bearer " + state.api_key:
                return True
            msg = "Incorrect API key provided." if auth else "Missing API key: send 'Authorization: Bearer KEY'."
            self._error(401, msg, "invalid_api_key", [("WWW-Authenticate", "Bearer")])
            return False

        def do_GET(self):
            if self.path == "/":
                return self._send(200, "text/html; charset=utf-8", PAGE.read_bytes(),
                                  [("Cache-Control", "no-cache")])
            if self.path == "/health":
                return self._send(200, "text/plain", "")
            if self.path == "/v1/models":
                if not self._authorized():
                    return
                return self._send(200, "application/json", json.dumps(
                    {"object": "list", "data": [{"id": state.model, "object": "model", "owned_by": "kiln"}]}))
            self._error(404, "no route for GET " + self.path)

        def do_POST(self):
            if self.path != "/v1/chat/completions":
                return self._error(404, "no route for POST " + self.path)
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if not self._authorized():
                return
            with state.lock:
                state.chat_requests.append(body)
            if body.get("model") != state.model:
                return self._error(404, f"The model `{body.get('model')}` does not exist.", "model_not_found")
            last = body["messages"][-1]["content"]
            if not body.get("stream"):
                return self._send(200, "application/json", json.dumps({
                    "id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()), "model": state.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": REPLY},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17}}))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

            def event(obj):
                data = ("data: " + (obj if isinstance(obj, str) else json.dumps(obj)) + "\n\n").encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            def chunk(content=None, finish=None):
                delta = {"content": content} if content is not None else {}
                return {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": int(time.time()),
                        "model": state.model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

            try:
                first = chunk("")
                first["choices"][0]["delta"]["role"] = "assistant"
                event(first)
                if "long" in last:
                    for i in range(600):  # ~60 s unless the client stops it
                        event(chunk(f"word{i} "))
                        time.sleep(0.1)
                else:
                    for word in REPLY.split(" "):
                        event(chunk(word + " "))
                        time.sleep(0.02)
                event(chunk(finish="stop"))
                event("[DONE]")
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                state.aborted.set()
                self.close_connection = True

    return Handler


def start(api_key="", port=0, model=MODEL):
    """Starts the stub on 127.0.0.1 in a daemon thread. Returns (server, state, base_url)."""
    state = StubState(api_key, model)
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(state))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, state, f"http://127.0.0.1:{server.server_address[1]}"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api_key", default="")
    a = ap.parse_args()
    srv, _, url = start(a.api_key, a.port)
    print("stub serving", url)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        srv.shutdown()
