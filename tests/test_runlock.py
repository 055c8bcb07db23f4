"""The per-host run lock (provision.runlock): real flock(1) on the box, through LocalTarget and
over real SSH (Tier A sshd); a holder that dies or loses its session frees the lock by itself."""
from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from provision import inventory as inv
from provision.app import App
from provision.console import Environment
from provision.engine import Step, WriteFile
from provision.errors import ExitStatus
from provision.runlock import RunLockBusy, RunLockError, run_lock
from provision.target import LocalTarget, connect

ROOT = Path(__file__).resolve().parents[1]


def local_host(state_dir: Path):
    return inv.from_data({"hosts": {"box": {"connection": {"type": "local"},
                                            "paths": {"state_dir": str(state_dir)}}}}).hosts["box"]


def lock_is_free(path: Path) -> bool:
    return subprocess.run(["flock", "-n", str(path), "true"]).returncode == 0


def test_local_lock_taken_refused_released(tmp_path):
    sd = tmp_path / "state"
    a, b = LocalTarget(local_host(sd)), LocalTarget(local_host(sd))
    with run_lock(a, "box", str(sd), "provision"):
        assert not lock_is_free(sd / "run.lock")
        owner = (sd / "run.owner").read_text()
        assert f"pid {os.getpid()} since " in owner and owner.rstrip().endswith(": provision")
        # the same process again (a task inside a task): re-entrant, no self-deadlock
        with run_lock(a, "box", str(sd), "llama.update"):
            pass
        assert not lock_is_free(sd / "run.lock")
        # a second, independent holder of the same lock (another process would see the same)
        with pytest.raises(RunLockBusy) as ei:
            with run_lock(b, "box2", str(sd), "provision"):
                pytest.fail("ran while the lock was held")
        assert re.match(re.escape(f"another llama-rig run is changing this host ({owner.strip()}; its last "
                                  "heartbeat was ") + r"\d+ s ago, its lease ends 30 s after the last one\); "
                        "nothing was changed — wait for it to finish", str(ei.value)), str(ei.value)
    assert lock_is_free(sd / "run.lock") and not (sd / "run.owner").exists()
    with run_lock(b, "box2", str(sd), "provision"):
        assert not lock_is_free(sd / "run.lock")


HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from provision import inventory as inv
    from provision.runlock import run_lock
    from provision.target import LocalTarget
    h = inv.from_data({{"hosts": {{"box": {{"connection": {{"type": "local"}},
                                          "paths": {{"state_dir": {sd!r}}}}}}}}}).hosts["box"]
    with run_lock(LocalTarget(h), "box", {sd!r}, "provision"):
        print("held", flush=True)
        time.sleep(600)
""")


def test_a_killed_run_leaves_no_stale_lock(tmp_path):
    sd = tmp_path / "state"
    p = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=str(ROOT), sd=str(sd))],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        assert not lock_is_free(sd / "run.lock")
        with pytest.raises(RunLockBusy, match=r"\(.* pid %d since .*: provision; its last heartbeat was " % p.pid):
            with run_lock(LocalTarget(local_host(sd)), "box", str(sd), "provision"):
                pass
        p.send_signal(signal.SIGKILL)  # no finally, no cleanup: the holder's stdin just closes
        p.wait(10)
        t0 = time.monotonic()
        while not lock_is_free(sd / "run.lock") and time.monotonic() - t0 < 10:
            time.sleep(0.1)
        assert lock_is_free(sd / "run.lock")
        with run_lock(LocalTarget(local_host(sd)), "box", str(sd), "provision"):
            pass
    finally:
        if p.poll() is None:
            p.kill()


def test_lock_that_cannot_be_taken_stops_the_run(tmp_path):
    """The lock fails closed: one line, and the body never runs."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    warnings: list[str] = []
    ran = []
    with pytest.raises(RunLockError) as ei:
        with run_lock(LocalTarget(local_host(blocker / "state")), "box", str(blocker / "state"),
                      "provision", warnings.append):
            ran.append(1)
    assert ran == [] and warnings == []
    msg = str(ei.value)
    assert msg.startswith(f"cannot take the run lock {blocker}/state/run.lock (") and "\n" not in msg, msg
    assert "Not a directory" in msg and msg.endswith("; nothing was changed — the lock needs bash, "
                                                     "flock(1) and root (or sudo) on the host"), msg


class Marker(Step):
    """Writes a file into the state dir (stands in for any step that changes the box)."""
    name = "marker"

    def plan(self, ctx):
        path = f"{ctx.cfg['paths']['state_dir']}/marker"
        if ctx.target.exists(path):
            return []
        return [WriteFile(f"write {path}", path=path, content="x\n", before=None)]


