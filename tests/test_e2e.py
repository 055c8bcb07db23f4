"""END TO END on one Tier B rig: the llama step's real CPU llama-server (session fixture `llama_rig`)
serving a tiny 4-shard qwen35moe GGUF that the model step pulled from the stand-in hub, with the
seed's flags (ctx adapted to CPU: 40960 so opencode's request fits) through the installed unit ->
/health 200 -> a chat completion -> the REAL opencode client with the config the opencode step
wrote on the rig: `opencode models llama-cpp` lists the model and `opencode run` gets a reply from
that server. Then one flag changed -> exactly one restart; again -> none."""
from __future__ import annotations

import io
import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from provision.app import App
from provision.console import Environment
from tests import opencode_cli
from tests.fixtures.tiny_gguf import write_tiny_qwen35moe
from tests.fixtures.wheelhouse import WheelServer
from tests.hub.fixtures import make_gguf_like_shards
from tests.hub.server import StandInHub

pytestmark = pytest.mark.rig

REPO = "unsloth/Qwen3.5-122B-A10B-GGUF"
ALIAS = "Qwen3.5-122B-A10B-UD-Q6_K_XL"
PORT = 8000
RESULTS: dict = {}


@pytest.fixture(scope="module")
def e2e(llama_rig, wheelhouse_dir, tmp_path_factory):
    rig = llama_rig.rig
    tmp = tmp_path_factory.mktemp("e2e")
    hub = StandInHub(rig.host_side).start()
    wheels = WheelServer(wheelhouse_dir, rig.host_side)
    try:
        shards = write_tiny_qwen35moe(tmp / "gguf", "tiny-qwen35moe", n_shards=4)
        s = make_gguf_like_shards(hub, REPO, shard_bytes={i + 1: p for i, p in enumerate(shards)},
                                  size=[p.stat().st_size for p in shards])
        base = yaml.safe_load(llama_rig.inventory.read_text())["hosts"]["rig"]
        entry = dict(base)
        entry.update({
            "model": {"repo": REPO, "include": "UD-Q6_K_XL/*", "endpoint": hub.endpoint,
                      "pip_find_links": wheels.url, "free_space_margin_gb": 0,
                      "token_env": "LLAMA_RIG_TEST_HF_TOKEN"},
            # the seed's flags; ctx small for a CPU box but large enough for opencode's request
            "server": {"host": "0.0.0.0", "port": PORT, "n_gpu_layers": 999, "ctx_size": 40960,
                       "cache_type_k": "q8_0", "cache_type_v": "q8_0", "parallel": 1,
                       "split_mode": "layer", "warmup": False, "temp": 0.6, "top_p": 0.95,
                       "top_k": 20, "min_p": 0.0, "jinja": True, "alias": ALIAS,
                       "start_timeout": 300},
            "opencode": {"user": "root", "output_limit": 512},
        })
        path = tmp / "hosts.yaml"
        path.write_text(yaml.safe_dump({"hosts": {"rig": entry}}))
        yield {"rig": rig, "llama_rig": llama_rig, "path": path, "tmp": tmp, "shards": s}
    finally:
        wheels.stop()
        hub.stop()


def provision(path: Path, *over: str, check: bool = False, only: str | None = None) -> tuple[int, str, float]:
    out = io.StringIO()
    app = App(str(path), overrides=list(over), env=Environment(out, out, False))
    t0 = time.monotonic()
    rc = int(app.provision("rig", check=check, only=only))
    return rc, out.getvalue(), time.monotonic() - t0


def starts(rig) -> int:
    r = rig.sh("journalctl -u llama-server.service -o cat --no-pager | grep -c '^Started llama-server' || true")
    return int(r.stdout.strip() or 0)


def test_end_to_end(e2e):
    check_end_to_end(e2e["rig"], e2e["path"], e2e["tmp"])


