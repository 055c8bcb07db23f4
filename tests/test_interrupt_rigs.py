"""Ctrl-C (provision/keeper.py): every remote command is its own process group on the rig; Ctrl-C
and a timeout stop that group; `invoke provision --host a,b` ends within 2 s of SIGINT with exit
130 and a recap; what it started on the rigs is gone; an apt/dpkg run it interrupted is repaired
by the next run (`dpkg --configure -a`).

Tier A (sshd on 127.0.0.1) for the command level, two Tier B rigs (real apt, real dpkg) for the
end-to-end run. The long remote command is a real package install whose postinst runs for minutes
(a .deb built on the rig, served from a local apt repo on it).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from provision import inventory as inv
from provision import keeper
from provision.target import connect

ROOT = Path(__file__).resolve().parents[1]


def host_for(rig, **conn):
    return inv.from_data({"hosts": {"r": rig.inventory_entry(connection=conn)}}).hosts["r"]


def gone(pattern: str, timeout: float = 3.0) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode != 0:
            return True
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------------------------------------
# Tier A: one command


@pytest.mark.sshd
@pytest.mark.parametrize("who", ["root_rig", "sudo_rig"])
def test_timeout_stops_the_remote_process_group(sshd, who):
    t = connect(host_for(getattr(sshd, who)))
    try:
        tag = f"{31000 + os.getpid() % 1000}.{len(who)}"
        t0 = time.monotonic()
        r = t.run(f"sleep {tag} & sleep {tag}; echo never", sudo=True, check=False, timeout=1)
        took = time.monotonic() - t0
        assert r.exited == 124 and "never" not in r.stdout and "timed out after 1s" in r.stderr
        assert took < 4, took
        assert gone(f"sleep {tag}"), f"sleep {tag} outlived the timeout"
        # the group id line never reaches the caller
        r = t.run("echo out; echo err >&2; exit 3", check=False)
        assert (r.exited, r.stdout, r.stderr) == (3, "out\n", "err\n")
        lines = []
        t.run("echo a >&2; echo b >&2", on_stderr=lines.append)
        assert lines == ["a", "b"]
    finally:
        t.close()


@pytest.mark.sshd
def test_stdin_is_written_at_full_speed(sshd):
    t = connect(host_for(sshd.sudo_rig))
    try:
        data = "x" * 4_000_000
        t0 = time.monotonic()
        r = t.run("wc -c", stdin=data)
        took = time.monotonic() - t0
        assert r.stdout.strip() == "4000000"
        print(f"\n4 MB of stdin in {took:.2f}s")
        assert took < 10, took  # it was ~100 bytes/s through invoke's Runner
    finally:
        t.close()


@pytest.mark.sshd
def test_ctrl_c_stops_the_command_in_flight_within_2s(sshd):
    """SIGINT to this process while a worker runs a remote command: run_hosts returns
    (interrupted) within 2 s; the remote group is gone; a cleanup() block still runs (and is
    waited for, as the block owes it: keeper.owing)."""
    t = connect(host_for(sshd.sudo_rig))
    tag = f"{32000 + os.getpid() % 1000}"
    started = threading.Event()
    after = []

    def work(_):
        started.set()
        with keeper.owing():  # like RigGuard: the run waits for what this block owes the rig
            try:
                t.run(f"sleep {tag}.5 & sleep {tag}", sudo=True)
            finally:
                with keeper.cleanup():
                    after.append(t.run("echo cleanup").stdout.strip())
            after.append("not reached")

    def fire():
        started.wait(10)
        time.sleep(0.7)
        os.kill(os.getpid(), signal.SIGINT)
    threading.Thread(target=fire, daemon=True).start()
    try:
        t0 = time.monotonic()
        results, interrupted = keeper.run_hosts([0], work, 1)
        took = time.monotonic() - t0 - 0.7
        assert interrupted and results == [None]
        assert took < 2.0, took
        print(f"\ninterrupt -> return {took:.2f}s", after)
        assert after == ["cleanup"]
        assert gone(f"sleep {tag}"), "the remote command outlived Ctrl-C"
    finally:
        t.close()


# ---------------------------------------------------------------------------------------------
# Tier B: invoke provision --host a,b, SIGINT

SLOW_PKG = "llama-rig-slow"
SLOW_FLAG = "/etc/llama-rig-slow"  # postinst sleeps while this exists
SLOW_SECONDS = 300


def add_slow_package(rig) -> None:
    """A real .deb whose postinst sleeps (while SLOW_FLAG exists), in a local apt repo on the rig."""
    rig.sh(f"""set -e
