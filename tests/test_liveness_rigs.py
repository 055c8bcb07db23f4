"""Dropped links on a Tier B rig: its veth end goes down in the middle of a run (packets dropped
silently -- no FIN, no RST). The run ends within a bounded time with ONE line naming the host
(keeper.LinkWatch: every task that talks to a rig, here `provision` and `gpu.power`); the rig's
run lock is free again once its lease runs out (provision/runlock.py: the keeper on the rig gets
no heartbeat, stops what the run had started there and lets the lock go), and the next run takes
it over with a line saying so.

The lease is shortened to 20 s for the test (LLAMA_RIG_LOCK_LEASE); connect_timeout 5 s gives a
link deadline of 7.5 s.
"""
from __future__ import annotations

import re
import subprocess
import time

import pytest

from provision import keeper
from tests.test_interrupt_rigs import (ROOT, SLOW_FLAG, add_slow_package, argv, env, lock_free,
                                       remote_left, start_until, write_inventory)

pytestmark = pytest.mark.rig
LEASE = 20
CONNECT_TIMEOUT = 5
DEADLINE = keeper.link_deadline(CONNECT_TIMEOUT)


@pytest.fixture(scope="module")
def box(rig_factory):
    r = rig_factory()
    try:
        add_slow_package(r)
        yield r
    finally:
        rig_factory.stop(r)


def blackhole_mid_run(rig_factory, rig, cmd, ready, running: str) -> dict:
    """Start cmd, wait until ready(rig), cut the rig's network, time the exit; with the network
    still down, time until the rig's lock is free (seen from inside the rig) and check that the
    command `running` was stopped there; then bring the network back."""
    proc, lines = start_until(cmd, lambda ls: False if not ls else True, env=env(LLAMA_RIG_LOCK_LEASE=str(LEASE)))
    try:
        t_wait = time.monotonic()
        while not ready(rig):
            assert proc.poll() is None and time.monotonic() - t_wait < 240, "".join(lines)
            time.sleep(0.2)
        rig_factory.kill_network(rig)
        t0 = time.monotonic()
        rc = proc.wait(120)
        exit_s = time.monotonic() - t0
        assert running in rig.sh("ps -eo args").stdout  # the rig cannot know yet
        while not lock_free(rig):
            assert time.monotonic() - t0 < LEASE + DEADLINE + 10
            time.sleep(0.1)
        free_s = time.monotonic() - t0
        time.sleep(0.5)
        left = rig.sh("ps -eo args").stdout
    finally:
        if proc.poll() is None:
            proc.kill()
        rig_factory.restore_network(rig)
    time.sleep(0.2)
    out = "".join(lines)
    print(out, f"\nblackhole -> exit: {exit_s:.1f}s; -> lock free on the rig: {free_s:.1f}s")
    assert running not in left, left  # the keeper stopped the run's commands before letting go
    return {"rc": rc, "out": out, "exit_s": exit_s, "free_s": free_s, "t0": t0}


def retake(path, t0: float, rig) -> tuple[float, list[str]]:
    """Run `provision --only facts` until it gets the lock; (seconds since t0, outputs)."""
    outs = []
    while True:
        r = subprocess.run(argv(path, "provision", "--host", "r", "--only", "facts"), cwd=ROOT,
                           env=env(LLAMA_RIG_LOCK_LEASE=str(LEASE)), text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
        outs.append(r.stdout)
        if r.returncode == 0:
            return time.monotonic() - t0, outs
        assert "another llama-rig run is changing this host" in r.stdout, r.stdout
        assert time.monotonic() - t0 < LEASE + DEADLINE + 30, "".join(outs)
        time.sleep(1)


def one_unreachable_line(out: str) -> str:
    lines = [ln for ln in out.splitlines() if "UNREACHABLE:" in ln]
    assert len(lines) == 1, out
    assert "Traceback" not in out and 'File "' not in out, out
    return lines[0]


def test_blackholed_provision_ends_with_one_line_and_the_lease_frees_the_lock(box, rig_factory, tmp_path):
    f = write_inventory(tmp_path / "hosts.yaml", {"r": box}, )
    f.write_text(f.read_text().replace("connect_timeout: 5", f"connect_timeout: {CONNECT_TIMEOUT}"))
    box.sh(f"touch {SLOW_FLAG}")
    m = blackhole_mid_run(rig_factory, box, argv(f, "provision", "--host", "r", "--only", "facts,system"),
                          lambda r: "sleep 300" in remote_left(r), "sleep 300")
    assert m["rc"] == 3, m["out"]
    line = one_unreachable_line(m["out"])
    assert re.fullmatch(rf"\[r\] UNREACHABLE: r \({re.escape(box.address)}:22\): no answer on its SSH "
                        r"connection for \d+s \(network down or host gone\); the run on it was stopped", line), line
    assert m["exit_s"] < DEADLINE + 5, m
    assert re.search(r"^r\s+UNREACHABLE\s", m["out"], re.M), m["out"]
    # the old run's keeper held the lock until its lease ran out (no heartbeat for LEASE s); the
    # next run takes over and says so
    assert LEASE - LEASE / 6 - 1 < m["free_s"] < LEASE + 3, m  # the lease runs from the last heartbeat
    box.sh(f"rm -f {SLOW_FLAG}")
    secs, outs = retake(f, m["t0"], box)
    print("".join(outs), f"\nblackhole -> lock taken again: {secs:.1f}s")
    assert len(outs) == 1
    assert re.search(r"run lock: took over from a run that went silent: .* pid \d+ since .*: provision "
                     r"--only facts,system; its lease ran out at .* \(no heartbeat for 20 s\); what it had "
                     r"started on the host was stopped", outs[-1]), outs[-1]
    assert lock_free(box)


def test_blackholed_gpu_power_ends_with_one_line(box, rig_factory, tmp_path):
    """A task other than provision (each_host: gpu.power holds the run lock too)."""
    f = write_inventory(tmp_path / "hosts.yaml", {"r": box})
    # an nvidia-smi that hangs when it sets a limit (a wedged driver does that)
    box.sh("printf '#!/bin/sh\\ncase \"$*\" in *-pl*) sleep 301;; esac\\nexec /usr/bin/nvidia-smi \"$@\"\\n' "
           "> /usr/local/bin/nvidia-smi && chmod 755 /usr/local/bin/nvidia-smi")
    try:
        m = blackhole_mid_run(rig_factory, box, argv(f, "gpu.power", "--host", "r", "--watts", "300"),
                              lambda r: "sleep 301" in r.sh("ps -eo args").stdout, "sleep 301")
        assert m["rc"] == 3, m["out"]
        line = one_unreachable_line(m["out"])
        assert line.startswith(f"[r] UNREACHABLE: r ({box.address}:22): no answer on its SSH connection for "), line
        assert m["exit_s"] < DEADLINE + 5, m
        assert LEASE - LEASE / 6 - 1 < m["free_s"] < LEASE + 3, m  # the lease runs from the last heartbeat
        secs, outs = retake(f, m["t0"], box)
        print("".join(outs), f"\nblackhole -> lock taken again: {secs:.1f}s")
        assert len(outs) == 1 and "took over from a run that went silent" in outs[0], outs
        assert ": gpu.power; its lease ran out" in outs[0], outs[0]
    finally:
        box.sh("rm -f /usr/local/bin/nvidia-smi")
