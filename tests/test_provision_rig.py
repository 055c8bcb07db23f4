"""End to end on ONE Tier B rig (systemd-nspawn box, real apt): `invoke provision --only
facts,system` installs the default packages, the second run changes nothing, `--check` on the
fresh box changes nothing, and an unreachable rig fails within the connect timeout."""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from provision import inventory as inv
from tests.rigs import recap_row

pytestmark = pytest.mark.rig

REPO = Path(__file__).resolve().parents[1]
HOST = "rigx"
CONNECT_TIMEOUT = 5


@pytest.fixture(scope="module")
def box(rig_factory):
    r = rig_factory()  # fake nvidia-smi: 6 x RTX 3090, driver answers
    try:
        yield r
    finally:
        rig_factory.stop(r)


def write_inventory(path: Path, rig, **conn) -> Path:
    entry = rig.inventory_entry(
        connection={"connect_timeout": CONNECT_TIMEOUT, **conn},
        gpus={"count": 6},
        llama_cpp={"cuda": False},
        system={"kernel_headers": False},  # the rig runs the host's kernel; no headers for it
    )
    path.write_text(yaml.safe_dump({"hosts": {HOST: entry}}, sort_keys=False))
    return path


def invoke(*args, timeout=900):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "invoke", *args], cwd=REPO, capture_output=True,
                       text=True, timeout=timeout)
    r.seconds = time.monotonic() - t0
    return r


def recap(out: str) -> dict:
    return recap_row(out, HOST)


def snapshot(rig) -> dict:
    """What --check must not touch: installed packages, every file under /etc (content, mode,
    owner), and the llama-rig state dir."""
    dpkg = rig.sh("dpkg -l | sort").stdout
    etc = rig.sh("find /etc -xdev \\( -type f -o -type l -o -type d \\) -printf '%p %y %m %u %g %l\\n' | sort; "
                 "find /etc -xdev -type f -print0 | sort -z | xargs -0 sha256sum").stdout
    state = rig.sh("ls -la /var/lib/llama-rig /opt/llama-rig 2>&1 || true").stdout
    return {"dpkg": dpkg, "etc": etc, "state": state}


def test_check_then_apply_then_idempotent(box, tmp_path):
    # the shipped inventory's defaults are what users get: no package list override
    f = write_inventory(tmp_path / "hosts.yaml", box)
    cfg = inv.load(f).hosts[HOST].cfg
    assert cfg["system"]["packages"] == inv.DEFAULT_PACKAGES and cfg["system"]["extra_packages"] == []
    missing_before = [p for p in inv.DEFAULT_PACKAGES
                      if box.sh(f"dpkg -s {p} >/dev/null 2>&1", check=False).returncode != 0]
    assert "cmake" in missing_before and "build-essential" in missing_before

    # 1. --check on the fresh rig changes nothing: all steps (later ones may fail here, e.g.
    # the llama step cannot reach github from the rig; still nothing may change) ...
    before = snapshot(box)
    r = invoke("provision", "--host", HOST, "--check", "--inventory", str(f))
    assert "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert "recap (check mode: nothing was changed)" in r.stdout
    assert recap(r.stdout)["result"] in ("ok", "FAILED")
    assert snapshot(box) == before
    # ... and facts,system, which must succeed
    r = invoke("provision", "--host", HOST, "--only", "facts,system", "--check", "--inventory", str(f))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"[{HOST}] system: would change: install packages: {' '.join(missing_before)}" in r.stdout
    assert "recap (check mode: nothing was changed)" in r.stdout
    assert recap(r.stdout)["changed"] == "1"
    assert snapshot(box) == before

    # 2. apply: the packages are really installed -- while something else (unattended-upgrades
    # on a fresh Ubuntu box) holds the dpkg lock for a few seconds: apt waits instead of failing
    box.sh("setsid python3 -c \"import fcntl,time; f=open('/var/lib/dpkg/lock-frontend','w'); "
           "fcntl.lockf(f, fcntl.LOCK_EX); open('/run/lock-held','w').close(); time.sleep(6)\" "
           "</dev/null >/dev/null 2>&1 &")
    deadline = time.monotonic() + 10
    while box.sh("test -e /run/lock-held", check=False).returncode != 0:
        assert time.monotonic() < deadline, "lock holder did not start"
        time.sleep(0.1)
    r = invoke("provision", "--host", HOST, "--only", "facts,system", "--inventory", str(f))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"[{HOST}] system: changed (1 change)" in r.stdout
    row = recap(r.stdout)
    assert (row["result"], row["changed"], row["failed"]) == ("ok", "1", "0")
    st = box.sh("dpkg -s cmake | grep '^Status:'").stdout
    assert st.strip() == "Status: install ok installed"
    for p in inv.DEFAULT_PACKAGES:
        assert box.sh(f"dpkg -s {p} >/dev/null 2>&1", check=False).returncode == 0, p
    assert box.sh("cmake --version").stdout.startswith("cmake version ")

    # 3. second run: 0 changes
    r = invoke("provision", "--host", HOST, "--only", "facts,system", "--inventory", str(f))
    assert r.returncode == 0, r.stdout + r.stderr
    row = recap(r.stdout)
    assert (row["result"], row["changed"], row["failed"]) == ("ok", "0", "0")
    assert f"[{HOST}] system: ok (no change)" in r.stdout
    assert "change:" not in r.stdout


