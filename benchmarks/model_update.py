#!/usr/bin/env python3
"""Benchmark `invoke model.update` against pulling the model again (what changing the pinned sha by
hand used to mean): bytes over the wire, bytes on disk, wall time.

On this machine (`connection: local`: this Python, which has huggingface_hub, stands in for the
rig's venv) against the in-process stand-in hub (plain HTTP; tests/hub/server.py):

  1. first pull of --shards shards of --mib MiB each: T_full, bytes fetched
  2. a hub commit that changes ONE shard; `model.update`: T_update, bytes fetched, bytes linked
     ratio T_update / T_full (goal <= 1/shards + overhead: only the changed shard moves) and
     fetched_update / fetched_full (goal = 1/shards exactly)
  3. `model.update` again (up to date): T_noop, 0 bytes
  4. disk: both copies on disk (du counts a hard link once) / one copy (goal <= 1 + 1/shards)

    python benchmarks/model_update.py [--shards 4] [--mib 256] [--json FILE]

Prints a table and JSON.
"""
from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from provision.app import App  # noqa: E402
from provision.console import Environment  # noqa: E402
from provision.model import update as U  # noqa: E402
from tests.hub.fixtures import make_gguf_like_shards  # noqa: E402
from tests.hub.server import GeneratedBlob, StandInHub  # noqa: E402

FETCHED_RE = re.compile(r"model: downloaded \d+ file\(s\), .* in [0-9.]+s")


def cdn_bytes(hub, since: int) -> int:
    return sum(r.bytes_sent for r in hub.requests[since:] if r.server == "cdn" and r.method == "GET")


def du_bytes(path: Path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True).stdout.split()[0])


def run(shards: int, mib: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="model-update-bench-"))
    hub = StandInHub().start()
    try:
        size = mib * 1024 * 1024
        s = make_gguf_like_shards(hub, n=shards, size=size, seed="bench", decoys=False)
        prefix = tmp / "prefix"
        (prefix / "hf-venv/bin").mkdir(parents=True)
        (prefix / "hf-venv/bin/python").symlink_to(sys.executable)
        inv = tmp / "hosts.yaml"
        inv.write_text(yaml.safe_dump({"hosts": {"loc": {
            "connection": {"type": "local"},
            "paths": {"prefix": str(prefix), "state_dir": str(tmp / "state")},
            "model": {"repo": s.repo_id, "dir": str(tmp / "models"), "endpoint": hub.endpoint,
                      "free_space_margin_gb": 0, "token_env": "LLAMA_RIG_BENCH_NO_TOKEN"}}}}))
        rdir = tmp / "models" / s.repo_id.replace("/", "__")

        def app() -> tuple[App, io.StringIO]:
            out = io.StringIO()
            return App(str(inv), env=Environment(out, out, False)), out

        def update() -> tuple[float, int, str]:
            a, out = app()
            opts = U.UpdateOptions(inventory_path=str(inv), lock_dir=str(a.lock_dir()))
            n0 = len(hub.requests)
            t0 = time.perf_counter()
            rc = int(a.each_host("loc", lambda ctx: U.task_update(ctx, opts), title="model.update", changes=True))
            secs = time.perf_counter() - t0
            assert rc == 0, out.getvalue()
            return secs, cdn_bytes(hub, n0), out.getvalue()

        a, out = app()
        n0 = len(hub.requests)
        t0 = time.perf_counter()
        rc = int(a.provision("loc", only="model"))
        t_full = time.perf_counter() - t0
        assert rc == 0, out.getvalue()
        fetched_full = cdn_bytes(hub, n0)
        one_copy = du_bytes(rdir)
        hub.commit(s.repo_id, {s.shards[-1]: GeneratedBlob(size, "bench-v2")}, message="requant the last shard")
        t_update, fetched_update, text = update()
        both = du_bytes(rdir)
        t_noop, fetched_noop, _ = update()
        r = {"shards": shards, "shard_mib": mib, "full_pull_s": round(t_full, 2), "fetched_full": fetched_full,
             "update_s": round(t_update, 2), "fetched_update": fetched_update,
             "noop_update_s": round(t_noop, 2), "fetched_noop": fetched_noop,
             "ratio_time": round(t_update / t_full, 3), "ratio_bytes": round(fetched_update / fetched_full, 4),
             "disk_one_copy": one_copy, "disk_two_copies": both, "ratio_disk": round(both / one_copy, 3),
             "goal_ratio_bytes": round(1 / shards, 4), "goal_ratio_disk": round(1 + 1 / shards, 3)}
        return r
    finally:
        hub.stop()
        subprocess.run(["rm", "-rf", str(tmp)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--json", help="also write the JSON here")
    a = ap.parse_args(argv)
    r = run(a.shards, a.mib)
    rows = [("first pull", f"{r['full_pull_s']} s", f"{r['fetched_full']:,} B"),
            ("model.update (1 shard changed)", f"{r['update_s']} s", f"{r['fetched_update']:,} B"),
            ("model.update again (up to date)", f"{r['noop_update_s']} s", f"{r['fetched_noop']:,} B"),
            ("ratio update / full", f"{r['ratio_time']}", f"{r['ratio_bytes']} (goal {r['goal_ratio_bytes']})"),
            ("disk: two copies / one", f"{r['ratio_disk']} (goal <= {r['goal_ratio_disk']})", "")]
    for row in rows:
        print(f"{row[0]:<34} {row[1]:<22} {row[2]}")
    print(json.dumps(r))
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
