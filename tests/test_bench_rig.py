"""`invoke bench` / `invoke tune` end to end on a Tier B rig (systemd as PID 1, the fake nvidia-smi
reporting 2 GPUs at 150.25 W + 175.5 W): the real CPU llama-bench and llama-server (the cached
`llama_cpu_bin` build) at the layout the llama step uses (<prefix>/llama.cpp/current/bin/), the
tiny 4-shard qwen35moe (the seed's architecture), llama-server running under systemd as
`llama-server.service`.

* a short sweep (depths 0 and 512, reps 1) via `invoke bench --service stop`: results JSON/CSV/PNG
  on this machine, power summed from the fake nvidia-smi, TTFT measured through the restored
  server, the service stopped for the bench and running (and serving) again afterwards;
* Ctrl-C (SIGINT to `invoke bench`) in the middle of a point: llama-bench is killed on the rig,
  the service comes back, exit status 130;
* `invoke tune --apply` on a tiny sweep writes the pick into hosts.yaml, comments kept.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from provision import inventory as inv
from provision.target import connect

pytestmark = pytest.mark.rig

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "/opt/llama-rig"
BIN = f"{PREFIX}/llama.cpp/current/bin"
MDIR = "/var/lib/llama-rig/models/tiny"
MODEL = f"{MDIR}/tiny-qwen35moe-00001-of-00004.gguf"
PORT = 8000
GPUS = [{"power_draw": 150.25}, {"power_draw": 175.5}]
UNIT = f"""[Unit]
Description=llama.cpp server (test unit for the bench tests)
[Service]
Type=exec
ExecStart={BIN}/llama-server -m {MODEL} --host 127.0.0.1 --port {PORT} -c 2048 -ngl 0 --no-warmup -t 1
ExecStartPost=/usr/local/bin/wait-health
TimeoutStartSec=120
Restart=on-failure
[Install]
WantedBy=multi-user.target
"""
WAIT_HEALTH = f"""#!/usr/bin/python3
import time, urllib.request
for _ in range(480):
    try:
        if urllib.request.urlopen("http://127.0.0.1:{PORT}/health", timeout=2).status == 200:
            raise SystemExit(0)
    except SystemExit:
        raise
    except Exception:
        pass
    time.sleep(0.25)