def test_check_as_sudo_user_changes_nothing(box, tmp_path):
    """--check through the sudo user (reads with sudo, writes nothing, not even state)."""
    f = write_inventory(tmp_path / "hosts.yaml", box.as_user("rigadmin"))
    before = snapshot(box)
    r = invoke("provision", "--host", HOST, "--only", "facts,system", "--check", "--inventory", str(f))
    assert r.returncode == 0, r.stdout + r.stderr
    assert recap(r.stdout)["result"] == "ok"
    assert snapshot(box) == before


def test_unreachable_empty_address_fails_within_timeout(box, tmp_path):
    # an address in the rig's /24 with nothing on it
    empty = re.sub(r"\.2$", ".77", box.address)
    assert empty != box.address
    f = write_inventory(tmp_path / "hosts.yaml", box, address=empty)
    r = invoke("provision", "--host", HOST, "--check", "--inventory", str(f), timeout=120)
    assert r.returncode == 3, r.stdout + r.stderr
    assert r.seconds < CONNECT_TIMEOUT + 10
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0] in (f"[{HOST}] UNREACHABLE: cannot reach {empty}:22: No route to host (is the rig up, "
                        "is the port right?)",
                        f"[{HOST}] UNREACHABLE: no SSH server answered on {empty}:22 within {CONNECT_TIMEOUT:g} s "
                        "(is the rig up, is the port right?)"), lines[0]
    assert recap(r.stdout)["result"] == "UNREACHABLE"


def test_unreachable_cut_network_fails_within_timeout(box, rig_factory, tmp_path):
    f = write_inventory(tmp_path / "hosts.yaml", box)
    rig_factory.kill_network(box)
    try:
        r = invoke("provision", "--host", HOST, "--check", "--inventory", str(f), timeout=120)
    finally:
        rig_factory.restore_network(box)
    assert r.returncode == 3, r.stdout + r.stderr
    assert r.seconds < CONNECT_TIMEOUT + 10
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0] in (f"[{HOST}] UNREACHABLE: cannot reach {box.address}:22: No route to host (is the rig "
                        "up, is the port right?)",
                        f"[{HOST}] UNREACHABLE: no SSH server answered on {box.address}:22 within "
                        f"{CONNECT_TIMEOUT:g} s (is the rig up, is the port right?)"), lines[0]


def test_facts_task_on_the_rig(box, tmp_path):
    f = write_inventory(tmp_path / "hosts.yaml", box)
    r = invoke("facts", "--host", HOST, "--inventory", str(f), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {ln.split("  ", 1)[0]: ln.split("  ", 1)[1].strip()
            for ln in r.stdout.splitlines()[2:] if "  " in ln}
    assert rows["os"] == "Debian GNU/Linux 12 (bookworm)"
    assert rows["driver / CUDA"] == "570.133.20 / 12.8"
    assert [k for k in rows if k.startswith("gpu ")] == [f"gpu {i}" for i in range(6)]
    assert rows["gpu 0"].startswith("NVIDIA GeForce RTX 3090, cc 8.6, 24576 MiB, power 350.0 W")


def test_driver_not_answering_fails_the_system_step(box, tmp_path):
    f = write_inventory(tmp_path / "hosts.yaml", box)
    box.sh("mkdir -p /etc/fake-nvidia-smi && echo '{\"driver_loaded\": false}' > /etc/fake-nvidia-smi/gpus.json")
    try:
        r = invoke("provision", "--host", HOST, "--only", "facts,system", "--inventory", str(f),
                   timeout=300)
    finally:
        box.sh("rm -f /etc/fake-nvidia-smi/gpus.json")
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.splitlines() == [
        f"[{HOST}] system: FAILED: the NVIDIA driver does not answer (nvidia-smi failed (exit 9): "
        "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure "
        "that the latest NVIDIA driver is installed and running.) — install it: set system.driver: "
        "install (nvidia-open from NVIDIA's repo), or install a driver yourself and reboot"]
    row = recap(r.stdout)
    assert (row["result"], row["failed"]) == ("FAILED", "1")
