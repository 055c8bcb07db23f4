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
* `invoke bench` without --model refuses the unverified model (nothing stopped);
* `invoke tune --apply` with the real llama-bench: pairs, -ts variants and split modes (row runs,
  tensor fails on a CPU build); the confirmed winner -- or nothing -- written into hosts.yaml;
* `invoke tune --power`: the sweep sets each limit (the W drawn prove it), restores the limits
  found; Ctrl-C in the middle restores the limits, then the service, then exits 130.
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


def limits(rig) -> list[float]:
    out = rig.sh("nvidia-smi --query-gpu=power.limit --format=csv,noheader,nounits").stdout
    return [float(x) for x in out.split()]


def test_bench_refuses_an_unverified_model(brig):
    """No --model and no verified model on the rig: one line, exit 1, nothing stopped."""
    rig, path, tmp = brig
    pid = main_pid(rig)
    r = invoke(path, "bench", "--depths", "0", "--reps", "1", "--service", "stop",
               "--results", str(tmp / "results-unverified"))
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]
    assert "no verified model to bench" in out and "--model" in out
    assert "Traceback" not in out
    assert main_pid(rig) == pid and serving(rig)
    assert not (tmp / "results-unverified").exists()


def test_tune_with_splits_and_apply_on_the_rig(brig):
    """The real llama-bench: the current flags ub1/b256 against ub256/b256, then the -ts variants and
    split modes with the leading pair. `-sm row` runs on the CPU build, `-sm tensor` does not load
    there (FAILED, never a winner). Whatever the verdict -- this 2-core box is shared and its runs
    can differ 10x, so even ub1 vs ub256 is not always beyond the noise (the recorded runs in
    test_tune_flow.py pin both outcomes) -- `--apply` writes exactly the confirmed winner, or nothing."""
    rig, path, tmp = brig
    inv_copy = tmp / "tune-hosts.yaml"
    inv_copy.write_text(path.read_text().replace("    server:  # the service's flags\n",
                                                 "    server:  # the service's flags\n      batch_size: 256\n"
                                                 "      ubatch_size: 1\n"))
    before = inv_copy.read_text()
    assert inv.load(inv_copy).hosts["rig"].cfg["server"]["ubatch_size"] == 1
    pid = main_pid(rig)
    r = invoke(inv_copy, "tune", "--depth", "256", "--pairs", "256/256", "--reps", "3",
               "--model", MODEL, "--results", str(tmp / "results-tune"), "--apply")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    (d,) = list((tmp / "results-tune" / "rig").iterdir())
    doc = json.loads((d / "tune.json").read_text())
    assert doc["current"]["label"] == "ub1/b256 ts 0.9/1" and len(doc["current"]["runs"]) == 3
    by = {c["label"]: c for c in doc["candidates"]}
    assert len(by["ub256/b256 ts 0.9/1"]["runs"]) == 3
    # stage 2: the leading pair (ub256 if it passed the rule, else the current ub1) with the splits
    pair = "ub256/b256" if by["ub256/b256 ts 0.9/1"]["verdict"].startswith("beyond") else "ub1/b256"
    assert doc["stages"][1]["candidates"] == [f"{pair} ts 1/1", f"{pair} ts 1/0.9",
                                              f"{pair} ts 0.9/1 sm row", f"{pair} ts 0.9/1 sm tensor"]
    assert doc["stages"][1]["reference"]["label"] == "ub1/b256 ts 0.9/1"
    assert len(by[f"{pair} ts 0.9/1 sm row"]["runs"]) == 3  # the real llama-bench takes -sm row
    tensor = by[f"{pair} ts 0.9/1 sm tensor"]
    assert not tensor["runs"] and "failed to load model" in tensor["errors"][0]
    assert "VRAM preflight: skipped" in out  # no llama-fit-params on this rig: measured anyway
    srv = inv.load(inv_copy).hosts["rig"].cfg["server"]
    win = doc["winner"]
    if win is None:
        assert doc["verdict"] == "no significant gain over the current flags"
        assert "--apply: nothing written" in out and inv_copy.read_text() == before
    else:
        assert doc["confirmation"] and min(win["confirm"]["runs"]) > max(doc["current"]["confirm"]["runs"])
        assert (srv["batch_size"], srv["ubatch_size"]) == (win["batch"], win["ubatch"])
        assert srv["tensor_split"] == (win["tensor_split"] or [0.9, 1]) and srv["split_mode"] == win["split_mode"]
        text = inv_copy.read_text()
        assert text.startswith(INVENTORY_HEAD) and "server:  # the service's flags" in text
    assert srv["port"] == PORT
    assert main_pid(rig) == pid  # a CPU build: the service kept running
    assert (d / "tune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tune_power_sweeps_and_restores_the_limits(brig):
    """The fake nvidia-smi keeps the limits; a board's draw is held under its limit (150.25 W and
    175.5 W here), so the W measured at each point prove which limit was in effect."""
    rig, path, tmp = brig
    assert limits(rig) == [350.0, 350.0]
    inv_copy = tmp / "power-hosts.yaml"
    inv_copy.write_text(path.read_text())
    r = invoke(inv_copy, "tune", "--power", "--watts", "120,160", "--depth", "0", "--reps", "3",
               "--model", MODEL, "--results", str(tmp / "results-power"), "--apply")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert limits(rig) == [350.0, 350.0]
    assert "power limits restored: GPU 0,1 350 W" in out
    (d,) = list((tmp / "results-power" / "rig").iterdir())
    doc = json.loads((d / "tune-power.json").read_text())
    pts = {p["label"]: p for p in doc["points"]}
    assert list(pts) == ["120 W", "160 W", "350 W"] and pts["350 W"]["found"]
    assert pts["120 W"]["power_w"]["median"] == pytest.approx(240.0)
    assert pts["160 W"]["power_w"]["median"] == pytest.approx(150.25 + 160.0)
    assert pts["350 W"]["power_w"]["median"] == pytest.approx(150.25 + 175.5)
    for p in pts.values():
        assert len(p["decode_ts"]["runs"]) == 3 and p["decode_ts"]["median"] > 0
        # W is the same in every run of a point here, so tokens/kWh follows decode t/s
        assert p["tokens_per_kwh"]["median"] == pytest.approx(
            p["decode_ts"]["median"] * 3600 / (p["power_w"]["median"] / 1000))
    assert doc["knee"]["label"] in pts and doc["most_efficient"]["label"] in pts
    assert (d / "tune-power.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    gpus = inv.load(inv_copy).hosts["rig"].cfg["gpus"]
    if doc["applied"]:
        assert gpus["power_limit"] == doc["applied"]["power_limit"] == pts[doc["winner"]]["watts"]
    else:
        assert doc["winner"] == "no significant gain over the current flags" and inv_copy.read_text() == path.read_text()


def test_ctrl_c_in_a_power_sweep_restores_limits_and_service_then_130(brig):
    rig, path, tmp = brig
    pid = main_pid(rig)
    proc = subprocess.Popen(
        [sys.executable, "-m", "invoke", "tune", "--host", "rig", "--inventory", str(path), "--power",
         "--watts", "120", "--depth", "0", "--reps", "50", "--service", "stop", "--model", MODEL,
         "--results", str(tmp / "results-power-int")],
        cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if rig.sh("pgrep -x llama-bench", check=False).returncode == 0 and limits(rig) == [120.0, 120.0]:
                break
            time.sleep(0.3)
        else:
            pytest.fail("the sweep never ran llama-bench at 120 W")
        assert rig.sh("systemctl is-active llama-server", check=False).stdout.strip() != "active"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-3000:]
    assert out.index("power limits restored") < out.index("llama-server is back") < out.index("interrupted")
    assert limits(rig) == [350.0, 350.0]
    assert rig.sh("systemctl is-active llama-server").stdout.strip() == "active"
    assert main_pid(rig) not in (0, pid) and serving(rig) and no_bench_left(rig)
    assert not (tmp / "results-power-int").exists()
