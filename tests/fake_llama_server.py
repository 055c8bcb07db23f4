#!/usr/bin/python3
"""A stand-in llama-server for service-step tests on rigs without a llama.cpp build (stdlib only).

Parses the flags the unit passes (only --host/--port/--alias matter), answers /health with 503
"Loading model" for FAKE_LOAD_S seconds (default 1.5) then 200, /v1/models, /props, and
/v1/chat/completions (a Bearer key required when --api-key-file or LLAMA_API_KEY gives one, like
the real one: /health stays open).
Files under /etc/fake-llama/ steer failures: `chat-fails` -> completions answer 500,
`exit-now` -> exit 1 at start. Prints its argv first (visible in the journal).
"""
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

argv = sys.argv[1:]
print("fake llama-server argv: " + json.dumps(argv), flush=True)
if os.path.exists("/etc/fake-llama/exit-now"):
    print("fake llama-server: told to fail", flush=True)
    sys.exit(1)


def opt(name, default=None):
    return argv[argv.index(name) + 1] if name in argv else default


HOST, PORT = opt("--host", "127.0.0.1"), int(opt("--port", "8080"))
ALIAS = opt("--alias") or opt("-m")
KEY = os.environ.get("LLAMA_API_KEY")
if opt("--api-key-file"):  # like the real one: read at start (as the service user), 1 key a line
    with open(opt("--api-key-file")) as fh:
        KEY = ([ln.strip() for ln in fh if ln.strip()] or [None])[0]
READY_AT = time.monotonic() + float(os.environ.get("FAKE_LOAD_S", "1.5"))


class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _send(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self):
        return not KEY or self.headers.get("Authorization") == "Bearer " + KEY

    def do_GET(self):
        if self.path == "/health":
            if time.monotonic() < READY_AT:
                return self._send(503, {"error": {"code": 503, "message": "Loading model",
                                                  "type": "unavailable_error"}})
            return self._send(200, {"status": "ok"})
        if not self._authorized():
            return self._send(401, {"error": {"code": 401, "message": "Invalid API Key"}})
        if self.path == "/props":
            return self._send(200, {"build_info": "b0-fake", "total_slots": int(opt("--parallel", "1"))})
        if self.path == "/v1/models":
            return self._send(200, {"object": "list", "data": [{"id": ALIAS, "object": "model"}]})
        self._send(404, {"error": {"code": 404, "message": "File Not Found"}})

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(n)
        if not self._authorized():
            return self._send(401, {"error": {"code": 401, "message": "Invalid API Key"}})
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": {"code": 404, "message": "File Not Found"}})
        if os.path.exists("/etc/fake-llama/chat-fails"):
            return self._send(500, {"error": {"code": 500, "message": "fake failure"}})
        self._send(200, {"object": "chat.completion", "model": ALIAS, "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ready"}}]})


print("fake llama-server: listening on %s:%d" % (HOST, PORT), flush=True)
ThreadingHTTPServer((HOST, PORT), H).serve_forever()
