#!/usr/bin/env python3
"""Benchmark the llama step's build path on one host of an inventory (works with `connection: local`).

Measures, in one run on the same machine:
  1. cold `llama.build` (the prefix's builds, `current` and ccache are wiped first)
  2. a no-op `llama.build` (same commit + flags: must compile 0 objects)
  3. `llama.update` after one small upstream commit (ccache), and its ratio to the cold build
     (goal: <= 0.25)
  4. with --seed-recipe: the seed's recipe on the same tree and flags (Unix Makefiles, all
     targets, --clean-first, no ccache) and the ratio cold toolkit build / seed recipe
  5. the toolkit's overhead over the bare cmake commands it ran (goal: <= 1 %)

Prints a table and JSON (also written with --json FILE).

    python benchmarks/llama_build.py --inventory bench.yaml --host gpu --upstream /work/llama.cpp \
        --seed-recipe --json /tmp/llama-build.json

`--upstream` is a local non-bare git repo of llama.cpp that the inventory's `llama_cpp.repo`
points at (the benchmark adds one commit to it for step 3, on the checked-out branch).
THE PREFIX'S llama.cpp BUILDS AND ccache ARE DELETED: use a throwaway `paths.prefix`
(`--set paths.prefix=/tmp/llama-bench`).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from provision.app import App  # noqa: E402
from provision.console import Console, Environment  # noqa: E402
from provision.engine import Context  # noqa: E402
from provision import llama_tasks as lt  # noqa: E402
from provision.steps import llama as ls  # noqa: E402
from provision.target import connect, join, quote  # noqa: E402


def git(repo: Path, *args: str) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="llama-rig bench", GIT_AUTHOR_EMAIL="bench@llama-rig.invalid",
               GIT_COMMITTER_NAME="llama-rig bench", GIT_COMMITTER_EMAIL="bench@llama-rig.invalid")
    return subprocess.run(["git", "-C", str(repo), *args], check=True, text=True, env=env,
                          stdout=subprocess.PIPE).stdout.strip()


def add_commit(repo: Path) -> str:
    f = repo / "tools/server/server.cpp"
    with open(f, "a") as fh:
        fh.write(f"// llama-rig benchmark commit {time.time():.0f}\n")
    git(repo, "commit", "-q", "--no-verify", "-am", "benchmark: one small change (server.cpp)")
    return git(repo, "rev-parse", "HEAD")


class Bench:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.app = App(inventory_path=a.inventory, overrides=list(a.set or []),
                       env=Environment(sys.stdout, sys.stderr, False if a.plain else None))
        self.host = self.app.hosts(a.host)[0]
        self.target = connect(self.host)
        self.ctx = Context(self.host, self.target, Console(Environment(io.StringIO(), io.StringIO(), False)))
        self.ll = ls.Llama(self.ctx)

    def sh(self, cmd: str, **kw):
        return self.target.run(cmd, sudo=True, **kw)

    def task(self, fn) -> tuple[float, int]:
        t0 = time.monotonic()
        rc = self.app.each_host(self.a.host, fn, title=fn.__name__)
        return time.monotonic() - t0, int(rc)

    def current_info(self) -> dict:
        v = self.ll.view()
        return v.builds[v.current].extra if v.current in v.builds else {}

    def cuda_objects(self, log: str) -> int:
        r = self.sh(f"grep -c 'Building CUDA object' {quote(log)}", check=False)
        return int(r.stdout.strip() or 0)

    def wipe(self) -> None:
        ll = self.ll
        self.sh(f"rm -rf {quote(ll.builds_dir)} {quote(ll.base + '/current')} {quote(ll.ccache_dir)}")

    def seed_recipe(self, info: dict) -> dict:
        """The seed's recipe: Unix Makefiles, ALL targets, --clean-first, same -D flags, no ccache."""
        ll = self.ll
        d = f"{ll.base}/seed-recipe-build"
        args = [a for a in info["cmake_args"] if a not in ("-G", "Ninja") and not a.startswith("-DGGML_CCACHE")]
        args = ["-G", "Unix Makefiles", "-DGGML_CCACHE=OFF", *args]
        jobs = self.a.jobs or int(self.sh("nproc").stdout.strip())
        self.sh(f"git -C {quote(ll.src)} checkout -q --detach --force {info['commit']} && rm -rf {quote(d)}")
        t0 = time.monotonic()
        self.sh(f"cmake -S {quote(ll.src)} -B {quote(d)} {join(args)} > {quote(d)}.log 2>&1", timeout=None)
        self.sh(f"cmake --build {quote(d)} --clean-first -j {jobs} >> {quote(d)}.log 2>&1", timeout=None)
        secs = time.monotonic() - t0
        cuda = int(self.sh(f"grep -c 'Building CUDA object' {quote(d)}.log", check=False).stdout.strip() or 0)
        if not self.a.keep_seed:
            self.sh(f"rm -rf {quote(d)}")
        return {"seconds": round(secs, 1), "cuda_objects": cuda, "log": f"{d}.log"}

    def run(self) -> dict:
        res: dict = {"host": self.host.name, "inventory": self.a.inventory}
        hf = self.sh("nproc; gcc -dumpfullversion; cmake --version | head -1; "
                     "(nvcc --version 2>/dev/null || /usr/local/cuda/bin/nvcc --version 2>/dev/null) | grep release; "
                     "ccache --version 2>/dev/null | head -1; "
                     "nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader 2>/dev/null", check=False)
        res["machine"] = hf.stdout.strip().splitlines()
        self.wipe()
        # 1. cold
        secs, rc = self.task(lt.task_build)
        if rc:
            raise SystemExit(f"cold llama.build failed (exit {rc})")
        info = self.current_info()
        cmake_s = info["configure_seconds"] + info["build_seconds"]
        res["cold"] = {"seconds": round(secs, 1), "cmake_seconds": round(cmake_s, 1),
                       "compiled": info["compiled"], "cuda_objects": self.cuda_objects(info["log"]),
                       "build": info["name"], "version": info.get("version"),
                       "cmake_args": info["cmake_args"], "targets": info["targets"]}
        res["toolkit_overhead_pct"] = round((secs - cmake_s) / cmake_s * 100, 2)
        # 2. no-op
        before = self.ll.view()
        secs, rc = self.task(lt.task_build)
        after = self.ll.view()
        res["noop"] = {"seconds": round(secs, 2), "exit": rc,
                       "compiled": 0 if (after.current == before.current and
                                         set(after.builds) == set(before.builds)) else None}
        # 3. update by one commit
        if self.a.upstream:
            sha = add_commit(Path(self.a.upstream))
            secs, rc = self.task(lt.task_update)
            info2 = self.current_info()
            ok = rc == 0 and info2.get("commit") == sha
            res["update"] = {"seconds": round(secs, 1), "exit": rc, "switched_to": info2.get("name"),
                             "commit": sha, "ok": ok,
                             "cmake_seconds": round(info2.get("configure_seconds", 0) + info2.get("build_seconds", 0), 1),
                             "compiled": info2.get("compiled"), "ccache": info2.get("ccache"),
                             "cuda_objects": self.cuda_objects(info2["log"]) if info2.get("log") else None}
            res["update_ratio"] = round(secs / res["cold"]["seconds"], 3)
        # 4. seed recipe
        if self.a.seed_recipe:
            res["seed"] = self.seed_recipe(info)
            res["cold_vs_seed_ratio"] = round(res["cold"]["seconds"] / res["seed"]["seconds"], 3)
        return res


