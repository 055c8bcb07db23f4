#!/usr/bin/env python3
"""Benchmark: how fast a run stops (Ctrl-C) and how fast a dropped rig is noticed and its lock freed.

Boots Tier B test rigs (systemd-nspawn, root; see tests/rigs/INSTALL), gives each a real package
whose postinst runs for minutes (a local apt repo on the rig), and measures with `invoke`:

  1. SIGINT -> exit of `invoke provision --only facts,system` while apt/dpkg run the postinst on
     1 host and on 2 hosts (goal < 2 s; exit 130; nothing of the run left on the rigs)
  2. blackhole -> exit: the rig's veth goes down mid-run (packets dropped, no FIN): the run ends
     with one UNREACHABLE line (goal: connect_timeout x 1.5 + a ping interval)
  3. blackhole -> the rig's run lock is free (seen from inside the rig: the keeper's lease ran
     out, it stopped the run's processes; goal: the lease, LLAMA_RIG_LOCK_LEASE, default 30 s)
  4. blackhole -> the next `provision` took the lock (network back after the lease)

    sudo python3 benchmarks/liveness.py --reps 3 [--lease 30] [--json /tmp/liveness.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from provision import keeper  # noqa: E402
from tests.rigs.aptproxy import AptProxy  # noqa: E402
from tests.rigs.fixtures import RigFactory  # noqa: E402
from tests.rigs.nspawn import build_base_image, sweep_stale, use_base_image  # noqa: E402
from tests.rigs.sshd import make_client_key  # noqa: E402
from tests.test_interrupt_rigs import (SLOW_FLAG, add_slow_package, argv, env, lock_free,  # noqa: E402
                                       remote_left, start_until, write_inventory)

CONNECT_TIMEOUT = 5


def in_postinst(rig) -> bool:
    return "sleep 300" in remote_left(rig)


def reset(rigs) -> None:
    """Back to 'package not installed' with the slow postinst armed."""
    for r in rigs:
        r.sh(f"rm -f {SLOW_FLAG}; dpkg --configure -a >/dev/null 2>&1; "
             f"apt-get purge -y -q llama-rig-slow >/dev/null 2>&1; touch {SLOW_FLAG}", check=False, timeout=300)


def sigint_to_exit(rigs: dict, tmp: Path) -> float:
    f = write_inventory(tmp / "hosts.yaml", rigs)
    reset(rigs.values())
    proc, lines = start_until(argv(f, "provision", "--host", ",".join(rigs), "--only", "facts,system"),
                              lambda ls: bool(ls), env=env())
    t = time.monotonic()
    while not all(in_postinst(r) for r in rigs.values()):
        if proc.poll() is not None or time.monotonic() - t > 300:
            raise SystemExit("the run never reached the postinst:\n" + "".join(lines))
        time.sleep(0.2)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(60)
    secs = time.monotonic() - t0
    if rc != 130:
        raise SystemExit(f"exit {rc}, not 130:\n" + "".join(lines))
    time.sleep(0.5)
    left = {n: remote_left(r).strip() for n, r in rigs.items() if remote_left(r).strip()}
    if left:
        raise SystemExit(f"left running on the rigs: {left}")
    return secs


def blackhole(factory, rig, tmp: Path, lease: int) -> dict:
    f = write_inventory(tmp / "hosts.yaml", {"r": rig})
    reset([rig])
    e = env(LLAMA_RIG_LOCK_LEASE=str(lease))
    proc, lines = start_until(argv(f, "provision", "--host", "r", "--only", "facts,system"),
                              lambda ls: bool(ls), env=e)
    while not in_postinst(rig):
        if proc.poll() is not None:
            raise SystemExit("".join(lines))
        time.sleep(0.2)
    factory.kill_network(rig)
    t0 = time.monotonic()
    try:
        rc = proc.wait(300)
        exit_s = time.monotonic() - t0
        while not lock_free(rig):
            time.sleep(0.1)
        free_s = time.monotonic() - t0
    finally:
        factory.restore_network(rig)
    rig.sh(f"rm -f {SLOW_FLAG}")
    while True:
        r = subprocess.run(argv(f, "provision", "--host", "r", "--only", "facts"), cwd=ROOT, env=e,
                           text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
        if r.returncode == 0:
            break
        time.sleep(0.5)
    return {"rc": rc, "exit_s": exit_s, "lock_free_s": free_s, "retaken_s": time.monotonic() - t0,
            "took_over_line": "took over from a run that went silent" in r.stdout}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--lease", type=int, default=30, help="run lock lease in seconds (default 30)")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    proxy = AptProxy().acquire()
    base = build_base_image(proxy_url=proxy.url)
    fd = use_base_image(base)
    keys = Path(tempfile.mkdtemp(prefix="liveness-keys-"))
    kh = Path(tempfile.mkdtemp(prefix="liveness-kh-"))
    tmp = Path(tempfile.mkdtemp(prefix="liveness-"))
    key, pub = make_client_key(keys)
    sweep_stale()
    factory = RigFactory(base, key, pub, kh)
    try:
        r1, r2 = factory(), factory()
        for r in (r1, r2):
            add_slow_package(r)
        one = [sigint_to_exit({"a": r1}, tmp) for _ in range(a.reps)]
        two = [sigint_to_exit({"a": r1, "b": r2}, tmp) for _ in range(a.reps)]
        holes = [blackhole(factory, r1, tmp, a.lease) for _ in range(max(1, a.reps // 2))]
    finally:
        factory.close()
        os.close(fd)
        proxy.release()
        for d in (keys, kh, tmp):
            shutil.rmtree(d, ignore_errors=True)
    med = statistics.median
    res = {
        "sigint_to_exit_1_host_s": [round(x, 2) for x in one],
        "sigint_to_exit_2_hosts_s": [round(x, 2) for x in two],
        "blackhole_to_exit_s": [round(h["exit_s"], 1) for h in holes],
        "blackhole_to_lock_free_s": [round(h["lock_free_s"], 1) for h in holes],
        "blackhole_to_lock_retaken_s": [round(h["retaken_s"], 1) for h in holes],
        "lease_s": a.lease, "connect_timeout_s": CONNECT_TIMEOUT,
        "link_deadline_s": keeper.link_deadline(CONNECT_TIMEOUT),
        "took_over_line": all(h["took_over_line"] for h in holes),
    }
    rows = [("SIGINT -> exit, 1 host", med(one), "< 2 s"),
            ("SIGINT -> exit, 2 hosts", med(two), "< 2 s"),
            ("blackhole -> exit (one line)", med(h["exit_s"] for h in holes),
             f"<= {res['link_deadline_s']:g} s + ping interval"),
            ("blackhole -> lock free on the rig", med(h["lock_free_s"] for h in holes), f"<= lease {a.lease} s"),
            ("blackhole -> next run has the lock", med(h["retaken_s"] for h in holes), "lease + one run")]
    print(f"{'measured (median)':40} {'seconds':>8}  goal")
    for name, v, goal in rows:
        print(f"{name:40} {v:8.2f}  {goal}")
    print(json.dumps(res, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
