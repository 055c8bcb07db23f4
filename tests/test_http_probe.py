"""provision/remote/http_probe.py and tcp_reach.py on their own: run as the rig runs them
(`python3 -c SOURCE MODE`, input on stdin), against tests/fake_llama_server.py (which wants
`Authorization: Bearer` like llama-server) and a small TTFT server; and the readiness gate
rendered from templates/llama-rig-health.sh.j2 (which embeds the same probe)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from provision import reach, remote
from provision.bench import ttft as TT
from provision.steps import service as S

FAKE = Path(__file__).resolve().parent / "fake_llama_server.py"
KEY = "sk-test-probe-key"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def probe(*args: str, stdin: str = "", timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", remote.command("http_probe.py", *args)], input=stdin,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def fake_server():
    port = _port()
    env = dict(os.environ, LLAMA_API_KEY=KEY, FAKE_LOAD_S="1.0")
    p = subprocess.Popen([sys.executable, str(FAKE), "--host", "127.0.0.1", "--port", str(port),
                          "--alias", "tiny"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield port
    finally:
        p.terminate()
        p.wait(5)


def test_wait_polls_health_until_200_and_fails_with_the_last_answer(fake_server):
    url = f"http://127.0.0.1:{fake_server}/health"
    t0 = time.monotonic()
    r = probe("wait", url, "30")
    assert r.returncode == 0, r.stderr
    assert f"{url} -> 200" in r.stdout and time.monotonic() - t0 >= 0.5  # it waited through the 503s
    dead = f"http://127.0.0.1:{_port()}/health"
    r = probe("wait", dead, "0.6")
    assert r.returncode == 1 and "not ready after 0.6s" in r.stderr and "Connection refused" in r.stderr


def test_requests_send_the_key_from_stdin_but_never_to_health(fake_server):
    time.sleep(1.1)
    reqs = [{"name": "health", "path": "/health", "body": None, "auth": False},
            {"name": "models", "path": "/v1/models", "body": None, "auth": True},
            {"name": "chat", "path": "/v1/chat/completions", "auth": True, "timeout": 30,
             "body": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}}]
    base = f"http://127.0.0.1:{fake_server}"
    r = probe("requests", stdin=json.dumps({"base": base, "key": KEY, "requests": reqs}))
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert [got[k][0] for k in ("health", "models", "chat")] == [200, 200, 200]
    assert json.loads(got["chat"][1])["choices"][0]["message"]["content"] == "ready"
    assert KEY not in r.stdout + r.stderr
    r = probe("requests", stdin=json.dumps({"base": base, "key": "wrong", "requests": reqs[:2]}))
    got = json.loads(r.stdout)
    assert got["health"][0] == 200 and got["models"][0] == 401
    r = probe("requests", stdin=json.dumps({"base": f"http://127.0.0.1:{_port()}", "requests": reqs[:1]}))
    assert json.loads(r.stdout)["health"][0] == 0 and "Connection refused" in json.loads(r.stdout)["health"][1]


def test_get_says_whether_a_url_answers(fake_server):
    time.sleep(1.1)
    r = probe("get", f"http://127.0.0.1:{fake_server}/health")
    assert reach.parse_url_probe(r.stdout) is None
    r = probe("get", f"http://127.0.0.1:{_port()}/simple/")
    assert "Connection refused" in reach.parse_url_probe(r.stdout)
    assert reach.url_probe_command("http://x/") == remote.command("http_probe.py", "get", "http://x/")


class _Ttft(BaseHTTPRequestHandler):
    seen: list = []

    def log_message(self, *a):
        pass

    def _send(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200, {"default_generation_settings": {"n_ctx": 1024}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Ttft.seen.append((self.path, self.headers.get("Authorization"), body))
        if self.path == "/tokenize":
            return self._send(200, {"tokens": [5, 6, 7]})
        self._send(200, {"timings": {"prompt_ms": 1.5 * len(body["prompt"]), "prompt_n": len(body["prompt"])}})


def test_ttft_one_prompt_of_exactly_depth_tokens_per_depth():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Ttft)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        a = {"port": srv.server_address[1], "key": KEY, "n_prompt": 16, "depths": [0, 100, 5000]}
        r = probe("ttft", stdin=json.dumps(a))
    finally:
        srv.shutdown()
    assert r.returncode == 0, r.stderr
    got = TT.parse_ttft(r.stdout)
    assert got[0]["n_tokens"] == 16 and got[0]["prompt_ms"] == 24.0 and got[0]["prompt_n"] == 16
    assert got[100]["prompt_n"] == 100 and got[100]["wall_ms"] > 0
    assert "exceeds the server's context of 1024" in got[5000]["error"]
    completions = [(auth, b) for p, auth, b in _Ttft.seen if p == "/completion"]
    assert all(auth == "Bearer " + KEY for auth, _ in completions)
    assert [len(b["prompt"]) for _, b in completions] == [8, 16, 100]  # warm-up, then depths
    assert all(b["cache_prompt"] is False and b["n_predict"] == 1 for _, b in completions)


def test_usage_is_exit_2():
    r = probe("nonsense")
    assert r.returncode == 2 and "usage:" in r.stderr


def test_the_readiness_gate_is_the_probe(fake_server, tmp_path):
    text = S.render_helper({"server": {"start_timeout": 30}})
    assert remote.source("http_probe.py") in text and "\nPY\n" in text
    helper = tmp_path / "llama-rig-health"
    helper.write_text(text.replace("/usr/bin/python3", sys.executable))
    helper.chmod(0o755)
    r = subprocess.run([str(helper), f"http://127.0.0.1:{fake_server}/health"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "-> 200" in r.stdout, r.stderr
    r = subprocess.run([str(helper), f"http://127.0.0.1:{_port()}/health", "0.5"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "not ready after 0.5s" in r.stderr


def test_tcp_reach():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        ok = subprocess.run(["sh", "-c", remote.command("tcp_reach.py", "127.0.0.1", str(s.getsockname()[1]))],
                            capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(["sh", "-c", remote.command("tcp_reach.py", "127.0.0.1", str(_port()))],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1 and bad.stderr.startswith("ConnectionRefusedError: ")


def test_key_inject_feeds_the_key_file_to_the_probe_through_a_pipe(fake_server, tmp_path):
    """remote/key_inject.py on its own, and piped into http_probe.py as auth.keyed() runs it."""
    from provision.steps import api_key as auth

    key_file = tmp_path / "api-key"
    key_file.write_text(KEY + "\n")
    inject = remote.command("key_inject.py", str(key_file))

    def run(cmd: str, stdin: str) -> subprocess.CompletedProcess:
        return subprocess.run(["sh", "-c", cmd], input=stdin, capture_output=True, text=True, timeout=60)

    r = run(inject, json.dumps({"base": "http://x"}) + "\n")
    assert r.returncode == 0 and json.loads(r.stdout) == {"base": "http://x", "key": KEY}
    r = run(inject, json.dumps({"key": "caller-key"}) + "\n")  # the caller's key wins
    assert json.loads(r.stdout) == {"key": "caller-key"}
    missing = remote.command("key_inject.py", str(tmp_path / "nope"))
    r = run(missing, "{}\n")
    assert json.loads(r.stdout) == {} and f"cannot read the API key file {tmp_path / 'nope'}" in r.stderr
    # the command line the service step runs (with KEY_PATH swapped for the test's file)
    cfg = {"server": {"api_key": "auto"}}
    cmd = auth.keyed(cfg, remote.command("http_probe.py", "requests"))
    assert cmd.startswith(remote.command("key_inject.py", auth.KEY_PATH) + " | ")
    cmd = cmd.replace(remote.command("key_inject.py", auth.KEY_PATH), inject, 1)
    assert KEY not in cmd
    time.sleep(1.1)
    reqs = [{"name": "models", "path": "/v1/models", "body": None, "auth": True}]
    r = run(cmd, json.dumps({"base": f"http://127.0.0.1:{fake_server}", "requests": reqs}) + "\n")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["models"][0] == 200 and KEY not in r.stdout + r.stderr
    assert auth.keyed({"server": {"api_key": "none"}}, "probe") == "probe"
