#!/usr/bin/env python3
"""Benchmark multi-host provisioning: two hosts in parallel vs one host, and a no-op provision's cost.

Measures, on hosts that are already provisioned (so every run is a no-op):
  1. `provision --host A` (median of --reps runs): T1
  2. `provision --host A,B` (both in parallel, same steps, same work per host): T2
     ratio T2 / T1 (goal <= 1.3: the second host costs little more than waiting for the slower one)
  3. of a no-op provision of A: remote commands (`HostReport.commands`, goal <= 12) and bytes
     hashed by the model step (goal 0), and the same for B.

Prints a table and JSON (also written with --json FILE).

    python benchmarks/multihost.py --inventory hosts.yaml --hosts rig,rig2 \
        --only facts,system,llama,model --reps 3 --json /tmp/multihost.json

With --rigs it boots two Tier B test rigs itself (root, systemd-nspawn; see tests/rigs/INSTALL),
provisions them once with facts,system,model (a tiny model from the stand-in hub; no llama.cpp
build), then measures with those steps. tests/test_lock_rigs.py calls `measure()` on its two rigs
(with the llama step: a real build) and prints the same numbers.
"""
from __future__ import annotations

import argparse
import io
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from provision.app import App  # noqa: E402
from provision.console import Environment  # noqa: E402

HASHED_RE = re.compile(r"^\[(?P<host>[^\]]+)\] model: hashed \d+ file\(s\), (?P<bytes>\d+) bytes", re.M)
GOALS = {"ratio": 1.3, "commands": 12, "hashed_bytes": 0}


def provision_once(inventory: str, hosts: str, only: str | None, lock: str | None = None) -> dict[str, Any]:
    """One in-process `invoke provision`: wall seconds, exit status, per-host commands/hashed bytes."""
    out = io.StringIO()
    app = App(inventory, env=Environment(out, out, False))
    t0 = time.perf_counter()
    rc = int(app.provision(hosts, only=only, lock=lock))
    secs = time.perf_counter() - t0
    text = out.getvalue()
    hashed: dict[str, int] = {}
    for m in HASHED_RE.finditer(text):
        hashed[m["host"]] = hashed.get(m["host"], 0) + int(m["bytes"])
    reports = getattr(app, "last_reports", [])
    per = {r.host: {"commands": r.commands, "hashed_bytes": hashed.get(r.host, 0), "changed": r.changed,
                    "failed": r.failed, "seconds": round(r.seconds, 3)} for r in reports}
    return {"rc": rc, "seconds": secs, "hosts": per, "output": text}


def measure(inventory: str, a: str, b: str, only: str | None = None, reps: int = 3,
            lock: str | None = None) -> dict[str, Any]:
    """Warm both hosts once (so the runs are no-ops), then reps x one host and reps x both."""
    warm = provision_once(inventory, f"{a},{b}", only, lock)
    if warm["rc"] != 0:
        raise RuntimeError(f"warm-up provision of {a},{b} failed (exit {warm['rc']}):\n{warm['output'][-4000:]}")
    one, two = [], []
    last_one = last_two = warm
    for _ in range(reps):  # interleaved, so load drift hits both alike
        last_one = provision_once(inventory, a, only, lock)
        one.append(last_one["seconds"])
        last_two = provision_once(inventory, f"{a},{b}", only, lock)
        two.append(last_two["seconds"])
    for r in (last_one, last_two):
        if r["rc"] != 0:
            raise RuntimeError(f"a measured run failed (exit {r['rc']}):\n{r['output'][-4000:]}")
    t1, t2 = statistics.median(one), statistics.median(two)
    noop = last_one["hosts"][a]
    res = {
        "hosts": [a, b], "only": only, "reps": reps,
        "one_host_s": [round(x, 3) for x in one], "two_hosts_s": [round(x, 3) for x in two],
        "one_host_median_s": round(t1, 3), "two_hosts_median_s": round(t2, 3),
        "ratio": round(t2 / t1, 3),
        "noop_commands": noop["commands"], "noop_hashed_bytes": noop["hashed_bytes"],
        "noop_changed": noop["changed"],
        "parallel_hosts": last_two["hosts"],
    }
    res["goals_met"] = {"ratio": res["ratio"] <= GOALS["ratio"],
                        "commands": res["noop_commands"] <= GOALS["commands"],
                        "hashed_bytes": res["noop_hashed_bytes"] <= GOALS["hashed_bytes"]}
    return res