def table(res: dict) -> str:
    rows = [("cold llama.build", f"{res['cold']['seconds']} s",
             f"{res['cold']['compiled']} objects ({res['cold']['cuda_objects']} CUDA), {res['cold']['build']}"),
            ("  of which cmake", f"{res['cold']['cmake_seconds']} s",
             f"toolkit overhead {res['toolkit_overhead_pct']} % (goal <= 1 %)"),
            ("no-op llama.build", f"{res['noop']['seconds']} s", f"compiled {res['noop']['compiled']} (goal 0)")]
    if "update" in res:
        u = res["update"]
        rows.append(("update by 1 commit", f"{u['seconds']} s",
                     f"ratio {res['update_ratio']} (goal <= 0.25), {u['compiled']} compiled, ccache {u['ccache']}"))
    if "seed" in res:
        rows.append(("seed recipe", f"{res['seed']['seconds']} s",
                     f"cold/seed {res['cold_vs_seed_ratio']} ({res['seed']['cuda_objects']} CUDA objects)"))
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"{a.ljust(w)}  {b.rjust(10)}  {c}" for a, b, c in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--inventory", default="hosts.yaml")
    p.add_argument("--host", required=True)
    p.add_argument("--upstream", help="local git repo that llama_cpp.repo points at (for the update run)")
    p.add_argument("--seed-recipe", action="store_true", help="also time the seed recipe (Makefiles, all targets)")
    p.add_argument("--keep-seed", action="store_true", help="keep the seed recipe's build dir")
    p.add_argument("--jobs", type=int, default=None, help="-j for the seed recipe (default nproc)")
    p.add_argument("--set", action="append", help="inventory override SECTION.KEY=VALUE (repeatable)")
    p.add_argument("--json", help="also write the JSON here")
    p.add_argument("--plain", action="store_true", help="plain progress lines even on a terminal")
    a = p.parse_args(argv)
    res = Bench(a).run()
    text = json.dumps(res, indent=2)
    print(text)
    print(table(res))
    if a.json:
        Path(a.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
