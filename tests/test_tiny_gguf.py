"""Tiny GGUF models load and serve in a CPU llama-server (seed flags adapted to CPU)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import gguf
import pytest

from tests.fixtures.llama_upstream import free_port
from tests.fixtures.tiny_gguf import write_tiny_llama, write_tiny_qwen35moe

SEED_FLAGS_CPU = [
    "-ngl", "999", "-c", "4096", "-ctk", "q8_0", "-ctv", "q8_0", "--parallel", "1",
    "--no-warmup", "--temp", "0.6", "--top-p", "0.95", "--top-k", "20", "--min-p", "0.0",
    "--jinja", "--alias", "tiny",
]


def _http(method: str, url: str, body: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


class Server:
    def __init__(self, bin_dir: Path, model: Path, log: Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [str(bin_dir / "llama-server"), "-m", str(model), "--host", "127.0.0.1",
               "--port", str(self.port), *SEED_FLAGS_CPU, "-t", "2"]
        self.logf = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_healthy(self, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"llama-server exited {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                code, body = _http("GET", self.base + "/health", timeout=2)
                if code == 200:
                    return body
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.1)
        raise AssertionError(f"llama-server not healthy:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.logf.close()


def _serve_and_chat(bin_dir: Path, model: Path, tmp_path: Path) -> dict:
    srv = Server(bin_dir, model, tmp_path / "server.log")
    try:
        assert srv.wait_healthy() == {"status": "ok"}
        code, models = _http("GET", srv.base + "/v1/models")
        assert code == 200 and models["data"][0]["id"] == "tiny"
        code, body = _http("POST", srv.base + "/v1/chat/completions", {
            "model": "tiny",
            "messages": [{"role": "system", "content": "You are tiny."},
                         {"role": "user", "content": "hello world"}],
            "max_tokens": 8,
        }, timeout=60)
        assert code == 200, body
        assert len(body["choices"]) == 1
        choice = body["choices"][0]
        assert choice["message"]["role"] == "assistant"
        assert choice["finish_reason"] in ("length", "stop")
        assert body["usage"]["prompt_tokens"] > 0
        assert "timings" in body
        code, props = _http("GET", srv.base + "/props")
        assert code == 200 and props["total_slots"] == 1
        return body
    finally:
        srv.stop()


def _fit_params(bin_dir: Path, model: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(bin_dir / "llama-fit-params"), "-m", str(model), "-c", "4096", "-ctk", "q8_0",
         "-ctv", "q8_0", "-ngl", "999", "-fitp", "on"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)


# ---------------------------------------------------------------- file format

def test_tiny_llama_is_deterministic_and_small(tmp_path: Path) -> None:
    a = write_tiny_llama(tmp_path / "a", "m", n_shards=3)
    b = write_tiny_llama(tmp_path / "b", "m", n_shards=3)
    assert [p.name for p in a] == [f"m-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    for x, y in zip(a, b):
        assert hashlib.sha256(x.read_bytes()).digest() == hashlib.sha256(y.read_bytes()).digest()
    assert sum(p.stat().st_size for p in a) < 2 * 1024 * 1024
    single = write_tiny_llama(tmp_path / "c", "m")
    assert [p.name for p in single] == ["m.gguf"]


@pytest.mark.parametrize("writer,n_shards", [(write_tiny_llama, 2), (write_tiny_qwen35moe, 4)])
def test_split_layout_matches_gguf_split(tmp_path: Path, writer, n_shards: int) -> None:
    shards = writer(tmp_path, "x", n_shards=n_shards)
    assert len(shards) == n_shards
    total = sum(len(gguf.GGUFReader(p).tensors) for p in shards)
    for i, p in enumerate(shards):
        r = gguf.GGUFReader(p)
        f = r.fields
        assert f["split.no"].types == [gguf.GGUFValueType.UINT16] and f["split.no"].contents() == i
        assert f["split.count"].types == [gguf.GGUFValueType.UINT16]
        assert f["split.count"].contents() == n_shards
        assert f["split.tensors.count"].types == [gguf.GGUFValueType.INT32]
        assert f["split.tensors.count"].contents() == total
        assert len(r.tensors) > 0
        if i == 0:
            assert "general.architecture" in f and "tokenizer.chat_template" in f
            toks = f["tokenizer.ggml.tokens"].contents()
            assert len(toks) >= 256 and "<|im_start|>" in toks and "<|im_end|>" in toks
            assert "<|im_start|>" in f["tokenizer.chat_template"].contents()
        else:
            assert set(f) - {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"} == {
                "split.no", "split.count", "split.tensors.count"}


def test_models_total_under_5mb(tiny_llama_model, tiny_qwen35moe_model) -> None:
    total = sum(p.stat().st_size for p in [*tiny_llama_model, *tiny_qwen35moe_model])
    assert total < 5 * 1024 * 1024


# ---------------------------------------------------------------- llama-server

def test_tiny_llama_serves(llama_cpu_bin: Path, tiny_llama_model, tmp_path: Path) -> None:
    _serve_and_chat(llama_cpu_bin, tiny_llama_model[0], tmp_path)


def test_tiny_qwen35moe_serves(llama_cpu_bin: Path, tiny_qwen35moe_model, tmp_path: Path) -> None:
    _serve_and_chat(llama_cpu_bin, tiny_qwen35moe_model[0], tmp_path)


@pytest.mark.parametrize("which", ["llama", "qwen35moe"])
def test_fit_params_cpu(llama_cpu_bin: Path, tiny_llama_model, tiny_qwen35moe_model, which: str) -> None:
    model = (tiny_llama_model if which == "llama" else tiny_qwen35moe_model)[0]
    res = _fit_params(llama_cpu_bin, model)
    assert res.returncode == 0, res.stderr[-3000:]
    # one line per device: "<device> <model MiB> <context MiB> <compute MiB>"; on CPU only "Host"
    rows = [ln.split() for ln in res.stdout.splitlines() if ln.strip()]
    assert rows, (res.stdout, res.stderr[-2000:])
    assert all(len(r) == 4 and all(x.lstrip("-").isdigit() for x in r[1:]) for r in rows), res.stdout
    assert any(r[0] == "Host" for r in rows)


# ---------------------------------------------------------------- binaries

SEED_SERVER_FLAGS = ["-m", "--host", "--port", "-ngl", "-c", "-ctk", "-ctv", "--parallel",
                     "--split-mode", "-ts", "--no-warmup", "--temp", "--top-p", "--top-k",
                     "--min-p", "--jinja", "--alias", "--api-key-file", "--metrics", "--no-slots"]


def test_server_help_lists_seed_flags(llama_cpu_bin: Path) -> None:
    res = subprocess.run([str(llama_cpu_bin / "llama-server"), "--help"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    assert res.returncode == 0
    flags = set()
    for line in res.stdout.splitlines():
        # "-ngl,  --gpu-layers, --n-gpu-layers N   max. number ..." -> flag names before the text
        for tok in line.replace(",", " ").split():
            if not tok.startswith("-"):
                break
            flags.add(tok)
    missing = [f for f in SEED_SERVER_FLAGS if f not in flags]
    assert not missing, missing


def test_server_version_format(llama_cpu_bin: Path) -> None:
    import re

    res = subprocess.run([str(llama_cpu_bin / "llama-server"), "--version"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    assert res.returncode == 0
    # printed on stderr: "version: 0.5.0-dev (build N, commit abc1234)\nbuilt with GNU 12.2.0 for Linux x86_64"
    assert re.search(r"^version: \S+ \(build \d+, commit ([0-9a-f]{7,}|unknown)\)$", res.stderr, re.M), res.stderr