rm -rf /srv/slow && mkdir -p /srv/slow/pkg/DEBIAN /srv/slow/repo
cat > /srv/slow/pkg/DEBIAN/control <<'EOF'
Package: {SLOW_PKG}
Version: 1.0
Architecture: all
Maintainer: llama-rig tests <tests@example.org>
Description: a package whose postinst takes minutes
EOF
cat > /srv/slow/pkg/DEBIAN/postinst <<'EOF'
#!/bin/sh
if [ -e {SLOW_FLAG} ]; then sleep {SLOW_SECONDS}; fi
exit 0
EOF
chmod 755 /srv/slow/pkg/DEBIAN/postinst
dpkg-deb --build /srv/slow/pkg /srv/slow/repo/{SLOW_PKG}_1.0_all.deb >/dev/null
cd /srv/slow/repo
f={SLOW_PKG}_1.0_all.deb
{{ sed -n '1,4p' /srv/slow/pkg/DEBIAN/control; echo "Filename: ./$f"; echo "Size: $(stat -c %s $f)";
  echo "SHA256: $(sha256sum $f | cut -d' ' -f1)"; sed -n '5p' /srv/slow/pkg/DEBIAN/control; }} > Packages
echo 'deb [trusted=yes] file:/srv/slow/repo ./' > /etc/apt/sources.list.d/llama-rig-slow.list
touch {SLOW_FLAG}
""")


def write_inventory(path: Path, rigs: dict, **system) -> Path:
    hosts = {name: r.inventory_entry(connection={"connect_timeout": 5}, gpus={"count": 0},
                                     llama_cpp={"cuda": False},
                                     system={"kernel_headers": False, "packages": [SLOW_PKG], **system})
             for name, r in rigs.items()}
    path.write_text(yaml.safe_dump({"hosts": hosts}, sort_keys=False))
    return path


def argv(inventory: Path, task: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "invoke", "--search-root", str(ROOT), task, "--inventory",
            str(inventory), *args]


def env(**extra) -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200", **extra)


def remote_left(rig) -> str:
    """What of the interrupted run is still running on the rig (apt, dpkg, the postinst)."""
    return rig.sh("ps -eo pid,pgid,args | grep -E 'apt-get|dpkg|postinst|sleep 300' | grep -v grep || true").stdout


def lock_free(rig) -> bool:
    return rig.sh("flock -n /var/lib/llama-rig/run.lock true", check=False).returncode == 0


def start_until(cmd: list[str], ready, timeout: float = 300, **kw):
    """Start `cmd`; return (proc, lines) once ready(lines) is true (its output read in a thread)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)
    lines: list[str] = []
    ev = threading.Event()

    def reader():
        for ln in proc.stdout:
            lines.append(ln)
            if ready(lines):
                ev.set()
        ev.set()
    threading.Thread(target=reader, daemon=True).start()
    if not ev.wait(timeout) or proc.poll() is not None:
        proc.kill()
        raise AssertionError("never got ready:\n" + "".join(lines))
    return proc, lines


@pytest.fixture(scope="module")
def two(rig_factory, tmp_path_factory):
    a, b = rig_factory(), rig_factory()
    try:
        for r in (a, b):
            add_slow_package(r)
        yield {"a": a, "b": b, "tmp": tmp_path_factory.mktemp("interrupt")}
    finally:
        rig_factory.stop(a)
        rig_factory.stop(b)


