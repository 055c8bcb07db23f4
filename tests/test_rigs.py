"""Tests for the test-rig infrastructure itself (tests/rigs)."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fabric
import paramiko
import pytest

from tests.rigs import Rig, tcp_banner
from tests.rigs.nspawn import sweep_stale

FAKE_SMI = Path(__file__).parent / "rigs" / "fake_nvidia_smi.py"


def connect(rig: Rig, user: str | None = None, known_hosts: Path | None = None,
            timeout: float = 10) -> fabric.Connection:
    """Fabric connection per rigs.md: strict host key checking against rig.known_hosts."""
    c = fabric.Connection(
        rig.address, user=user or rig.user, port=rig.port, connect_timeout=timeout,
        config=fabric.Config(overrides={"load_ssh_configs": False,
                                       "run": {"in_stream": False}}),
        connect_kwargs={"key_filename": [str(rig.key_file)], "look_for_keys": False,
                        "allow_agent": False})
    c.client.load_host_keys(str(known_hosts or rig.known_hosts))
    c.client.set_missing_host_key_policy(paramiko.RejectPolicy())
    return c


# ------------------------------------------------------------------------------------------
# Tier A
# ------------------------------------------------------------------------------------------

@pytest.mark.sshd
def test_sshd_root_and_sudo_user(sshd, tmp_path):
    root, sudo = sshd.root_rig, sshd.sudo_rig
    assert root.port == sudo.port and root.address == "127.0.0.1" == root.host_side
    assert stat.S_IMODE(root.key_file.stat().st_mode) == 0o600
    assert root.known_hosts.read_text().startswith(f"[127.0.0.1]:{root.port} ssh-ed25519 ")
    assert root.root is not None and root.root.is_dir()

    with connect(root) as c:
        assert c.run("id -u", hide=True).stdout.strip() == "0"
    with connect(sudo) as c:
        assert c.run("id -un", hide=True).stdout.strip() == "rigadmin"
        assert c.run("sudo -n id -u", hide=True).stdout.strip() == "0"
        # put + sudo install, the pattern the library uses for root-owned files
        src = tmp_path / "payload"
        src.write_text("hello\n")
        c.put(str(src), "/tmp/rig-payload-test")
        dest = sudo.root / "etc/thing"
        c.run(f"sudo -n install -D -m 0640 -o root /tmp/rig-payload-test {dest} "
              "&& rm /tmp/rig-payload-test", hide=True)
    assert root.sh(f"stat -c %a:%U {dest}").stdout.strip() == "640:root"
    assert root.sh('echo "$RIG_ROOT"').stdout.strip() == str(root.root)

    entry = sudo.inventory_entry(connection={"port": 2222}, labels=["a"])
    assert entry == {"connection": {"type": "ssh", "address": "127.0.0.1", "port": 2222,
                                    "user": "rigadmin", "key": str(sudo.key_file),
                                    "known_hosts": str(sudo.known_hosts),
                                    "host_key_policy": "strict"},
                     "labels": ["a"]}


@pytest.mark.sshd
def test_sshd_unknown_host_key_rejected(sshd, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    c = connect(sshd.root_rig, known_hosts=empty)
    with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
        c.open()
    c.close()


@pytest.mark.sshd
def test_sshd_cleanup(rig_keys, _rig_sudo_user):
    from tests.rigs.sshd import start_sshd
    s = start_sshd(*rig_keys)
    assert s.start_s < 5
    d, root, pid = s.dir, s.root, s.popen.pid
    s.stop()
    assert not d.exists() and not root.exists()
    assert s.popen.poll() is not None
    assert not tcp_banner("127.0.0.1", s.port, timeout=1)


# ------------------------------------------------------------------------------------------
# fake nvidia-smi, on the host (env vars redirect config and state)
# ------------------------------------------------------------------------------------------

def smi(tmp_path: Path, *args: str, config=None):
    cfg = tmp_path / "gpus.json"
    if config is not None:
        cfg.write_text(json.dumps(config))
    env = dict(os.environ, FAKE_NVIDIA_SMI_CONFIG=str(cfg),
               FAKE_NVIDIA_SMI_STATE=str(tmp_path / "run" / "state.json"))
    argv = [sys.executable, str(FAKE_SMI), *args]
    return subprocess.run(argv, env=env, text=True, capture_output=True, timeout=30)


QUERY = ("index,uuid,name,pci.bus_id,compute_cap,memory.total,persistence_mode,power.draw,"
         "power.limit,power.default_limit,power.min_limit,power.max_limit")


def test_fake_smi_query_formats(tmp_path):
    r = smi(tmp_path, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 6
    f = lines[0].split(", ")
    assert f[0] == "0" and f[1].startswith("GPU-") and f[2] == "NVIDIA GeForce RTX 3090"
    assert f[3:7] == ["00000000:01:00.0", "8.6", "24576", "Disabled"]
    assert 20 <= float(f[7]) <= 30
    assert f[8:] == ["350.00", "350.00", "100.00", "350.00"]
    assert lines[5].split(", ")[3] == "00000000:06:00.0"
    assert len({line.split(", ")[1] for line in lines}) == 6  # unique uuids

    r = smi(tmp_path, "--query-gpu=index,power.limit,memory.total,memory.used,memory.free,"
            "temperature.gpu,utilization.gpu,driver_version", "--format=csv")
    lines = r.stdout.splitlines()
    assert lines[0] == ("index, power.limit [W], memory.total [MiB], memory.used [MiB], "
                        "memory.free [MiB], temperature.gpu, utilization.gpu [%], driver_version")
    v = lines[1].split(", ")
    assert v[1] == "350.00 W" and v[2] == "24576 MiB" and v[6] == "0 %" and v[7] == "570.133.20"
    assert int(v[3].split()[0]) + int(v[4].split()[0]) == 24576

    r = smi(tmp_path, "--query-gpu=index,power.limit", "--format=csv,nounits")
    assert r.stdout.splitlines()[:2] == ["index, power.limit [W]", "0, 350.00"]
    r = smi(tmp_path, "--query-gpu=index,power.limit", "--format=csv,noheader")
    assert r.stdout.splitlines()[0] == "0, 350.00 W"

    r = smi(tmp_path, "--query-gpu=index,bogus.field", "--format=csv")
    assert r.returncode == 2 and 'Field "bogus.field" is not a valid field to query.' in r.stdout


def test_fake_smi_select_and_set(tmp_path):
    r = smi(tmp_path, "-i", "0,1", "-pl", "280")
    assert r.returncode == 0
    assert "Power limit for GPU 00000000:01:00.0 was set to 280.00 W from 350.00 W." in r.stdout
    assert "Power limit for GPU 00000000:02:00.0 was set to 280.00 W from 350.00 W." in r.stdout
    assert r.stdout.rstrip().endswith("All done.")
    r = smi(tmp_path, "--query-gpu=index,power.limit", "--format=csv,noheader,nounits")
    assert r.stdout.splitlines() == ["0, 280.00", "1, 280.00", "2, 350.00", "3, 350.00",
                                     "4, 350.00", "5, 350.00"]
    r = smi(tmp_path, "-i", "2", "--query-gpu=index,pci.bus_id", "--format=csv,noheader")
    assert r.stdout == "2, 00000000:03:00.0\n"

    r = smi(tmp_path, "-i", "1", "-pm", "1")
    assert r.stdout == "Enabled persistence mode for GPU 00000000:02:00.0.\nAll done.\n"
    r = smi(tmp_path, "-pm", "1")
    assert "Persistence mode is already Enabled for GPU 00000000:02:00.0." in r.stdout
    assert "Enabled persistence mode for GPU 00000000:01:00.0." in r.stdout
    r = smi(tmp_path, "--query-gpu=persistence_mode", "--format=csv,noheader")
    assert set(r.stdout.split()) == {"Enabled"}

    r = smi(tmp_path, "-pl", "10")
    assert r.returncode == 2
    assert r.stdout == ("Provided power limit 10.00 W is not a valid power limit which should be "
                        "between 100.00 W and 350.00 W for GPU 00000000:01:00.0\n"
                        "Terminating early due to previous errors.\n")

    r = smi(tmp_path, "-i", "7", "-L")
    assert r.returncode == 6 and "No devices were found" in r.stdout

    # "reboot": /run is tmpfs; deleting the state file resets to defaults
    (tmp_path / "run" / "state.json").unlink()
    r = smi(tmp_path, "--query-gpu=persistence_mode,power.limit", "--format=csv,noheader")
    assert set(r.stdout.splitlines()) == {"Disabled, 350.00 W"}


def test_fake_smi_non_root():
    # pytest's tmp dirs and pyenv's python live under 0700 dirs: use /tmp and /usr/bin/python3
    d = Path(tempfile.mkdtemp(prefix="fake-smi-"))
    try:
        os.chmod(d, 0o755)
        shutil.copy(FAKE_SMI, d / "nvidia-smi")
        env = dict(os.environ, FAKE_NVIDIA_SMI_CONFIG=str(d / "gpus.json"),
                   FAKE_NVIDIA_SMI_STATE=str(d / "run" / "state.json"))

        def nobody(*args):
            return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                   "/usr/bin/python3", str(d / "nvidia-smi"), *args], env=env,
                                  text=True, capture_output=True, timeout=30)

        r = nobody("-pl", "300")
        assert r.returncode == 4 and "Insufficient Permissions" in r.stdout, r
        assert r.stdout.rstrip().endswith("Terminating early due to previous errors.")
        r = nobody("-pm", "1")
        assert r.returncode == 4 and "Insufficient Permissions" in r.stdout, r
        r = nobody("--query-gpu=power.limit", "--format=csv,noheader")
        assert r.returncode == 0 and r.stdout.splitlines()[0] == "350.00 W", r
        assert not (d / "run" / "state.json").exists()
    finally:
        shutil.rmtree(d)


def test_fake_smi_config_variants(tmp_path):
    h200 = {"name": "NVIDIA H200", "compute_cap": "9.0", "memory_total": 143771,
            "power_min": 200, "power_max": 700, "power_default": 700}
    cfg = {"gpus": [h200, dict(h200, power_limit_supported=False)], "power_draw": 280.5}
    r = smi(tmp_path, "-pl", "500", config=cfg)
    assert r.returncode == 0
    assert "Power limit for GPU 00000000:01:00.0 was set to 500.00 W from 700.00 W." in r.stdout
    assert ("Changing power management limit is not supported for GPU: 00000000:02:00.0.\n"
            "Treating as warning and moving on.\n") in r.stdout
    assert r.stdout.endswith("All done.\n")
    r = smi(tmp_path, "--query-gpu=name,memory.total,power.draw,power.limit",
            "--format=csv,noheader,nounits", config=cfg)
    assert r.stdout.splitlines() == ["NVIDIA H200, 143771, 280.50, 500.00",
                                     "NVIDIA H200, 143771, 280.50, 700.00"]
    r = smi(tmp_path, "-L", config=cfg)
    assert r.stdout.startswith("GPU 0: NVIDIA H200 (UUID: GPU-")

    r = smi(tmp_path, "--query-gpu=index", "--format=csv", config={"driver_loaded": False})
    assert r.returncode == 9
    assert r.stdout.startswith("NVIDIA-SMI has failed because it couldn't communicate with the "
                               "NVIDIA driver.")

    r = smi(tmp_path, "-q", "-d", "POWER", "-i", "1", config=cfg)
    assert r.returncode == 0 and "GPU 00000000:02:00.0" in r.stdout
    assert re.search(r"^ +Current Power Limit +: \[Not Supported\]$", r.stdout, re.M)

    r = smi(tmp_path, config=[{}, {}])
    assert r.returncode == 0
    assert "Driver Version: 570.133.20" in r.stdout and "CUDA Version: 12.8" in r.stdout
    assert r.stdout.count("NVIDIA GeForce RTX 3090") == 2


# ------------------------------------------------------------------------------------------
# Tier B
# ------------------------------------------------------------------------------------------

H200 = {"name": "NVIDIA H200", "compute_cap": "9.0", "memory_total": 143771,
        "power_min": 200, "power_max": 700, "power_default": 700}


@pytest.fixture(scope="module")
def second_rig(rig_factory):
    """A second box with a custom GPU list (one board without power-limit support)."""
    r = rig_factory(gpus=[H200, dict(H200, power_limit_supported=False)])
    yield r
    rig_factory.stop(r)


@pytest.mark.rig
def test_rig_boots_with_systemd(session_rig, rig_factory):
    r = session_rig
    assert r.address.startswith("10.250.") and r.address.endswith(".2") and r.port == 22
    assert r.host_side == r.address.rsplit(".", 1)[0] + ".1" and r.root is None
    assert r.sh("cat /proc/1/comm").stdout.strip() == "systemd"
    state = r.sh("systemctl is-system-running --wait", check=False, timeout=60).stdout.strip()
    assert state in ("running", "degraded"), r.sh("systemctl --failed", check=False).stdout
    assert r.sh("hostname").stdout.strip() == r.name
    assert r.sh("systemctl is-active ssh").stdout.strip() == "active"
    # no build tools preinstalled: the toolkit's system step must install them
    assert r.sh("command -v git cmake gcc", check=False).returncode != 0
    assert rig_factory.boot_seconds(r) < 30


@pytest.mark.rig
def test_rig_apt_install_through_proxy(session_rig, apt_proxy):
    r = session_rig
    assert "10.250.0.1:3142" in r.sh("cat /etc/apt/apt.conf.d/01proxy").stdout
    assert "default" not in r.sh("ip route").stdout  # apt can only work through the proxy
    t = time.monotonic()
    res = r.sh("DEBIAN_FRONTEND=noninteractive apt-get install -y -q hello", timeout=300)
    elapsed = time.monotonic() - t
    assert r.sh("hello").stdout.strip() == "Hello, world!", res.stdout
    print(f"apt-get install hello: {elapsed:.1f}s")
    r.sh("apt-get update -q", timeout=300)  # lists refresh through the proxy too
    # the proxy really served (and cached) it
    log = (apt_proxy.log_dir / "apt-cacher.log").read_text(errors="replace")
    assert "/hello_" in log


@pytest.mark.rig
def test_rig_ssh_login_and_host_key_policy(session_rig, second_rig):
    r = session_rig
    with connect(r) as c:
        assert c.run("hostname", hide=True).stdout.strip() == r.name
        assert c.run("id -u", hide=True).stdout.strip() == "0"
    with connect(r, user="rigadmin") as c:
        assert c.run("sudo -n id -u", hide=True).stdout.strip() == "0"
    # the other rig's known_hosts does not vouch for this box
    c = connect(r, known_hosts=second_rig.known_hosts)
    with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
        c.open()
    c.close()
    # a wrong key for the right host: paramiko raises BadHostKeyException
    wrong = Path(str(r.known_hosts) + ".wrong")
    other = second_rig.known_hosts.read_text().replace(second_rig.address, r.address)
    wrong.write_text(other)
    try:
        c = connect(r, known_hosts=wrong)
        with pytest.raises(paramiko.BadHostKeyException):
            c.open()
        c.close()
    finally:
        wrong.unlink()


@pytest.mark.rig
def test_rigs_are_isolated(session_rig, second_rig):
    a, b = session_rig, second_rig
    assert a.address != b.address and a.host_side != b.host_side
    probe = ("python3 -c 'import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])),"
             " timeout=3)' {} {}")
    assert a.sh(probe.format(b.address, 22), check=False).returncode != 0
    assert b.sh(probe.format(a.address, 22), check=False).returncode != 0
    assert a.sh(probe.format(b.host_side, 22), check=False).returncode != 0
    assert a.sh(probe.format("1.1.1.1", 80), check=False).returncode != 0
    assert a.sh(probe.format(a.address, 22)).returncode == 0

    # a service bound to host_side is reachable from its own rig only
    srv = socket.socket()
    srv.bind((a.host_side, 0))
    srv.listen(4)
    port = srv.getsockname()[1]
    try:
        assert a.sh(probe.format(a.host_side, port)).returncode == 0
        assert b.sh(probe.format(a.host_side, port), check=False).returncode != 0
    finally:
        srv.close()


@pytest.mark.rig
def test_rig_fake_nvidia_smi(session_rig):
    r = session_rig
    assert r.sh("stat -c %a /usr/bin/nvidia-smi").stdout.strip() == "755"
    out = r.sh(f"nvidia-smi --query-gpu={QUERY} --format=csv,noheader,nounits").stdout
    rows = [line.split(", ") for line in out.splitlines()]
    assert len(rows) == 6 and rows[0][2] == "NVIDIA GeForce RTX 3090" and rows[0][8] == "350.00"

    res = r.sh("nvidia-smi -i 0,1 -pl 300")
    assert "Power limit for GPU 00000000:02:00.0 was set to 300.00 W from 350.00 W." in res.stdout
    res = r.sh("nvidia-smi -pl 400", check=False)
    assert res.returncode == 2 and "between 100.00 W and 350.00 W" in res.stdout
    res = r.sh("runuser -u rigadmin -- nvidia-smi -pl 300", check=False)
    assert res.returncode == 4 and "Insufficient Permissions" in res.stdout
    limits = r.sh("nvidia-smi --query-gpu=power.limit --format=csv,noheader,nounits").stdout
    assert limits.split() == ["300.00", "300.00"] + ["350.00"] * 4
    r.sh("rm /run/fake-nvidia-smi/state.json")
    limits = r.sh("nvidia-smi --query-gpu=power.limit --format=csv,noheader,nounits").stdout
    assert limits.split() == ["350.00"] * 6


@pytest.mark.rig
def test_rig_custom_gpus_unsupported_board(second_rig):
    r = second_rig
    res = r.sh("nvidia-smi -pl 500")
    assert "Power limit for GPU 00000000:01:00.0 was set to 500.00 W from 700.00 W." in res.stdout
    assert ("Changing power management limit is not supported for GPU: 00000000:02:00.0.\n"
            "Treating as warning and moving on.\nAll done.\n") in res.stdout
    out = r.sh("nvidia-smi --query-gpu=name,compute_cap,memory.total,power.limit "
               "--format=csv,noheader").stdout
    assert out.splitlines() == ["NVIDIA H200, 9.0, 143771 MiB, 500.00 W",
                                "NVIDIA H200, 9.0, 143771 MiB, 700.00 W"]


@pytest.mark.rig
def test_rig_network_drill_and_reboot(second_rig, rig_factory):
    r = second_rig
    c = connect(r, timeout=5)
    assert c.run("true", hide=True).ok
    rig_factory.kill_network(r)
    try:
        with pytest.raises(Exception):
            c.client.exec_command("true", timeout=2)[1].read()
        with pytest.raises(Exception):
            connect(r, timeout=2).open()
    finally:
        rig_factory.restore_network(r)
        c.close()
    with connect(r) as c2:
        assert c2.run("echo back", hide=True).stdout.strip() == "back"

    # reboot: same disk and host keys, fresh /run (fake nvidia-smi state lost)
    r.sh("nvidia-smi -i 0 -pl 450 && touch /root/on-disk /run/on-tmpfs")
    rig_factory.reboot(r)
    assert r.sh("test -e /root/on-disk && ! test -e /run/on-tmpfs", check=False).returncode == 0
    assert r.sh("nvidia-smi -i 0 --query-gpu=power.limit --format=csv,noheader").stdout == \
        "700.00 W\n"
    with connect(r) as c3:  # host key unchanged across reboot
        assert c3.run("cat /proc/1/comm", hide=True).stdout.strip() == "systemd"

    # a reboot asked for inside the box (nspawn exits 133) brings it back, like hardware
    nr = rig_factory._get(r)
    old_leader = nr.leader
    r.sh("touch /run/on-tmpfs && systemctl reboot")
    deadline = time.monotonic() + 60
    while nr.leader in (old_leader, None):
        assert time.monotonic() < deadline and nr.state != "off", nr.state
        time.sleep(0.05)
    rig_factory.wait_running(r)
    assert r.sh("test -e /run/on-tmpfs", check=False).returncode == 1
    assert r.sh("systemctl is-system-running --wait", check=False).stdout.strip() in (
        "running", "degraded")


@pytest.mark.rig
def test_rig_function_fixture_teardown(rig, rig_factory):
    name = rig.name
    assert rig.sh("hostname").stdout.strip() == name
    assert Path(f"/run/netns/{name}").exists()
    rig_factory.stop(rig)
    assert not Path(f"/run/netns/{name}").exists()
    assert subprocess.run(["ip", "link", "show", f"vh-{name}"],
                          capture_output=True).returncode != 0
    assert not Path(f"/run/systemd/nspawn/propagate/{name}").exists()
    # (the sandbox's network may accept any outbound TCP connect: check for a banner instead)
    assert not tcp_banner(rig.address, 22, timeout=1)


@pytest.mark.rig
def test_stale_rig_of_killed_session_is_swept(rig_factory, rig_keys):
    """A session killed with SIGKILL leaves a running box behind; the next one cleans it up."""
    key, pub = rig_keys
    code = ("import sys, time, pathlib; from tests.rigs.nspawn import boot_rig, build_base_image;"
            f"nr = boot_rig(build_base_image(), {pub!r}, pathlib.Path('/tmp'),"
            f" pathlib.Path({str(key)!r}), fake_nvidia_smi=False);"
            "print(nr.name, nr.popen.pid, flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         cwd=Path(__file__).parent.parent)
    try:
        name, pid = p.stdout.readline().split()
    finally:
        p.kill()
        p.wait()
    Path(f"/tmp/{name}.known_hosts").unlink(missing_ok=True)
    assert Path(f"/run/netns/{name}").exists() and os.path.exists(f"/proc/{pid}")
    assert name in sweep_stale()
    assert not Path(f"/run/netns/{name}").exists()
    assert subprocess.run(["ip", "link", "show", f"vh-{name}"],
                          capture_output=True).returncode != 0
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and "Z" not in open(f"/proc/{pid}/stat").read().split()[2]:
        assert time.monotonic() < deadline, "orphaned nspawn still running"
        time.sleep(0.05)
