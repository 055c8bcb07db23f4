"""sudo with a password, on a Tier B rig (real sshd, sudo, PAM, systemd): a login user whose sudoers
line has no NOPASSWD. The password (connection.sudo_password_env) reaches `sudo -S -v` only: the
commands and the helpers that read JSON on stdin get their stdin untouched, no argv, environment,
log or file on the rig holds it, a full provision step works, and a wrong one is one line."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from provision import inventory as inv
from provision.errors import InventoryError, SudoPasswordError
from provision.model.store import parse_probe, probe_command, probe_input
from provision.target import connect
from tests.rigs import WORK_ROOT, recap_row
from tests.rigs.access import add_password_sudo_user

pytestmark = pytest.mark.rig

REPO = Path(__file__).resolve().parents[1]
ENV = "LLAMA_RIG_TEST_SUDO_PW"
# quotes, $, backslash, %, spaces: nothing in it may be read by a shell or by sudo's prompt escapes
PW = "pa ss'w\"o$rd\\%p`x` 7"
USER = "rigpw"
HOST = "pwrig"


@pytest.fixture(scope="module")
def box(rig_factory):
    r = rig_factory()
    try:
        yield r, add_password_sudo_user(r, USER, PW)
    finally:
        rig_factory.stop(r)


@pytest.fixture
def pw_env(monkeypatch):
    monkeypatch.setenv(ENV, PW)


def host_for(user_rig, **conn):
    entry = user_rig.inventory_entry(connection={"sudo_password_env": ENV, **conn})
    return inv.from_data({"hosts": {HOST: entry}}).hosts[HOST]


def write_inventory(path: Path, user_rig, **extra) -> Path:
    entry = user_rig.inventory_entry(connection={"sudo_password_env": ENV, "connect_timeout": 5},
                                     gpus={"count": 6, "power_limit": 300},
                                     llama_cpp={"cuda": False},
                                     system={"kernel_headers": False, "packages": ["procps"]}, **extra)
    path.write_text(yaml.safe_dump({"hosts": {HOST: entry}}, sort_keys=False))
    return path


def invoke(*args, env_pw: str | None, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if env_pw is not None:
        env[ENV] = env_pw
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "invoke", *args], cwd=REPO, capture_output=True,
                       text=True, timeout=timeout, env=env)
    r.seconds = time.monotonic() - t0
    return r


def recap(out: str) -> dict:
    return recap_row(out, HOST)


def rig_state(rig) -> str:
    """What the gpu step would change: power limits, persistence, units in /etc/systemd/system."""
    return rig.sh("nvidia-smi --query-gpu=index,power.limit,persistence_mode --format=csv,noheader; "
                  "ls -la /etc/systemd/system; ls /var/lib/llama-rig 2>&1; "
                  "md5sum /var/lib/dpkg/status").stdout


def test_the_user_really_needs_the_password(box, pw_env):
    rig, user_rig = box
    r = rig.sh(f"su {USER} -c 'sudo -n true'", check=False)
    assert r.returncode == 1 and "a password is required" in r.stderr, r
    # and without sudo_password_env the library says so at the first sudo (no hang, no prompt)
    t = connect(inv.from_data({"hosts": {HOST: user_rig.inventory_entry()}}).hosts[HOST])
    try:
        res = t.sudo("id -u", check=False)
        assert res.exited == 1 and "a password is required" in res.stderr
    finally:
        t.close()


def test_commands_helpers_pipes_and_files_under_sudo_with_a_password(box, pw_env):
    rig, user_rig = box
    h = host_for(user_rig)
    t = connect(h)  # tries the password once (check_sudo)
    try:
        assert t.user == USER and t.needs_sudo
        assert t.run("id -un").stdout == f"{USER}\n"
        # the whole compound command as root
        assert t.sudo("id -u && id -u").stdout == "0\n0\n"
        # stdin reaches the command exactly: the password is not its first line
        payload = json.dumps({"a": 1, "b": [1, 2]}) + "\nsecond line\n"
        assert t.sudo("cat", stdin=payload).stdout == payload
        assert t.sudo("cat", stdin="").stdout == ""
        # a real helper (provision/remote/model_probe.py) reads its one JSON line on stdin
        r = t.sudo(probe_command(), stdin=probe_input(h.cfg, None, None))
        view = parse_probe(r.stdout)
        assert view.current is None and view.kept == {}
        # sudo -u another user, cwd and env
        assert t.run("id -un", user="nobody").stdout == "nobody\n"
        assert t.run("pwd; id -u; echo \"$X\"", sudo=True, cwd="/etc", env={"X": "a b"}).stdout == "/etc\n0\na b\n"
        # a file installed as root
        t.write_file("/etc/llama-rig-pw-test.conf", "k=v\n", mode=0o640)
        assert rig.sh("stat -c '%U %a' /etc/llama-rig-pw-test.conf && cat /etc/llama-rig-pw-test.conf").stdout \
            == "root 640\nk=v\n"
        # a byte pipe (what copies between rigs use): the password is not in the stream
        with t.pipe("cat > /root/piped && wc -c < /root/piped", sudo=True, timeout=30) as p:
            p.write(b"\x00bytes\n")
            p.close_stdin()
            assert p.readline() == b"7\n"
        assert rig.sh("od -An -c /root/piped").stdout.split() == ["\\0", "b", "y", "t", "e", "s", "\\n"]
        # a held command (the run lock): its first line is its own
        held = t.hold("echo held-as-$(id -u); cat >/dev/null", sudo=True)
        assert held.first_line == "held-as-0"
        held.release()
    finally:
        t.close()


def _all_argv_and_environ(rig) -> str:
    return rig.sh("for f in /proc/[0-9]*/cmdline /proc/[0-9]*/environ; do "
                  "tr '\\0' '\\n' < $f 2>/dev/null; echo; done; ps -eo pid,user,args").stdout


def test_the_password_is_in_no_argv_environ_log_or_file(box, pw_env):
    rig, user_rig = box
    t = connect(host_for(user_rig))
    seen: list[str] = []
    try:
        th = threading.Thread(target=lambda: seen.append(t.sudo("sleep 3; echo slept").stdout))
        th.start()
        snaps = []
        deadline = time.monotonic() + 10
        while th.is_alive() and time.monotonic() < deadline:
            snaps.append(_all_argv_and_environ(rig))
            time.sleep(0.2)
        th.join(15)
        assert seen == ["slept\n"]
    finally:
        t.close()
    during = [s for s in snaps if "sleep 3; echo slept" in s]
    assert during, "no snapshot caught the command running"  # the check ran WHILE it ran
    for s in snaps:
        assert PW not in s
    assert "sudo -n sh -c" in during[0] and "llama-rig-sudo" in during[0]
    # logs and files on the rig: journal, /var/log, tmp dirs, homes; and the box's whole disk
    # (everything it wrote is in its overlay upper dir on this machine)
    logs = rig.sh("journalctl --no-pager -o cat 2>/dev/null; cat /var/log/auth.log 2>/dev/null; true",
                  check=False).stdout
    assert "sudo" in logs and PW not in logs  # sudo logged its commands, not the password
    r = rig.sh(f"grep -rlF -e {shlex.quote(PW)} /tmp /var/tmp /run /home /root /var/log /etc", check=False)
    assert r.returncode == 1 and r.stdout == "", r  # grep: 1 = nothing found
    upper = WORK_ROOT / "rigs" / rig.name / "upper"
    assert upper.is_dir()
    needle = PW.encode()
    for root, _dirs, files in os.walk(upper):
        for f in files:
            p = os.path.join(root, f)
            if os.path.islink(p) or not os.path.isfile(p):
                continue
            with open(p, "rb") as fh:
                assert needle not in fh.read(), p


def test_provision_steps_with_a_password_user(box, tmp_path):
    rig, user_rig = box
    f = write_inventory(tmp_path / "hosts.yaml", user_rig)
    r = invoke("provision", "--host", HOST, "--only", "facts,system,gpu", "--inventory", str(f),
               env_pw=PW)
    assert r.returncode == 0, r.stdout + r.stderr
    assert PW not in r.stdout + r.stderr
    limits = rig.sh("nvidia-smi --query-gpu=power.limit --format=csv,noheader,nounits").stdout.split()
    assert limits == ["300.00"] * 6
    assert int(recap(r.stdout)["changed"]) >= 1
    # the run lock (a held sudo command) was taken and released: a second run changes nothing
    r = invoke("provision", "--host", HOST, "--only", "facts,system,gpu", "--inventory", str(f),
               env_pw=PW)
    assert r.returncode == 0, r.stdout + r.stderr
    assert recap(r.stdout)["changed"] == "0", r.stdout
    # and a service restart of the gpu power unit runs as root with the password too
    r = rig.sh("systemctl list-unit-files --no-legend | grep -c llama-rig", check=False)
    assert r.stdout.strip() not in ("", "0"), r


def test_wrong_password_is_one_line_and_changes_nothing(box, tmp_path):
    rig, user_rig = box
    rig.sh("for i in 0 1 2 3 4 5; do nvidia-smi -i $i -pl 350 >/dev/null; done")
    before = rig_state(rig)
    f = write_inventory(tmp_path / "hosts.yaml", user_rig)
    r = invoke("provision", "--host", HOST, "--only", "facts,system,gpu", "--inventory", str(f),
               env_pw="not the password")
    assert r.returncode != 0
    lines = r.stderr.splitlines()
    assert lines == [f"[{HOST}] UNREACHABLE: {HOST}: sudo refused the password from ${ENV} "
                     "(sudo: 1 incorrect password attempt)"], r.stderr
    assert "Traceback" not in r.stdout + r.stderr and "not the password" not in r.stdout + r.stderr
    assert rig_state(rig) == before
    # `invoke facts` too: one line, non-zero
    r = invoke("facts", "--host", HOST, "--inventory", str(f), env_pw="not the password", timeout=120)
    assert r.returncode != 0 and len(r.stderr.splitlines()) == 1, r.stderr
    assert f"{HOST}: sudo refused the password from ${ENV}" in r.stderr


def test_no_password_in_the_environment_is_bad_input(tmp_path):
    entry = {"connection": {"address": "10.0.0.5", "user": USER, "sudo_password_env": ENV}}
    f = tmp_path / "hosts.yaml"
    f.write_text(yaml.safe_dump({"hosts": {HOST: entry}}))
    r = invoke("provision", "--host", HOST, "--inventory", str(f), env_pw=None, timeout=60)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [f"hosts.yaml: host '{HOST}': connection.sudo_password_env: the "
                                      f"environment variable {ENV} is not set (or empty)"]
    i = inv.load(f)
    os.environ[ENV] = "two\nlines"
    try:
        with pytest.raises(InventoryError, match="holds more than one line"):
            i.select(HOST)
    finally:
        del os.environ[ENV]


def test_sudo_that_asks_for_every_command_is_one_line(box, pw_env):
    rig, user_rig = box
    rig.sh(f"printf 'Defaults:{USER} timestamp_timeout=0\\n' > /etc/sudoers.d/zz-ts && chmod 440 /etc/sudoers.d/zz-ts")
    try:
        with pytest.raises(SudoPasswordError) as ei:
            connect(host_for(user_rig))
        assert str(ei.value) == (f"{HOST}: sudo accepted the password from ${ENV} but asks again for the "
                                 "next command (sudoers timestamp_timeout=0?); llama-rig needs sudo's "
                                 "timestamp to last a few seconds, or NOPASSWD")
    finally:
        rig.sh("rm -f /etc/sudoers.d/zz-ts")