def check_end_to_end(rig, path: Path, tmp: Path, only: str | None = None) -> dict:
    rc, out, secs = provision(path, only=only)
    assert rc == 0, out
    RESULTS["first_provision_s"] = round(secs, 1)
    # the model step pulled and verified the 4 shards; the unit points at shard 1
    unit = rig.sh("cat /etc/systemd/system/llama-server.service").stdout
    exec_line = [ln for ln in unit.splitlines() if ln.startswith("ExecStart=")][0]
    assert re.search(r"-m /var/lib/llama-rig/models/\S+/UD-Q6_K_XL/"
                     r"Qwen3.5-122B-A10B-UD-Q6_K_XL-00001-of-00004.gguf ", exec_line), exec_line
    assert exec_line.endswith("--host 0.0.0.0 --port 8000 -ngl 999 -c 40960 -ctk q8_0 -ctv q8_0 "
                              "--parallel 1 --split-mode layer --no-warmup --temp 0.6 --top-p 0.95 "
                              "--top-k 20 --min-p 0.0 --jinja --alias Qwen3.5-122B-A10B-UD-Q6_K_XL "
                              "--metrics --no-slots --api-key-file /etc/llama-rig/api-key")
    assert exec_line.startswith("ExecStart=/opt/llama-rig/llama.cpp/current/bin/llama-server ")
    # preflight on a CPU build (the rig's fake nvidia-smi shows GPUs): said so, visibly
    assert "VRAM preflight: skipped — CPU build: llama-fit-params reports no CUDA device" in out, out
    m = re.search(r"llama-server.service started and ready in ([0-9.]+)s", out)
    assert m, out
    RESULTS["service_start_s"] = float(m.group(1))
    m = re.search(r"/health 200 in (\d+) ms; chat completion in (\d+) ms: (.*)", out)
    assert m, out
    RESULTS["health_ms_after_start"], RESULTS["chat_ms"] = int(m.group(1)), int(m.group(2))
    assert rig.sh("systemctl is-active llama-server.service").stdout.strip() == "active"
    assert rig.sh("ps -o user= -p $(systemctl show -p MainPID --value llama-server.service)").stdout.strip() == "llama"
    v = rig.sh("systemd-analyze verify /etc/systemd/system/llama-server.service", check=False)
    assert v.returncode == 0 and v.stderr.strip() == "", v.stderr

    # from the control machine: the REAL llama-server refuses a request without the key it was
    # given by path (server.api_key: auto, made on the rig); /health stays open for the readiness gate
    base = f"http://{rig.address}:{PORT}"
    key = rig.sh("cat /etc/llama-rig/api-key").stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{64}", key) and key not in out
    chat = json.dumps({"model": ALIAS, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}).encode()

    def status_of(path: str, k: str | None, data: bytes | None = None) -> int:
        h = {"Content-Type": "application/json", **({"Authorization": f"Bearer {k}"} if k else {})}
        try:
            with urllib.request.urlopen(urllib.request.Request(base + path, data=data, headers=h),
                                        timeout=120) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
    RESULTS["no_key"] = {p: status_of(p, None, d) for p, d in
                         (("/v1/chat/completions", chat), ("/v1/models", None), ("/props", None))}
    assert RESULTS["no_key"] == {"/v1/chat/completions": 401, "/v1/models": 401, "/props": 401}
    assert status_of("/v1/chat/completions", "not-the-key", chat) == 401
    auth = {"Authorization": f"Bearer {key}"}
    t0 = time.monotonic()
    with urllib.request.urlopen(base + "/health", timeout=10) as r:
        assert r.status == 200
    RESULTS["health_ms_from_control"] = round((time.monotonic() - t0) * 1000, 1)
    with urllib.request.urlopen(urllib.request.Request(base + "/v1/models", headers=auth), timeout=10) as r:
        assert [m["id"] for m in json.load(r)["data"]] == [ALIAS]
    with urllib.request.urlopen(urllib.request.Request(base + "/props", headers=auth), timeout=10) as r:
        props = json.load(r)
    assert props["build_info"].startswith("b")
    req = urllib.request.Request(base + "/v1/chat/completions", data=chat,
                                 headers={"Content-Type": "application/json", **auth})
    with urllib.request.urlopen(req, timeout=120) as r:
        body = json.load(r)
    assert body["choices"][0]["message"] is not None and body["usage"]["completion_tokens"] >= 1

    # the REAL opencode client with the config the opencode step wrote on the rig; the key by
    # reference ({file:...} beside the config, the user's 0600 copy made on the rig), never in clear
    cfg_text = rig.sh("cat /root/.config/opencode/opencode.json").stdout
    cfg = json.loads(cfg_text)
    assert key not in cfg_text
    assert cfg["provider"]["llama-cpp"]["options"]["apiKey"] == "{file:llama-rig-llama-cpp.key}"
    assert rig.sh("stat -c '%U %a' /root/.config/opencode/llama-rig-llama-cpp.key").stdout.split() == ["root", "600"]
    (tmp / "llama-rig-llama-cpp.key").write_text(rig.sh("cat /root/.config/opencode/llama-rig-llama-cpp.key").stdout)
    assert cfg["provider"]["llama-cpp"]["options"]["baseURL"] == f"http://{rig.address}:{PORT}/v1"
    assert cfg["provider"]["llama-cpp"]["models"][ALIAS]["limit"] == {"context": 40960, "output": 512}
    local = tmp / "opencode.json"
    local.write_text(cfg_text)
    home = tmp / "oc-home"
    r = opencode_cli.run(["models", "llama-cpp"], local, home, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"llama-cpp/{ALIAS}" in r.stdout.split()
    n_chat = int(rig.sh("journalctl -u llama-server -o cat | grep -c 'processing task' || true").stdout or 0)
    t0 = time.monotonic()
    r = opencode_cli.run(["run", "--title", "smoke", "--format", "json", "-m", f"llama-cpp/{ALIAS}",
                          "Reply: pong"], local, home, timeout=600)
    RESULTS["opencode_run_s"] = round(time.monotonic() - t0, 1)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    events = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    texts = [e for e in events if e.get("type") == "text"]
    assert texts, r.stdout[-3000:]
    reply = json.dumps(texts[0])
    RESULTS["opencode_reply"] = (texts[0].get("part") or {}).get("text", reply)[:120]
    assert not any(e.get("type") == "error" for e in events), r.stdout[-3000:]
    # ... and it came from THIS server
    after = int(rig.sh("journalctl -u llama-server -o cat | grep -c 'processing task' || true").stdout or 0)
    assert after > n_chat
    big = [int(x) for x in re.findall(r"prompt eval time = .*/\s*(\d+) tokens", rig.sh(
        "journalctl -u llama-server -o cat --no-pager").stdout)]
    assert big and max(big) > 1000  # opencode's system prompt + tools reached this server

    # second run: zero changes
    n = starts(rig)
    rc, out, secs = provision(path, only=only)
    assert rc == 0, out
    RESULTS["second_provision_s"] = round(secs, 1)
    assert re.search(r"^rig\s+ok\s+\d+\s+0\s+0\s", out, re.M), out  # recap: 0 changed, 0 failed
    assert starts(rig) == n

    # one flag changed -> exactly one restart; again -> none
    pid = rig.sh("systemctl show -p MainPID --value llama-server.service").stdout.strip()
    rc, out, _ = provision(path, "server.temp=0.7", only=only)
    assert rc == 0, out
    assert "restart llama-server.service (unit changed)" in out and "--temp 0.7" in rig.sh(
        "cat /etc/systemd/system/llama-server.service").stdout
    assert starts(rig) == n + 1
    assert rig.sh("systemctl show -p MainPID --value llama-server.service").stdout.strip() != pid
    rc, out, _ = provision(path, "server.temp=0.7", only=only)
    assert rc == 0 and re.search(r"^rig\s+ok\s+\d+\s+0\s+0", out, re.M), out
    assert starts(rig) == n + 1
    print("\nE2E RESULTS: " + json.dumps(RESULTS))
    return RESULTS
