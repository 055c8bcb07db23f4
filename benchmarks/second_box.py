#!/usr/bin/env python3
"""Benchmark: a second box from the first (`provision --from`) vs the first box cold.

On fresh hosts A (first) and B (second), same steps (facts, system, llama -- the CPU build -- and
model), same model:

  1. `provision --host A`                                   cold: hub download + full build
  2. `provision --host B --lock locks/A.lock.yaml --from A`  shards + build copied from A

and reports the wall time of each, the ratio T2/T1 (goal <= 0.2), the bytes each took from the hub
(the stand-in hub's request log: goal 0 for B), the bytes copied, the route and the build path.

    python3 benchmarks/second_box.py --rigs [--model-gb 1.1] [--direct] [--json FILE]

`--rigs` boots throwaway Tier B rigs (root, systemd-nspawn: tests/rigs/INSTALL) on this machine,
a stand-in hub with a generated model of `--model-gb` GB in 2 shards, and the upstream fixture
llama.cpp tree over git daemon; A's build starts with an EMPTY ccache (cold). B is copied from A
RELAYED through this machine (Tier B rigs cannot reach each other); with `--direct` a third rig C
is linked to A (a veth pair between their network namespaces) and copied DIRECT as well.
Everything runs on "the same host network": the hub, the git daemon and both rigs are on this
machine, so the cold download is far faster than from huggingface.co -- the ratio here is an
upper bound of what a real site sees (there the first box also waits for ~112 GB from the internet).

`--inventory FILE --first A --second B` measures two real, FRESH hosts of an inventory instead
(nothing is wiped: a first host that already has its build or model is not cold).
"""
from __future__ import annotations

import argparse
import io
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from provision.app import App  # noqa: E402
from provision.console import Environment  # noqa: E402

STEPS = "facts,system,llama,model"
GOAL = 0.2


def provision(inventory: str, host: str, lock: str | None = None, source: str | None = None) -> dict[str, Any]:
    out = io.StringIO()
    app = App(inventory, env=Environment(out, out, False))
    t0 = time.perf_counter()
    rc = int(app.provision(host, only=STEPS, lock=lock, source=source))
    secs = time.perf_counter() - t0
    text = out.getvalue()
    steps = {r.step: round(r.seconds, 1) for rep in getattr(app, "last_reports", []) for r in rep.results}
    return {"rc": rc, "seconds": round(secs, 2), "steps": steps, "output": text}


def summarize(text: str) -> dict[str, Any]:
    """What the run says about itself: build path, compiled objects, bytes copied, route."""
    d: dict[str, Any] = {}
    m = re.search(r"llama: built \S+ in \d+s \((\d+) objects compiled", text)
    d["objects_compiled"] = int(m.group(1)) if m else 0
    m = re.search(r"llama: (copying build \S+|building here[^:]*)", text)
    d["build_path"] = m.group(1) if m else ("built" if d["objects_compiled"] else "none")
    m = re.search(r"model: (\d+) of (\d+) file\(s\) from \S+ \([^,]+, (\w+);", text)
    d["shards_copied"] = f"{m.group(1)}/{m.group(2)}" if m else "0"
    d["route"] = m.group(3) if m else None
    d["from_hub_line"] = next((ln for ln in text.splitlines() if "model: from the hub" in ln), "")
    return d


def measure(inventory: str, first: str, second: str, hub_bytes=None, lock_dir: Path | None = None,
            extra: list[tuple[str, str]] = ()) -> dict[str, Any]:
    """T1 (first, cold) and T2 (second from first) [+ more second boxes in `extra`: (host, label)]."""
    res: dict[str, Any] = {"steps": STEPS}
    mark = hub_bytes() if hub_bytes else None
    a = provision(inventory, first)
    if a["rc"] != 0:
        raise RuntimeError(f"provision of {first} failed (exit {a['rc']}):\n{a['output'][-5000:]}")
    res["first"] = {"host": first, "seconds": a["seconds"], "steps": a["steps"], **summarize(a["output"])}
    if hub_bytes:
        res["first"]["hub_bytes"] = hub_bytes() - mark
    lock = str((lock_dir or Path(inventory).resolve().parent / "locks") / f"{first}.lock.yaml")
    for host, label in [(second, "second")] + list(extra):
        mark = hub_bytes() if hub_bytes else None
        b = provision(inventory, host, lock=lock, source=first)
        if b["rc"] != 0:
            raise RuntimeError(f"provision of {host} --from {first} failed (exit {b['rc']}):\n{b['output'][-5000:]}")
        r = {"host": host, "seconds": b["seconds"], "steps": b["steps"], **summarize(b["output"]),
             "ratio": round(b["seconds"] / a["seconds"], 3)}
        if hub_bytes:
            r["hub_bytes"] = hub_bytes() - mark
        same = Path(lock).read_text().split("\nlock:\n", 1)[1] == \
            Path(lock).with_name(f"{host}.lock.yaml").read_text().split("\nlock:\n", 1)[1]
        r["identical_lock"] = same
        r["output_tail"] = [ln for ln in b["output"].splitlines()
                            if re.search(r"transfer:|llama: (copying|building|\S+ copied|ccache)|model: (from|\d+ of)", ln)]
        res[label] = r
    res["ratio"] = res["second"]["ratio"]
    res["goal"] = GOAL
    res["goal_met"] = res["ratio"] <= GOAL and res["second"].get("hub_bytes", 0) == 0
    return res


