#!/usr/bin/env python3
"""Benchmark: a no-op `invoke provision --only facts,system,gpu` on one rig, side by side with
pyinfra 3.x converging the same state on the same rig.

Both run as a user runs them -- a new process per run, Python start-up included, bytecode
cached (one warm-up run each, not counted):

  llama-rig   python3 -m invoke -r <repo> provision --host rig --only facts,system,gpu
  pyinfra     pyinfra -y inventory.py deploy.py   (deploy.py: the same apt packages installed, the
              same GPU boot unit file in place and enabled, persistence mode / power limits read
              with nvidia-smi and left alone because they are what the inventory wants)

on a rig that is already in that state (so each run changes nothing). Per tool: the median,
min and max wall time of --reps runs and the SSH sessions each run opened -- counted by the
rig's own sshd (LogLevel DEBUG1 for the run: one `session_new` line per session channel, the
run lock's held session included). Prints a table, the ratio llama-rig/pyinfra (goal <= 0.6)
and the sessions (goal <= 3), and writes JSON with --json.

    python3 benchmarks/noop.py --rig [--reps 7] [--json benchmarks/noop/result.json]

`--rig` boots a throwaway Tier B rig (root, systemd-nspawn, real sshd and systemd, the fake
nvidia-smi: tests/rigs/INSTALL) and provisions it once. `--pyinfra PATH` is the pyinfra
executable (default: /tmp/pyinfra-venv/bin/pyinfra; `python3 -m venv /tmp/pyinfra-venv &&
/tmp/pyinfra-venv/bin/pip install 'pyinfra>=3,<4'`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEPS = "facts,system,gpu"
GOALS = {"ratio": 0.6, "sessions": 3}
SSHD_DEBUG = "/etc/ssh/sshd_config.d/zz-noop-bench.conf"

PYINFRA_INVENTORY = """\
rig = [({address!r}, {{"ssh_user": {user!r}, "ssh_port": {port}, "ssh_key": {key!r},
         "ssh_known_hosts_file": {known_hosts!r}, "ssh_strict_host_key_checking": "yes"}})]
"""

# The same state as `provision --only facts,system,gpu` keeps: facts read, the system packages
# installed, the GPU boot unit in place and enabled, persistence mode and power limits as wanted
# (read from nvidia-smi; set only if they differ -- they do not here).
PYINFRA_DEPLOY = """\
from io import StringIO

from pyinfra import host
from pyinfra.facts.server import Command, LinuxDistribution
from pyinfra.operations import apt, files, server, systemd

host.get_fact(LinuxDistribution)
apt.packages(name="system packages", packages={packages!r})
files.put(name="GPU boot unit", src=StringIO({unit!r}), dest={unit_path!r}, mode="644")
systemd.service(name="GPU boot unit enabled", service={unit_name!r}, enabled=True, running=None)
now = host.get_fact(Command, command="nvidia-smi --query-gpu=index,persistence_mode,power.limit "
                                     "--format=csv,noheader,nounits")
want = {want!r}
for line in now.splitlines():
    idx, pm, limit = [x.strip() for x in line.split(",")]
    w = want.get(idx)
    if pm != "Enabled" or (w is not None and abs(float(limit) - w) > 1):
        server.shell(name="persistence + power limit GPU " + idx,
                     commands=["nvidia-smi -i " + idx + " -pm 1"]
                     + (["nvidia-smi -i " + idx + " -pl " + str(w)] if w is not None else []))