raise SystemExit(1)
"""
INVENTORY_HEAD = "# bench test inventory (this comment must survive tune --apply)\n"


def write_inventory(path: Path, rig) -> Path:
    entry = rig.inventory_entry(
        gpus={"count": 2}, llama_cpp={"cuda": False},
        server={"port": PORT, "ctx_size": 2048, "tensor_split": [0.9, 1], "alias": "tiny",
                "start_timeout": 120})
    text = yaml.safe_dump({"hosts": {"rig": entry}}, sort_keys=False)
    text = text.replace("    server:\n", "    server:  # the service's flags\n")
    path.write_text(INVENTORY_HEAD + text)
    return path


def _missing_libs(rig, binary: str) -> list[str]:
    out = rig.sh(f"ldd {binary} 2>&1 || true").stdout
    return [ln.split("=>")[0].strip() for ln in out.splitlines() if "not found" in ln]


@pytest.fixture(scope="module")
def brig(rig_factory, llama_cpu_bin, tiny_qwen35moe_model, tmp_path_factory):
    rig = rig_factory(gpus=GPUS)
    tmp = tmp_path_factory.mktemp("bench-rig")
    path = write_inventory(tmp / "hosts.yaml", rig)
    t = connect(inv.load(path).hosts["rig"])
    try:
        for name in ("llama-bench", "llama-server"):
            t.write_file(f"{PREFIX}/llama.cpp/builds/cpu/bin/{name}", (llama_cpu_bin / name).read_bytes(),
                         mode=0o755)
        rig.sh(f"ln -sfn builds/cpu {PREFIX}/llama.cpp/current")
        # the cached build links libgomp etc. dynamically; a minbase rig may lack them
        for name in ("llama-bench", "llama-server"):
            for lib in _missing_libs(rig, f"{BIN}/{name}"):
                host_lib = subprocess.run(["sh", "-c", f"ldconfig -p | grep -m1 '{lib} ' | sed 's/.*=> //'"],
                                          capture_output=True, text=True).stdout.strip()
                t.write_file(f"/usr/local/lib/{lib}", Path(host_lib).read_bytes(), mode=0o644)
        rig.sh("ldconfig")
        for p in tiny_qwen35moe_model:
            t.write_file(f"{MDIR}/{p.name}", p.read_bytes(), mode=0o644)
        t.write_file("/usr/local/bin/wait-health", WAIT_HEALTH, mode=0o755)
        t.write_file("/etc/systemd/system/llama-server.service", UNIT)
        rig.sh("systemctl daemon-reload && systemctl enable --now llama-server.service", timeout=180)
        assert rig.sh("systemctl is-active llama-server").stdout.strip() == "active"
    finally:
        t.close()
    yield rig, path, tmp
    rig_factory.stop(rig)


def invoke(path: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "invoke", *args, "--host", "rig", "--inventory", str(path)],
                          cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200"),
                          capture_output=True, text=True, timeout=timeout)


def main_pid(rig) -> int:
    return int(rig.sh("systemctl show -p MainPID --value llama-server").stdout.strip() or 0)


def serving(rig) -> bool:
    r = rig.sh(f"python3 -c \"import urllib.request as u; print(u.urlopen('http://127.0.0.1:{PORT}/health', timeout=5).status)\"",
               check=False)
    return r.stdout.strip() == "200"


def no_bench_left(rig) -> bool:
    return (rig.sh("pgrep -x llama-bench", check=False).returncode == 1
            and not rig.sh("ls -d /tmp/llama-rig-bench-* 2>/dev/null || true").stdout.strip())


def test_bench_sweep_end_to_end(brig):
    rig, path, tmp = brig
    pid_before = main_pid(rig)
    res_root = tmp / "results"
    r = invoke(path, "bench", "--depths", "0,512", "--reps", "1", "--prompt", "64", "--gen", "16",
               "--service", "stop", "--model", MODEL, "--results", str(res_root))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "stopping llama-server for the bench (--service stop)" in out
    assert "restarting llama-server" in out and "llama-server is back" in out
    assert "context  prefill t/s  decode t/s  TTFT ms" in out
    assert "-ts 0.9/1 -fa 1 -ctk q8_0 -ctv q8_0" in out
    # files on the control machine: results/<host>/<timestamp>/
    (d,) = list((res_root / "rig").iterdir())
    names = sorted(p.name for p in d.iterdir())
    assert names == ["decode.png", "efficiency.png", "power.png", "prefill.png", "results.csv", "results.json"]
    for png in d.glob("*.png"):
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 8000
    doc = json.loads((d / "results.json").read_text())
    assert [p["depth"] for p in doc["points"]] == [0, 512]
    for p in doc["points"]:
        assert p["prefill_ts"] > 0 and p["decode_ts"] > 0
        assert p["power_w"] == pytest.approx(150.25 + 175.5) and p["power_samples"] > 0
        assert p["decode_tokens_per_kwh"] == pytest.approx(p["decode_ts"] * 3600 / 0.32575)
        assert p["ttft_kind"] == "measured" and p["ttft_ms"] > 0
    assert doc["points"][1]["ttft_prompt_tokens"] == 512 and doc["points"][0]["ttft_prompt_tokens"] == 64
    assert doc["service"] == {"installed": True, "was_active": True, "stopped_for_bench": True,
                              "why": "--service stop"}
    assert doc["backends"] == "CPU" and doc["model_type"].startswith("qwen35moe")
    assert "measured" in doc["ttft"]
    csv_lines = (d / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[1].startswith("0,") and csv_lines[2].startswith("512,")
    # the service was really stopped and started again, and serves
    assert rig.sh("systemctl is-active llama-server").stdout.strip() == "active"
    assert main_pid(rig) not in (0, pid_before)
    assert serving(rig) and no_bench_left(rig)
    # nothing secret in what was written
    assert "BEGIN OPENSSH" not in (d / "results.json").read_text()


def test_bench_auto_keeps_a_cpu_service_running(brig):
    rig, path, tmp = brig
    pid = main_pid(rig)
    r = invoke(path, "bench", "--depths", "0", "--reps", "1", "--prompt", "32", "--gen", "8", "--no-ttft",
               "--model", MODEL, "--results", str(tmp / "results-auto"), "--baseline", "none")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "llama-server left as it is (no GPU memory pressure" in out
    assert "(derived)" in out
    assert main_pid(rig) == pid and serving(rig)


def test_ctrl_c_kills_the_bench_and_restores_the_service(brig):
    rig, path, tmp = brig
    proc = subprocess.Popen(
        [sys.executable, "-m", "invoke", "bench", "--host", "rig", "--inventory", str(path),
         "--depths", "0,512", "--reps", "50", "--prompt", "64", "--gen", "16", "--service", "stop",
         "--model", MODEL, "--results", str(tmp / "results-int")],
        cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if rig.sh("pgrep -x llama-bench", check=False).returncode == 0:
                break
            time.sleep(0.5)
        else:
            pytest.fail("llama-bench never started on the rig")
        assert rig.sh("systemctl is-active llama-server", check=False).stdout.strip() != "active"
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-3000:]
    assert "interrupted" in out
    assert "llama-server is back" in out
    assert rig.sh("systemctl is-active llama-server").stdout.strip() == "active"
    assert serving(rig) and no_bench_left(rig)
    assert not (tmp / "results-int").exists()  # no half sweep written as a result


def test_tune_apply_on_the_rig(brig):
    rig, path, tmp = brig
    inv_copy = tmp / "tune-hosts.yaml"
    inv_copy.write_text(path.read_text())
    pid = main_pid(rig)
    r = invoke(inv_copy, "tune", "--depth", "256", "--pairs", "128/256,256/256", "--reps", "1",
               "--service", "keep", "--model", MODEL, "--results", str(tmp / "results-tune"), "--apply")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    (d,) = list((tmp / "results-tune" / "rig").iterdir())
    doc = json.loads((d / "tune.json").read_text())
    labels = [t["label"] for t in doc["trials"]]
    assert labels[:3] == ["ub512/b2048 ts 0.9/1", "ub128/b256 ts 0.9/1", "ub256/b256 ts 0.9/1"]
    assert all(t["prefill_ts"] > 0 for t in doc["trials"])
    best = doc["best"]
    assert doc["speedup_vs_seed"] == pytest.approx(best["prefill_ts"] / doc["seed"]["prefill_ts"])
    assert doc["applied"]["batch_size"] == best["batch"] and doc["applied"]["ubatch_size"] == best["ubatch"]
    text = inv_copy.read_text()
    assert text.startswith(INVENTORY_HEAD) and "server:  # the service's flags" in text
    srv = inv.load(inv_copy).hosts["rig"].cfg["server"]
    assert (srv["batch_size"], srv["ubatch_size"]) == (best["batch"], best["ubatch"])
    assert srv["port"] == PORT and srv["tensor_split"] == (best["tensor_split"] or [0.9, 1])
    assert "BEGIN" not in text and "key" not in text.split("connection:")[0]
    assert main_pid(rig) == pid  # --service keep
