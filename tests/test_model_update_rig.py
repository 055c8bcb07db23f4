"""`invoke model.update` and `invoke status` on Tier B rigs (systemd as PID 1), end to end through
the real command line: the real huggingface_hub client in the rig's venv against the stand-in hub,
the real CPU llama-server (the cached `llama_cpu_bin` build of the test tree, installed as the
`current` llama.cpp build) run by the service step's unit with --metrics, --no-slots and an API key,
the tiny 4-shard qwen35moe.

In order, on one rig (+ a second one for the fleet view):
1. provision --only model,service: v1 served, the lock written, `status` clean (drift "-");
2. the hub gets a commit that fixes the chat template (only shard 1 changes): `model.update --check`
   shows it and fetches nothing; `model.update` fetches only shard 1 (the hub's log), restarts, the
   server serves the new template (/props), the lock has the new commit;
3. a commit whose shard 2 is broken: first the CDN corrupts it in transit -> sha256 catches it, no
   switch, no restart; then the broken upload itself (its sha256 matches the hub) -> switched,
   llama-server fails to load it -> rolled back, serving the previous commit, the lock unchanged;
4. `status --all` with the second rig's network cut: a row that says unreachable, exit 3; then a
   manual change on the first rig (unit edited, a power limit set by hand): drift "power, unit".
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from provision import inventory as inv
from provision.target import connect
from tests.fixtures.tiny_gguf import CHATML_TEMPLATE, write_tiny_qwen35moe
from tests.fixtures.wheelhouse import WheelServer
from tests.hub.fixtures import make_gguf_like_shards
from tests.hub.server import GeneratedBlob, StandInHub

pytestmark = pytest.mark.rig

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "/opt/llama-rig"
BUILD = "b1-5af12ca-cpu00000"
REPO = "unsloth/Qwen3.5-122B-A10B-GGUF"
RDIR = f"/var/lib/llama-rig/models/{REPO.replace('/', '__')}"
PORT = 8000
KEY = "sk-update-rig-7c41e0"
V2 = "{# llama-rig test template v2 #}"
GPUS = [{"power_draw": 95.5, "temperature": 48}, {"power_draw": 101.25, "temperature": 53}]
RESULTS: dict = {}


def _missing_libs(rig, binary: str) -> list[str]:
    out = rig.sh(f"ldd {binary} 2>&1 || true").stdout
    return [ln.split("=>")[0].strip() for ln in out.splitlines() if "not found" in ln]


@pytest.fixture(scope="module")
def urig(rig_factory, llama_cpu_bin, wheelhouse_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("update-rig")
    rig = rig_factory(gpus=GPUS)
    rig2 = rig_factory()
    hub = StandInHub(rig.host_side).start()
    wheels = WheelServer(wheelhouse_dir, rig.host_side)
    try:
        rig.sh("DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv",
               timeout=900)
        (tmp / "key").write_text(KEY + "\n")
        v1 = write_tiny_qwen35moe(tmp / "v1", "tiny", n_shards=4)
        v2 = write_tiny_qwen35moe(tmp / "v2", "tiny", n_shards=4, chat_template=CHATML_TEMPLATE + V2)
        s = make_gguf_like_shards(hub, REPO, shard_bytes={i + 1: p for i, p in enumerate(v1)},
                                  size=[p.stat().st_size for p in v1], message="upload UD-Q6_K_XL")
        entry = rig.inventory_entry(
            model={"repo": REPO, "include": "UD-Q6_K_XL/*", "endpoint": hub.endpoint,
                   "pip_find_links": wheels.url, "free_space_margin_gb": 0, "max_attempts": 2,
                   "token_env": "LLAMA_RIG_TEST_HF_TOKEN"},
            server={"host": "0.0.0.0", "port": PORT, "ctx_size": 2048, "alias": "tiny", "start_timeout": 120,
                    "extra_args": ["-t", "1"], "api_key_file": str(tmp / "key")},
            llama_cpp={"cuda": False}, opencode={"enabled": False})
        entry2 = rig2.inventory_entry(connection={"connect_timeout": 3})
        path = tmp / "hosts.yaml"
        path.write_text(yaml.safe_dump({"hosts": {"rig": entry, "rig2": entry2}}, sort_keys=False))
        t = connect(inv.load(path).hosts["rig"])
        try:
            bdir = f"{PREFIX}/llama.cpp/builds/{BUILD}"
            for name in ("llama-server", "llama-fit-params"):
                t.write_file(f"{bdir}/bin/{name}", (llama_cpu_bin / name).read_bytes(), mode=0o755)
            t.write_file(f"{bdir}/llama-rig-build.json", json.dumps(
                {"commit": "5af12cab726454cfa5203caaf4473a0255ae7fe1", "build_number": 1, "fingerprint": "cpu"}))
            rig.sh(f"ln -sfn builds/{BUILD} {PREFIX}/llama.cpp/current")
            for name in ("llama-server", "llama-fit-params"):
                for lib in _missing_libs(rig, f"{bdir}/bin/{name}"):
                    host_lib = subprocess.run(["sh", "-c", f"ldconfig -p | grep -m1 '{lib} ' | sed 's/.*=> //'"],
                                              capture_output=True, text=True).stdout.strip()
                    t.write_file(f"/usr/local/lib/{lib}", Path(host_lib).read_bytes(), mode=0o644)
            rig.sh("ldconfig")
        finally:
            t.close()
        yield {"rig": rig, "rig2": rig2, "hub": hub, "path": path, "tmp": tmp, "shards": s, "v2": v2}
    finally:
        wheels.stop()
        hub.stop()
        rig_factory.stop(rig2)
        rig_factory.stop(rig)


def invoke(path: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "invoke", *args, "--inventory", str(path)], cwd=ROOT,
                       env=dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200"),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert KEY not in r.stdout  # the API key is never printed
    return r


def cdn_gets(hub, since: int) -> list[str]:
    return [r.file for r in hub.requests[since:] if r.server == "cdn" and r.method == "GET"]


def starts(rig) -> int:
    r = rig.sh("journalctl -u llama-server.service -o cat --no-pager | grep -c '^Started llama-server' || true")
    return int(r.stdout.strip() or 0)


def props(rig) -> dict:
    r = rig.sh("python3 -c \"import urllib.request as u; print(u.urlopen(u.Request("
               f"'http://127.0.0.1:{PORT}/props', headers={{'Authorization': 'Bearer {KEY}'}}), timeout=10)"
               ".read().decode())\"", check=False)
    return json.loads(r.stdout) if r.returncode == 0 else {}


def lock_commit(tmp: Path) -> str:
    return yaml.safe_load((tmp / "locks/rig.lock.yaml").read_text())["lock"]["model"]["commit"]


def status_json(path: Path, *args: str) -> tuple[int, dict]:
    r = invoke(path, "status", "--json", *args, timeout=120)
    return r.returncode, {s["host"]: s for s in json.loads(r.stdout)}


def test_1_provision_serves_v1_and_status_is_clean(urig):
    rig, path, s = urig["rig"], urig["path"], urig["shards"]
    r = invoke(path, "provision", "--host", "rig", "--only", "model,service")
    assert r.returncode == 0, r.stdout
    assert rig.sh(f"readlink {RDIR}/current").stdout.strip() == f"commits/{s.sha}"
    unit = rig.sh("cat /etc/systemd/system/llama-server.service").stdout
    assert f"-m {RDIR}/current/UD-Q6_K_XL/" in unit and "--metrics --no-slots" in unit
    assert V2 not in (props(rig).get("chat_template") or "") and props(rig).get("chat_template")
    assert lock_commit(urig["tmp"]) == s.sha
    # the summary says how the client downloaded: plain HTTP, because the stand-in offers no Xet
    assert "4 worker(s), plain HTTP (hf_xet installed; the hub offered no Xet)" in r.stdout, r.stdout
    assert "via Xet" not in r.stdout
    assert not [q for q in urig["hub"].requests if "xet" in (q.path or "").lower()]
    rc, rows = status_json(path, "--host", "rig")
    st = rows["rig"]
    assert rc == 0 and st["serving"] and st["health"] == 200 and st["service"]["state"] == "active"
    assert st["drift"] == "-", st["drift_details"]
    assert st["model"]["commit"] == s.sha and st["build"]["name"] == BUILD
    assert st["gpus"]["count"] == 2 and st["gpus"]["temperatures_c"] == [48.0, 53.0]
    assert st["metrics_http"] == 200 and st["metrics"]["tokens_predicted_total"] >= 1  # the gate's completion


def test_2_update_fetches_only_the_changed_shard_and_switches(urig):
    rig, path, hub, s = urig["rig"], urig["path"], urig["hub"], urig["shards"]
    v2 = urig["v2"]
    b = hub.commit(REPO, {s.shards[0]: v2[0]}, message="fix chat template")
    n0 = len(hub.requests)
    r = invoke(path, "model.update", "--host", "rig", "--check")
    assert r.returncode == 0, r.stdout
    assert "1 new commit(s)" in r.stdout and "fix chat template" in r.stdout
    assert "files: 1 changed, 0 added, 0 removed, 3 unchanged" in r.stdout
    assert "would change: download 1 file" in r.stdout and not cdn_gets(hub, n0)
    n_start = starts(rig)
    n1 = len(hub.requests)
    t0 = time.monotonic()
    r = invoke(path, "model.update", "--host", "rig")
    RESULTS["update_s"] = round(time.monotonic() - t0, 1)
    assert r.returncode == 0, r.stdout
    assert cdn_gets(hub, n1) == [s.shards[0]]  # only the changed shard came over the wire
    assert rig.sh(f"readlink {RDIR}/current").stdout.strip() == f"commits/{b}"
    for p in s.shards[1:]:
        assert rig.sh(f"stat -c %i {RDIR}/commits/{s.sha}/{p}").stdout == rig.sh(f"stat -c %i {RDIR}/commits/{b}/{p}").stdout
    assert starts(rig) == n_start + 1
    assert V2 in props(rig)["chat_template"]  # the server loads the new shard 1
    assert lock_commit(urig["tmp"]) == b
    assert f"llama-server serves {REPO}@{b[:7]}, healthy" in r.stdout
    urig["b"] = b


def test_3_broken_shard_caught_in_transit_then_rolled_back(urig):
    rig, path, hub, s = urig["rig"], urig["path"], urig["hub"], urig["shards"]
    b = urig["b"]
    size2 = s.sizes[s.shards[1]]
    c = hub.commit(REPO, {s.shards[1]: GeneratedBlob(size2, "not-a-gguf")}, message="re-upload shard 2")
    n_start = starts(rig)
    # (a) the CDN corrupts it on the way: sha256 catches it, nothing switches, nothing restarts
    fid = hub.faults.set("*-00002-of-*", "corrupt")
    try:
        r = invoke(path, "model.update", "--host", "rig")
    finally:
        hub.faults.clear(fid)
    assert r.returncode == 1
    assert "sha256 still wrong after 2 download attempt(s)" in r.stdout
    assert "(the model in service is untouched)" in r.stdout
    assert rig.sh(f"readlink {RDIR}/current").stdout.strip() == f"commits/{b}" and starts(rig) == n_start
    # (b) the upload itself is broken (its sha256 is the hub's): switched, fails to load, rolled back
    r = invoke(path, "model.update", "--host", "rig")
    assert r.returncode == 1, r.stdout
    assert f"model {c[:7]} failed its health check; rolled back to {b[:7]} (restarted, healthy)" in r.stdout
    assert "pin model.revision: " + b in r.stdout  # main now points at the broken upload: say what to do
    assert rig.sh(f"readlink {RDIR}/current").stdout.strip() == f"commits/{b}"
    assert rig.sh("systemctl is-active llama-server").stdout.strip() == "active"
    assert V2 in props(rig)["chat_template"]  # still serving the previous model
    assert lock_commit(urig["tmp"]) == b


def test_4_status_two_rigs_one_down_then_drift_after_a_manual_change(urig, rig_factory):
    rig, rig2, path = urig["rig"], urig["rig2"], urig["path"]
    rc, rows = status_json(path, "--all")
    assert rc == 1 and rows["rig"]["serving"] and rows["rig2"]["reachable"] and not rows["rig2"]["serving"]
    assert rows["rig2"]["service"]["state"] == "inactive" and rows["rig2"]["drift"] == "no lock"
    before = rows["rig"]["metrics"]["tokens_predicted_total"]
    chat = ("import json, urllib.request as u; print(u.urlopen(u.Request('http://127.0.0.1:%d/v1/chat/completions', "
            "data=json.dumps({'max_tokens': 32, 'messages': [{'role': 'user', 'content': 'hi'}]}).encode(), "
            "headers={'Authorization': 'Bearer %s', 'Content-Type': 'application/json'}), timeout=60).status)" % (PORT, KEY))
    assert rig.sh(f'python3 -c "{chat}"').stdout.strip() == "200"
    rig_factory.kill_network(rig2)
    try:
        t0 = time.monotonic()
        r = invoke(path, "status", "--all", timeout=120)
        RESULTS["status_all_s"] = round(time.monotonic() - t0, 1)
        assert r.returncode == 3, r.stdout
        lines = r.stdout.splitlines()
        assert lines[0].startswith("status (") and lines[1].split()[:3] == ["host", "service", "up"]
        row1 = [ln for ln in lines if ln.startswith("rig ")][0]
        row2 = [ln for ln in lines if ln.startswith("rig2 ")][0]
        assert "active" in row1 and " 200 " in row1 and BUILD in row1 and urig["b"][:7] in row1
        assert "UNREACHABLE" in row2 and "rig2: unreachable: no SSH server answered on " in r.stdout
        assert "within 3 s (is the rig up, is the port right?)" in r.stdout  # connection.connect_timeout
        assert int(row1.split()[-1]) >= before + 1  # the completion above, counted by /metrics
        assert float(row1.split()[-2]) > 0  # its generation t/s
        RESULTS["status_all"] = r.stdout
        print("\n" + r.stdout)
    finally:
        rig_factory.restore_network(rig2)
    # a manual change on the rig: the unit edited by hand, one GPU's power limit set by hand
    rig.sh("sed -i 's/--temp 0.6/--temp 0.9/' /etc/systemd/system/llama-server.service")
    rig.sh("nvidia-smi -i 1 -pl 250")
    rc, rows = status_json(path, "--host", "rig")
    st = rows["rig"]
    assert st["drift"] == "power, unit", st["drift_details"]
    assert any(d.startswith("rendered.llama-server.service: lock ") for d in st["drift_details"])
    r = invoke(path, "status", "--host", "rig", timeout=120)
    assert "power, unit" in r.stdout and "rig: drift: power.limits_w: lock [350.0, 350.0] ≠ rig [350.0, 250.0]" in r.stdout
    print("\n" + r.stdout)
    print("UPDATE RIG RESULTS: " + json.dumps({k: v for k, v in RESULTS.items() if k != "status_all"}))