def table(res: dict[str, Any]) -> str:
    rows = [
        ("one host, no-op provision (median)", f"{res['one_host_median_s']:.2f} s", ""),
        ("two hosts in parallel (median)", f"{res['two_hosts_median_s']:.2f} s", ""),
        ("ratio two/one", f"{res['ratio']:.2f}x", f"goal <= {GOALS['ratio']}"),
        ("remote commands, no-op provision", str(res["noop_commands"]), f"goal <= {GOALS['commands']}"),
        ("bytes hashed, no-op provision", str(res["noop_hashed_bytes"]), f"goal {GOALS['hashed_bytes']}"),
    ]
    w = max(len(r[0]) for r in rows)
    lines = [f"multihost benchmark: hosts {','.join(res['hosts'])}, steps {res['only'] or 'all'}, "
             f"{res['reps']} reps"]
    lines += [f"  {n.ljust(w)}  {v:>10}  {g}" for n, v, g in rows]
    for h, d in res["parallel_hosts"].items():
        lines.append(f"  in the parallel run, {h}: {d['commands']} commands, {d['hashed_bytes']} bytes hashed, "
                     f"{d['seconds']:.2f} s")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# --rigs: two throwaway Tier B rigs


def with_rigs(reps: int) -> dict[str, Any]:
    import tempfile

    import yaml

    from tests.fixtures.wheelhouse import CACHE as WHEEL_CACHE, HUB_REQUIREMENT, WheelServer, _key, download_wheels
    from tests.hub.fixtures import make_gguf_like_shards
    from tests.hub.server import StandInHub
    from tests.rigs.aptproxy import PROXY_ADDR, AptProxy
    from tests.rigs.nspawn import boot_rig, build_base_image
    from tests.rigs.sshd import make_client_key

    tmp = Path(tempfile.mkdtemp(prefix="multihost-"))
    proxy = AptProxy().acquire()
    rigs = []
    hub = wheels = None
    try:
        base = build_base_image(proxy_url=proxy.url)
        key, pub = make_client_key(tmp)
        (tmp / "known_hosts").mkdir()
        for _ in range(2):
            rigs.append(boot_rig(base, pub, tmp / "known_hosts", key))
        hub = StandInHub(PROXY_ADDR).start()
        wheels = WheelServer(download_wheels(WHEEL_CACHE / _key(HUB_REQUIREMENT)), PROXY_ADDR)
        shards = make_gguf_like_shards(hub, "bench/tiny-GGUF", n=2, size=[300_001, 200_003])
        model = {"repo": shards.repo_id, "endpoint": hub.endpoint, "pip_find_links": wheels.url,
                 "free_space_margin_gb": 0, "token_env": "LLAMA_RIG_BENCH_NO_TOKEN"}
        # CPU rigs (no CUDA repo to reach from a test rig)
        hosts = {f"rig{i + 1}": nr.rig.inventory_entry(model=model, llama_cpp={"cuda": False})
                 for i, nr in enumerate(rigs)}
        inv = tmp / "hosts.yaml"
        inv.write_text(yaml.safe_dump({"hosts": hosts}))
        return measure(str(inv), "rig1", "rig2", only="facts,system,model", reps=reps)
    finally:
        for s in (wheels,):
            if s is not None:
                s.stop()
        if hub is not None:
            hub.stop()
        for nr in rigs:
            try:
                nr.stop()
            except Exception as e:  # noqa: BLE001
                print(f"teardown of {nr.name}: {e}", file=sys.stderr)
        proxy.release()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--inventory", default="hosts.yaml")
    p.add_argument("--hosts", help="two hosts of the inventory, comma-separated: A,B")
    p.add_argument("--only", default=None, help="steps (comma-separated; default: all)")
    p.add_argument("--lock", default=None, help="provision with this lock file")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rigs", action="store_true", help="boot two Tier B test rigs and measure on them")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    if a.rigs:
        res = with_rigs(a.reps)
    else:
        if not a.hosts or len(a.hosts.split(",")) != 2:
            p.error("--hosts A,B (two hosts) or --rigs")
        ha, hb = a.hosts.split(",")
        res = measure(a.inventory, ha, hb, a.only, a.reps, a.lock)
    print(table(res))
    print(json.dumps(res, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0 if all(res["goals_met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