def table(res: dict[str, Any]) -> str:
    f = res["first"]
    lines = [f"second box benchmark (steps {res['steps']}; model {res.get('model_bytes', 0) / 1e9:.2f} GB)",
             f"  first box cold      {f['host']:>6}: {f['seconds']:8.1f} s  hub {f.get('hub_bytes', 0) / 1e9:6.2f} GB  "
             f"build: {f['objects_compiled']} objects compiled   steps {f['steps']}"]
    for label in ("second", "direct"):
        if label not in res:
            continue
        s = res[label]
        lines.append(f"  {label + ' box (--from)':<19} {s['host']:>6}: {s['seconds']:8.1f} s  hub {s.get('hub_bytes', 0) / 1e9:6.2f} GB  "
                     f"ratio {s['ratio']:.3f} (goal <= {GOAL})  shards {s['shards_copied']} via {s['route']}, "
                     f"build: {s['build_path']}, lock identical: {s['identical_lock']}   steps {s['steps']}")
    lines.append(f"  goal met: {res['goal_met']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# --rigs


def with_rigs(model_gb: float, direct: bool) -> dict[str, Any]:
    import subprocess
    import tempfile

    import yaml

    from tests.fixtures.llama_rig import llama_settings
    from tests.fixtures.llama_upstream import GitDaemon, make_upstream_repo
    from tests.fixtures.wheelhouse import CACHE as WHEEL_CACHE, HUB_REQUIREMENT, WheelServer, _key, download_wheels
    from tests.hub.fixtures import make_gguf_like_shards
    from tests.hub.server import StandInHub
    from tests.rigs import sh
    from tests.rigs.aptproxy import PROXY_ADDR, AptProxy
    from tests.rigs.nspawn import boot_rig, build_base_image
    from tests.rigs.sshd import make_client_key

    tmp = Path(tempfile.mkdtemp(prefix="second-box-"))
    proxy = AptProxy().acquire()
    rigs = []
    hub = wheels = daemon = None
    link = None
    try:
        base = build_base_image(proxy_url=proxy.url)
        key, pub = make_client_key(tmp)
        (tmp / "known_hosts").mkdir()
        for _ in range(3 if direct else 2):
            rigs.append(boot_rig(base, pub, tmp / "known_hosts", key))
        hub = StandInHub(PROXY_ADDR).start()
        wheels = WheelServer(download_wheels(WHEEL_CACHE / _key(HUB_REQUIREMENT)), PROXY_ADDR)
        total = int(model_gb * 1e9)
        shards = make_gguf_like_shards(hub, "bench/second-box-GGUF", n=2, size=[total // 2 + 1, total - total // 2 - 1])
        upstream = make_upstream_repo(tmp / "upstream" / "llama.cpp")
        daemon = GitDaemon(upstream.path.parent, PROXY_ADDR, None).start()
        url = daemon.url("llama.cpp")
        model = {"repo": shards.repo_id, "endpoint": hub.endpoint, "pip_find_links": wheels.url,
                 "free_space_margin_gb": 0, "token_env": "LLAMA_RIG_BENCH_NO_TOKEN"}
        llama = dict(llama_settings(url), ref=upstream.head())
        names = ["rig", "rig2", "rig3"]
        hosts = {names[i]: nr.rig.inventory_entry(model=model, llama_cpp=llama) for i, nr in enumerate(rigs)}
        if direct:
            a, c = rigs[0], rigs[2]
            la, lc = f"lk-{a.name}"[:15], f"lk-{c.name}"[:15]
            sh(["ip", "link", "add", la, "type", "veth", "peer", "name", lc])
            link = (a.name, la)
            sh(["ip", "link", "set", la, "netns", a.name])
            sh(["ip", "link", "set", lc, "netns", c.name])
            sh(["ip", "-n", a.name, "addr", "add", "10.251.0.1/30", "dev", la])
            sh(["ip", "-n", c.name, "addr", "add", "10.251.0.2/30", "dev", lc])
            sh(["ip", "-n", a.name, "link", "set", la, "up"])
            sh(["ip", "-n", c.name, "link", "set", lc, "up"])
            hosts["rig"]["transfer"] = {"address": "10.251.0.1"}  # rig2 cannot reach it: relay; rig3 can
        inv = tmp / "hosts.yaml"
        inv.write_text(yaml.safe_dump({"hosts": hosts}))

        def hub_bytes() -> int:
            return sum(r.bytes_sent for r in hub.requests if r.server == "cdn" or "/resolve/" in r.path)
        res = measure(str(inv), "rig", "rig2", hub_bytes, extra=[("rig3", "direct")] if direct else [])
        res["model_bytes"] = total
        res["load_average"] = Path("/proc/loadavg").read_text().split()[:3]
        res["cpus"] = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
        return res
    finally:
        if link is not None:
            sh(["ip", "-n", link[0], "link", "del", link[1]], check=False)
        for s in (wheels, daemon):
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
    p.add_argument("--rigs", action="store_true", help="boot Tier B test rigs and measure on them")
    p.add_argument("--model-gb", type=float, default=1.1, help="with --rigs: model size (2 shards), default 1.1")
    p.add_argument("--direct", action="store_true", help="with --rigs: also a third rig linked to the first (direct)")
    p.add_argument("--inventory", default="hosts.yaml")
    p.add_argument("--first", help="the first (fresh) host of the inventory")
    p.add_argument("--second", help="the second (fresh) host")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    if a.rigs:
        res = with_rigs(a.model_gb, a.direct)
    else:
        if not a.first or not a.second:
            p.error("--first A --second B, or --rigs")
        res = measure(a.inventory, a.first, a.second)
    print(table(res))
    print(json.dumps(res, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0 if res["goal_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
