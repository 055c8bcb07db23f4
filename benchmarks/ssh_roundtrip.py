#!/usr/bin/env python3
"""What one SSH command costs, with and without provision/sshconf.nodelay_transport.

Boots one Tier B rig (tests/rigs: systemd-nspawn, real sshd; as root on the test machine) and,
over fresh connections, times with the Target API:
  connect       the TCP connect, key exchange and login,
  first         the connection's first command (`true`),
  next          each later command (`true`), median of -n,
for paramiko's plain Transport (Nagle on, delayed ACKs: what llama-rig used before) and for
`nodelay_transport` (TCP_NODELAY + TCP_QUICKACK re-armed after each read). Prints JSON with the
medians over --connections connections and the ratios.

    python3 benchmarks/ssh_roundtrip.py [-n 30] [--connections 5]
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
from provision import sshconf  # noqa: E402
from provision.target import connect  # noqa: E402


def measure(entry: dict, n: int, connections: int, nodelay: bool) -> dict:
    import paramiko

    factory = sshconf.nodelay_transport if nodelay else paramiko.Transport
    real = sshconf.auth_kwargs

    def kwargs(ep):
        return dict(real(ep), transport_factory=factory)

    sshconf.auth_kwargs = kwargs
    conn, first, later = [], [], []
    try:
        host = inv.from_data({"hosts": {"b": entry}}).hosts["b"]
        for _ in range(connections):
            t0 = time.perf_counter()
            t = connect(host)
            conn.append(time.perf_counter() - t0)
            try:
                t0 = time.perf_counter()
                t.run("true")
                first.append(time.perf_counter() - t0)
                for _ in range(n):
                    t0 = time.perf_counter()
                    t.run("true")
                    later.append(time.perf_counter() - t0)
            finally:
                t.close()
    finally:
        sshconf.auth_kwargs = real

    def ms(xs):
        return round(1000 * statistics.median(xs), 1)
    return {"connect_ms": ms(conn), "first_command_ms": ms(first), "next_command_ms": ms(later)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=30, help="commands per connection after the first (default 30)")
    ap.add_argument("--connections", type=int, default=5)
    args = ap.parse_args()

    from tests.rigs.nspawn import standalone_rig

    with standalone_rig("ssh-rtt-bench-") as (nr, _):
        entry = nr.rig.inventory_entry()
        measure(entry, 2, 1, True)  # warm: imports, the rig's caches
        plain = measure(entry, args.n, args.connections, False)
        fast = measure(entry, args.n, args.connections, True)
        out = {"commands_per_connection": args.n + 1, "connections": args.connections,
               "plain_paramiko": plain, "nodelay_transport": fast,
               "ratio": {k: round(fast[k] / plain[k], 2) for k in plain},
               "load_average": os.getloadavg()[0]}
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
