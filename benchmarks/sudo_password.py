#!/usr/bin/env python3
"""What sudo with a password costs per privileged command (connection.sudo_password_env).

Boots one Tier B rig (tests/rigs: systemd-nspawn, real sshd/sudo/PAM; as root on the test
machine), then times `-n` privileged commands (`Target.sudo("true")`) over one SSH session as:
root (no sudo), rigadmin (NOPASSWD sudo) and a password user (sudo -S -v + sudo -n, see
provision/target.py `_sudo_line`). Prints JSON: seconds per command for each, and the ratio
password / NOPASSWD.

    python3 benchmarks/sudo_password.py [-n 50]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from provision import inventory as inv  # noqa: E402
from provision.target import connect  # noqa: E402

ENV = "LLAMA_RIG_BENCH_SUDO_PW"


def per_command(rig_entry: dict, n: int) -> dict:
    t = connect(inv.from_data({"hosts": {"b": rig_entry}}).hosts["b"])
    try:
        t.sudo("true")  # warm: is_root probe, first channel
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            t.sudo("true")
            times.append(time.perf_counter() - t0)
    finally:
        t.close()
    return {"mean_s": round(statistics.mean(times), 4), "median_s": round(statistics.median(times), 4),
            "p90_s": round(sorted(times)[int(0.9 * (len(times) - 1))], 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=50, help="commands per user (default 50)")
    args = ap.parse_args()

    from tests.rigs.access import add_password_sudo_user
    from tests.rigs.nspawn import standalone_rig

    with standalone_rig("sudo-pw-bench-") as (nr, tmp):
        pw = os.urandom(12).hex()
        os.environ[ENV] = pw
        pw_rig = add_password_sudo_user(nr.rig, "rigpw", pw)
        out = {
            "commands": args.n,
            "root": per_command(nr.rig.inventory_entry(), args.n),
            "nopasswd_sudo": per_command(nr.rig.as_user("rigadmin").inventory_entry(), args.n),
            "password_sudo": per_command(pw_rig.inventory_entry(connection={"sudo_password_env": ENV}), args.n),
            "load_average": os.getloadavg()[0],
        }
        out["ratio_password_over_nopasswd"] = round(
            out["password_sudo"]["median_s"] / out["nopasswd_sudo"]["median_s"], 2)
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