@pytest.mark.rig
def test_ctrl_c_two_hosts_exit_130_recap_remote_stopped_then_dpkg_repaired(two):
    a, b, tmp = two["a"], two["b"], two["tmp"]
    f = write_inventory(tmp / "hosts.yaml", {"a": a, "b": b})

    def both_in_postinst(_lines) -> bool:
        return all("sleep 300" in remote_left(r) for r in (a, b))
    proc, lines = start_until(argv(f, "provision", "--host", "a,b", "--only", "facts,system"),
                              lambda ls: all(any(f"[{h}] system: change" in x for x in ls) for h in "ab"),
                              env=env())
    try:
        t_wait = time.monotonic()
        while not both_in_postinst(lines):
            assert time.monotonic() - t_wait < 240, "".join(lines)
            assert proc.poll() is None, "".join(lines)
            time.sleep(0.2)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.2)
    out = "".join(lines)
    print(out, f"\nSIGINT -> exit: {took:.2f}s")
    assert rc == 130, out
    assert took < 2.0, out
    assert "Traceback" not in out
    assert "interrupted (Ctrl-C): what was running on the hosts was stopped" in out
    for h in ("a", "b"):
        assert re.search(rf"^\[{h}\] interrupted: done: facts \(ok\); stopped: system$", out, re.M), out
        assert re.search(rf"^{h}\s+INTERRUPTED\s", out, re.M), out
    # nothing of the run goes on on the rigs, and the lock is free again
    for r in (a, b):
        t1 = time.monotonic()
        while remote_left(r).strip() and time.monotonic() - t1 < 3:
            time.sleep(0.1)
        assert remote_left(r).strip() == "", remote_left(r)
        assert lock_free(r)
        audit = r.sh("dpkg --audit", check=False).stdout
        assert SLOW_PKG in audit, audit  # dpkg was stopped half-way: the package is half-configured

    # the next run repairs dpkg first (the postinst is quick now), then installs / verifies
    for r in (a, b):
        r.sh(f"rm -f {SLOW_FLAG}")
    r3 = subprocess.run(argv(f, "provision", "--host", "a,b", "--only", "facts,system"),
                        cwd=ROOT, env=env(), text=True, capture_output=True, timeout=600)
    print(r3.stdout + r3.stderr)
    assert r3.returncode == 0, r3.stdout + r3.stderr
    for h in ("a", "b"):  # killed mid-way, dpkg leaves its journal, or a half-configured package
        assert re.search(rf"^\[{h}\] system: change: repair: (dpkg was interrupted \(/var/lib/dpkg/updates "
                         rf"is not empty\)|dpkg --audit: packages left half-installed \({SLOW_PKG}\)): "
                         r"dpkg --configure -a$", r3.stdout, re.M), r3.stdout
    for r in (a, b):
        assert r.sh("dpkg --audit", check=False).stdout.strip() == ""
        assert r.sh(f"dpkg-query -W -f='${{Status}}' {SLOW_PKG}").stdout == "install ok installed"
    r4 = subprocess.run(argv(f, "provision", "--host", "a,b", "--only", "facts,system"),
                        cwd=ROOT, env=env(), text=True, capture_output=True, timeout=600)
    assert r4.returncode == 0 and "repair" not in r4.stdout, r4.stdout


@pytest.mark.rig
def test_interrupted_dpkg_journal_is_repaired(two, tmp_path):
    """The other sign of an interrupted dpkg: a non-empty /var/lib/dpkg/updates journal (dpkg
    killed while it wrote its status)."""
    a = two["a"]
    f = write_inventory(tmp_path / "hosts.yaml", {"a": a})
    a.sh(f"rm -f {SLOW_FLAG}")
    # a journal entry as dpkg writes it before it records a package's new status (here: the
    # status sudo has now, so integrating it changes nothing else)
    a.sh("dpkg-query -s sudo > /var/lib/dpkg/updates/0000")
    assert a.sh("ls -A /var/lib/dpkg/updates").stdout.strip() == "0000"
    r = subprocess.run(argv(f, "provision", "--host", "a", "--only", "facts,system"), cwd=ROOT,
                       env=env(), text=True, capture_output=True, timeout=600)
    print(r.stdout + r.stderr)
    assert ("[a] system: change: repair: dpkg was interrupted (/var/lib/dpkg/updates is not empty): "
            "dpkg --configure -a") in r.stdout, r.stdout
    assert a.sh("ls -A /var/lib/dpkg/updates").stdout.strip() == ""


def test_ctrl_c_while_two_hosts_hang_in_the_ssh_handshake(tmp_path):
    """Two hosts whose port accepts the connection and never says a word (60 s connect timeout):
    SIGINT ends the run within 2 s, exit 130, both hosts stopped in `connect`."""
    import socket
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    port = srv.getsockname()[1]
    held = []

    def accept():
        try:
            while True:
                held.append(srv.accept())
        except OSError:  # closed at the end of the test
            pass
    threading.Thread(target=accept, daemon=True).start()
    hosts = {n: {"connection": {"address": "127.0.0.1", "port": port, "user": "root", "connect_timeout": 60,
                                "known_hosts": str(tmp_path / "kh"), "host_key_policy": "accept-new"}}
             for n in ("a", "b")}
    f = tmp_path / "hosts.yaml"
    f.write_text(yaml.safe_dump({"hosts": hosts}))
    proc = subprocess.Popen(argv(f, "provision", "--host", "a,b"), cwd=ROOT, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        t = time.monotonic()
        while len(held) < 2:
            assert time.monotonic() - t < 30 and proc.poll() is None
            time.sleep(0.05)
        time.sleep(1.0)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        srv.close()
    print(out, f"\nSIGINT -> exit: {took:.2f}s")
    assert proc.returncode == 130, out
    assert took < 2.0, out
    for h in ("a", "b"):
        assert f"[{h}] interrupted: done: nothing; stopped: connect; not run: facts, system" in out, out
        assert re.search(rf"^{h}\s+INTERRUPTED\s", out, re.M), out
    assert "Traceback" not in out