def test_provision_and_changing_tasks_refused_while_another_run_holds_the_host(tmp_path):
    sd = tmp_path / "state"
    inventory = tmp_path / "hosts.yaml"
    inventory.write_text(f"hosts:\n  box:\n    connection: {{type: local}}\n    paths: {{state_dir: {sd}}}\n")
    p = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=str(ROOT), sd=str(sd))],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"

        def app():
            out, err = io.StringIO(), io.StringIO()
            return App(inventory_path=str(inventory), env=Environment(out, err, isatty=False)), out, err

        a, out, err = app()
        assert a.provision("box", steps=[Marker()]) == ExitStatus.FAILED
        assert not (sd / "marker").exists()
        lines = [ln for ln in err.getvalue().splitlines() if "run lock" in ln]
        assert len(lines) == 1 and re.fullmatch(re.escape(
            f"[box] run lock: FAILED: another llama-rig run is changing this host "
            f"({(sd / 'run.owner').read_text().strip()}; its last heartbeat was ") + r"\d+"
            + re.escape(f" s ago, its lease ends 30 s after the last one); nothing was changed — wait for "
                        f"it to finish ({sd}/run.lock)"), lines[0]), err.getvalue()
        assert re.search(r"^box +FAILED +0 +0 +1 +1 ", out.getvalue(), re.M), out.getvalue()  # recap
        # --check still shows the plan
        a, out, err = app()
        assert a.provision("box", steps=[Marker()], check=True) == ExitStatus.OK
        assert f"write {sd}/marker" in out.getvalue()
        # a task that changes the host is refused the same way; a read-only one runs
        a, out, err = app()
        called = []
        assert a.each_host("box", lambda ctx: called.append(1), title="service.restart",
                           changes=True) == ExitStatus.FAILED
        assert called == [] and "[box] service.restart: FAILED: another llama-rig run" in err.getvalue()
        a, out, err = app()
        assert a.each_host("box", lambda ctx: called.append(1) or False, title="service.status") == ExitStatus.OK
        assert called == [1]
    finally:
        p.kill()
        p.wait()
    t0 = time.monotonic()  # the holder's keeper sees EOF, stops what the run started, lets go
    while not lock_is_free(sd / "run.lock") and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    a, out, err = app()
    assert a.provision("box", steps=[Marker()]) == ExitStatus.OK
    assert (sd / "marker").read_text() == "x\n"


@pytest.mark.sshd
def test_over_ssh_as_sudo_user_and_a_dropped_session_frees_the_lock(sshd, tmp_path):
    sd = sshd.root / "state"  # root-owned on the box: the sudo user takes the lock with sudo
    entry = sshd.sudo_rig.inventory_entry(paths={"state_dir": str(sd)})
    h = inv.from_data({"hosts": {"r": entry}}).hosts["r"]
    first, second = connect(h), connect(h)
    try:
        with run_lock(first, "r", str(sd), "provision"):
            assert not lock_is_free(sd / "run.lock")
            assert (sd / "run.owner").stat().st_uid == 0
            with pytest.raises(RunLockBusy, match="another llama-rig run is changing this host"):
                with run_lock(second, "r2", str(sd), "llama.update"):
                    pass
        assert lock_is_free(sd / "run.lock")
        # a session that drops while holding the lock (the control machine crashed, the
        # network went away): sshd ends the session, the holder sees EOF, the lock is free
        third = connect(h)
        cm = run_lock(third, "r3", str(sd), "provision")
        cm.__enter__()
        assert not lock_is_free(sd / "run.lock")
        third.conn.client.get_transport().sock.close()
        t0 = time.monotonic()
        while not lock_is_free(sd / "run.lock") and time.monotonic() - t0 < 15:
            time.sleep(0.2)
        assert lock_is_free(sd / "run.lock"), "the lock outlived its SSH session"
        cm.__exit__(None, None, None)  # releasing over the dead session is harmless
        with run_lock(second, "r2", str(sd), "provision"):
            assert not lock_is_free(sd / "run.lock")
    finally:
        first.close()
        second.close()


def test_a_lock_lost_mid_run_stops_the_run(tmp_path):
    """The keeper on the box ends while the run still holds the lock (here: killed; on a real rig:
    its lease ran out): the run's next command raises one line instead of going on unlocked."""
    from provision.errors import StepError
    sd = tmp_path / "state"
    t = LocalTarget(local_host(sd))
    with run_lock(t, "box", str(sd), "provision"):
        assert t.run("echo ok").stdout == "ok\n"
        pid = subprocess.run(["pgrep", "-f", f"llama-rig-lock {sd} "], capture_output=True,
                             text=True).stdout.split()
        assert len(pid) == 1, pid
        os.kill(int(pid[0]), signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(StepError) as ei:
            while time.monotonic() - t0 < 15:
                t.run("true")
                time.sleep(0.2)
        assert str(ei.value) == (f"box: the run lock {sd}/run.lock was lost (its keeper on the host ended: "
                                 "lease of 30 s without a heartbeat, or its session closed); stopping this run")


def test_stop_groups_sh_on_its_own_stops_the_runs_groups_and_spares_others(tmp_path):
    """provision/remote/stop_groups.sh, as the keeper and the kill line source it: every process
    group holding a process tagged LLAMA_RIG_RUN=<run> is TERMed (then KILLed), the caller's own
    group and another run's groups are left alone."""
    from provision import keeper, remote

    assert f"{keeper.RUN_ENV}=$2" in remote.source("stop_groups.sh")
    # a group of the run that ignores TERM (KILL after the wait), one that does not, another run's
    stubborn = subprocess.Popen(["env", f"{keeper.RUN_ENV}=run-a", "sh", "-c", "trap '' TERM; sleep 60"],
                                start_new_session=True)
    plain = subprocess.Popen(["env", f"{keeper.RUN_ENV}=run-a", "sleep", "60"], start_new_session=True)
    other = subprocess.Popen(["env", f"{keeper.RUN_ENV}=run-b", "sleep", "60"], start_new_session=True)
    try:
        time.sleep(0.3)
        t0 = time.monotonic()
        r = subprocess.run(["bash", "-c", keeper.stop_groups_sh(wait=0.5) + 'stop_groups "" run-a; echo done'],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and r.stdout.strip() == "done", r.stderr
        assert stubborn.wait(5) == -signal.SIGKILL and plain.wait(5) == -signal.SIGTERM
        assert time.monotonic() - t0 < 5 and other.poll() is None
        # by group id (a command's own group, keeper.kill_line) -- never the caller's own group
        r = subprocess.run(["bash", "-c", keeper.kill_line(other.pid)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and other.wait(5) == -signal.SIGTERM
    finally:
        for p in (stubborn, plain, other):
            if p.poll() is None:
                p.kill()