"""


def sessions_since(sh, cursor: str) -> int:
    """Session channels sshd opened since `cursor` (journal cursor of the ssh unit)."""
    r = sh(f"journalctl -q -u ssh --no-pager -o cat --after-cursor={cursor!r} | grep -c 'session_new' || true")
    return int((r.stdout.strip() or "0").splitlines()[-1])


def journal_cursor(sh) -> str:
    r = sh("journalctl -u ssh -n 0 --show-cursor --no-pager | sed -n 's/^-- cursor: //p'")
    return r.stdout.strip()


def once(name: str, argv: list[str], sh, cwd: str, env: dict[str, str]) -> dict[str, Any]:
    import resource
    cur = journal_cursor(sh)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    secs = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    if p.returncode != 0:
        raise SystemExit(f"{name} failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    time.sleep(0.3)  # let journald take sshd's last lines
    return {"seconds": round(secs, 3), "cpu_s": round(cpu, 3), "sessions": sessions_since(sh, cur),
            "output": p.stdout + p.stderr}


def measure(tools: dict[str, tuple[list[str], dict[str, str]]], sh, reps: int, cwd: str) -> dict[str, Any]:
    """Each tool once per round, --reps rounds (interleaved: a busy machine slows all alike)."""
    runs: dict[str, list] = {name: [] for name in tools}
    for _ in range(reps):
        for name, (argv, env) in tools.items():
            runs[name].append(once(name, argv, sh, cwd, env))
    out = {}
    for name, rs in runs.items():
        secs = [r["seconds"] for r in rs]
        out[name] = {"median_s": round(statistics.median(secs), 3), "min_s": min(secs), "max_s": max(secs),
                     "runs_s": secs, "cpu_s": round(statistics.median(r["cpu_s"] for r in rs), 3),
                     "sessions": [r["sessions"] for r in rs], "last_output": rs[-1]["output"]}
    return out


def _ours(repo: Path, host: str, inventory: Path) -> list[str]:
    return [sys.executable, "-m", "invoke", "-r", str(repo), "provision", "--host", host,
            "--inventory", str(inventory), "--only", STEPS]


def run(inventory: Path, host: str, rig, reps: int, pyinfra: str, work: Path,
        before: Path | None = None) -> dict[str, Any]:
    from provision import inventory as inv
    from provision.steps import gpu as gpu_step
    from provision.facts import gpu as gpu_facts

    sh = rig.sh
    # as a user runs them: bytecode cached (compiled on the first run), in a cache of this run's
    # own (nothing written into the checkouts or pyinfra's venv)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    ours = _ours(ROOT, host, inventory)
    # converge once (a fresh rig: packages, the GPU unit), then it must be a no-op
    first = subprocess.run(ours, cwd=str(work), env=env, capture_output=True, text=True, timeout=3600)
    if first.returncode != 0:
        raise SystemExit(f"first provision failed:\n{first.stdout[-4000:]}\n{first.stderr[-2000:]}")
    h = inv.load(str(inventory)).hosts[host]
    gf = gpu_facts.parse_gather(sh(gpu_facts.GATHER).stdout)
    want = {str(i): w for i, w in gpu_step.wanted_limits(h.cfg, gf.gpus).items()}
    (work / "inventory.py").write_text(PYINFRA_INVENTORY.format(
        address=rig.address, user=rig.user, port=rig.port, key=str(rig.key_file), known_hosts=str(rig.known_hosts)))
    (work / "deploy.py").write_text(PYINFRA_DEPLOY.format(
        packages=list(h.cfg["system"]["packages"]), unit=gpu_step.render_unit(h.cfg, gf.gpus),
        unit_path=gpu_step.UNIT_PATH, unit_name=gpu_step.UNIT_NAME, want=want))
    theirs = [pyinfra, "-y", "inventory.py", "deploy.py"]
    p = subprocess.run(theirs, cwd=str(work), env=env, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise SystemExit(f"pyinfra failed:\n{p.stdout[-4000:]}\n{p.stderr[-2000:]}")
    sh(f"printf 'LogLevel DEBUG1\\n' > {SSHD_DEBUG} && systemctl reload ssh")
    time.sleep(0.5)
    try:
        tools = {"llama-rig": (ours, env), "pyinfra": (theirs, env)}
        if before is not None:
            tools["before"] = (_ours(before, host, inventory), env)
        measure(tools, sh, 1, str(work))  # warm-up: every tool's bytecode cached, the rig's caches warm
        got = measure(tools, sh, reps, str(work))
        res_ours, res_theirs, res_before = got["llama-rig"], got["pyinfra"], got.get("before")
    finally:
        sh(f"rm -f {SSHD_DEBUG} && systemctl reload ssh", check=False)
    import re
    m = re.search(r"^\s*\S+\s+ok\s+(\d+)\s+(\d+)\s+(\d+)", res_ours["last_output"], re.M)
    if m is None or m.group(2) != "0":
        raise SystemExit("llama-rig's run was not a no-op:\n" + res_ours["last_output"][-2000:])
    if re.search(r"Grand total\s+\d+\s+(\S+)", res_theirs["last_output"]).group(1) != "-":
        raise SystemExit("pyinfra's run was not a no-op:\n" + res_theirs["last_output"][-2000:])
    pv = subprocess.run([pyinfra, "--version"], capture_output=True, text=True).stdout.strip()
    ratio = res_ours["median_s"] / res_theirs["median_s"]
    return {"steps": STEPS, "reps": reps, "pyinfra": pv, "python": sys.version.split()[0],
            "llama_rig": {k: v for k, v in res_ours.items() if k != "last_output"},
            "pyinfra_run": {k: v for k, v in res_theirs.items() if k != "last_output"},
            "llama_rig_output": res_ours["last_output"], "pyinfra_output": res_theirs["last_output"],
            "before": None if res_before is None else dict(
                {k: v for k, v in res_before.items() if k != "last_output"}, repo=str(before),
                commit=_commit(before)),
            "after_commit": _commit(ROOT),
            "ratio": round(ratio, 3), "goals": GOALS,
            "ok": ratio <= GOALS["ratio"] and max(res_ours["sessions"]) <= GOALS["sessions"]}


def _commit(repo: Path) -> str:
    r = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return r.stdout.strip() + ("+dirty" if dirty else "")


def table(res: dict[str, Any]) -> str:
    a, b = res["llama_rig"], res["pyinfra_run"]
    lines = [f"no-op `provision --only {res['steps']}` on one Tier B rig, {res['reps']} runs each "
             f"(Python {res['python']}, {res['pyinfra']})",
             f"{'':10} {'median s':>9} {'min s':>7} {'max s':>7} {'CPU s':>6}  SSH sessions per run",
             f"{'llama-rig':10} {a['median_s']:9.3f} {a['min_s']:7.3f} {a['max_s']:7.3f} {a['cpu_s']:6.3f}  {a['sessions']}",
             f"{'pyinfra':10} {b['median_s']:9.3f} {b['min_s']:7.3f} {b['max_s']:7.3f} {b['cpu_s']:6.3f}  {b['sessions']}"]
    if res.get("before"):
        c = res["before"]
        lines.append(f"{'before':10} {c['median_s']:9.3f} {c['min_s']:7.3f} {c['max_s']:7.3f} {c['cpu_s']:6.3f}  {c['sessions']}"
                     f"  (llama-rig at {c['commit']}, {c['repo']})")
    lines += [f"ratio llama-rig/pyinfra: {res['ratio']:.2f} (goal <= {GOALS['ratio']}); "
              f"llama-rig sessions: {max(a['sessions'])} (goal <= {GOALS['sessions']}) -> "
              f"{'OK' if res['ok'] else 'MISSED'}"]
    return "\n".join(lines)


def with_rig(reps: int, pyinfra: str, before: Path | None = None) -> dict[str, Any]:
    import yaml

    from tests.rigs.nspawn import standalone_rig

    with standalone_rig("noop-bench-") as (nr, tmp):
        inv_path = tmp / "hosts.yaml"
        inv_path.write_text(yaml.safe_dump({"hosts": {"rig": nr.rig.inventory_entry(llama_cpp={"cuda": False})}}))
        return run(inv_path, "rig", nr.rig, reps, pyinfra, tmp, before)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rig", action="store_true", help="boot a Tier B rig and measure on it")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--pyinfra", default="/tmp/pyinfra-venv/bin/pyinfra")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--before", default=None, help="also measure the llama-rig of this checkout (e.g. main)")
    a = p.parse_args(argv)
    if not a.rig:
        p.error("--rig is the only mode: it needs a rig whose sshd log it can read")
    if not Path(a.pyinfra).exists():
        p.error(f"{a.pyinfra}: no pyinfra there (python3 -m venv /tmp/pyinfra-venv && "
                "/tmp/pyinfra-venv/bin/pip install 'pyinfra>=3,<4')")
    res = with_rig(a.reps, a.pyinfra, Path(a.before) if a.before else None)
    print(table(res))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
