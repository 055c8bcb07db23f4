"""Lockfiles and multi-host runs on two Tier B rigs (slow: one real llama.cpp CPU build).

rig  (A): provisioned from scratch (facts, system, llama CPU build of the upstream fixture repo over
          git daemon, tiny model from the stand-in hub) -> locks/rig.lock.yaml
rig2 (B): upstream gets a new commit, then B is provisioned from A's lock -> same commit (not the
          new head), same cmake args, same model bytes, identical `lock:` block.
Then: a lock that names other bytes is refused, --check shows the difference from a lock, both
hosts in parallel from the inventory's `lock:` key, lock.diff, and one rig losing its network in
the middle of a two-host run.

Upstream git daemon, hub and wheelhouse listen on the apt proxy's address (10.250.0.1), which
every rig reaches, so both rigs use the SAME URLs (as two boxes of one site would).

B's build reuses A's ccache (copied over SSH before B's run: a compiler cache, the build itself
is real: clone, checkout of the locked commit, configure with the locked flags, build, smoke
test). A's ccache is kept in /var/cache/llama-rig-tests/lock-tests/ccache.tar so later sessions
do not pay the ~10 minute cold build again.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.fixtures.llama_rig import llama_settings
from tests.fixtures.rig_ccache import copy_ccache, save_ccache, seed_ccache
from tests.fixtures.wheelhouse import WheelServer
from tests.hub.fixtures import make_gguf_like_shards
from tests.hub.server import StandInHub
from tests.rigs.aptproxy import PROXY_ADDR

pytestmark = [pytest.mark.rig, pytest.mark.build]

ROOT = Path(__file__).resolve().parents[1]
STEPS = "facts,system,llama,model"
PREFIX = "/opt/llama-rig"
CONNECT_TIMEOUT = 4


class Pair:
    def __init__(self, a, b, upstream, url, hub, shards, wheels, tmp: Path):
        self.a, self.b, self.upstream, self.url = a, b, upstream, url
        self.hub, self.shards, self.wheels, self.tmp = hub, shards, wheels, tmp
        self.log: list[str] = []

    def entry(self, rig, **extra) -> dict:
        model = {"repo": self.shards.repo_id, "endpoint": self.hub.endpoint,
                 "pip_find_links": self.wheels, "free_space_margin_gb": 0,
                 "token_env": "LLAMA_RIG_TEST_NO_TOKEN"}
        return rig.inventory_entry(connection={"connect_timeout": CONNECT_TIMEOUT},
                                   llama_cpp=llama_settings(self.url), model=model, **extra)

    def write_inventory(self, lock_a: str | None = None, lock_b: str | None = None) -> Path:
        hosts = {"rig": self.entry(self.a, **({"lock": lock_a} if lock_a else {})),
                 "rig2": self.entry(self.b, **({"lock": lock_b} if lock_b else {}))}
        p = self.tmp / "hosts.yaml"
        p.write_text(yaml.safe_dump({"hosts": hosts, "groups": {"site": {"hosts": ["rig", "rig2"]}}},
                                    sort_keys=False))
        return p

    @property
    def locks(self) -> Path:
        return self.tmp / "locks"

    def argv(self, task: str, *args: str) -> list[str]:
        return [sys.executable, "-m", "invoke", "--search-root", str(ROOT), task,
                "--inventory", str(self.tmp / "hosts.yaml"), *args]

    def invoke(self, task: str, *args: str, timeout: float = 3600) -> subprocess.CompletedProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
        t0 = time.monotonic()
        r = subprocess.run(self.argv(task, *args), cwd=self.tmp, env=env, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
        print(f"$ invoke {task} {' '.join(args)}  ({time.monotonic() - t0:.1f}s, exit {r.returncode})\n"
              f"{r.stdout}")
        return r

    def state(self, rig) -> dict:
        import json
        return json.loads(rig.sh("cat /var/lib/llama-rig/state.json").stdout)

    def lock(self, host: str) -> dict:
        return yaml.safe_load((self.locks / f"{host}.lock.yaml").read_text())


@pytest.fixture(scope="module")
def pair(rig_factory, llama_upstream, llama_upstream_daemon, wheelhouse_dir, tmp_path_factory):
    a = rig_factory()
    b = rig_factory()
    hub = StandInHub(PROXY_ADDR).start()
    wheels = WheelServer(wheelhouse_dir, PROXY_ADDR)
    try:
        shards = make_gguf_like_shards(hub, "locktest/tiny-GGUF", n=2, size=[300_001, 200_003])
        daemon = llama_upstream_daemon(PROXY_ADDR)
        p = Pair(a, b, llama_upstream, daemon.url("llama.cpp"), hub, shards, wheels.url,
                 tmp_path_factory.mktemp("locks-pair"))
        p.write_inventory()
        p.seeded_a = seed_ccache(a)
        yield p
    finally:
        wheels.stop()
        hub.stop()
        rig_factory.stop(a)
        rig_factory.stop(b)


def strip_host_block(text: str) -> str:
    """The lock file without its `host:` block (name/address) and its header comment."""
    doc = yaml.safe_load(text)
    assert set(doc) == {"host", "lock"}
    return text[text.index("\nlock:\n"):]


# -------------------------------------------------------------------------------------------------


def test_a_from_scratch_writes_its_lock(pair):
    head = pair.upstream.head()
    r = pair.invoke("provision", "--host", "rig", "--only", STEPS)
    if pair.a.sh(f"ls {PREFIX}/llama.cpp/current/bin/llama-server", check=False).returncode == 0:
        save_ccache(pair.a)  # for the next session (even if an assertion below fails)
    assert r.returncode == 0, r.stdout
    assert "[rig] lock: wrote " in r.stdout
    text = (pair.locks / "rig.lock.yaml").read_text()
    assert text.startswith("# llama-rig lockfile")
    doc = yaml.safe_load(text)
    assert doc["host"] == {"name": "rig", "address": pair.a.address, "groups": ["site"]}
    lk = doc["lock"]
    assert list(lk) == ["format", "llama_rig", "hardware", "llama_cpp", "model", "rendered", "power"]
    st = pair.state(pair.a)
    ll = lk["llama_cpp"]
    assert ll["repo"] == pair.url and ll["commit"] == head == st["llama"]["commit"]
    assert ll["build_number"] == pair.upstream.commit_count()
    assert ll["cmake_args"] == st["llama"]["cmake_args"] and "-DGGML_CUDA=OFF" in ll["cmake_args"]
    assert ll["options"]["native"] is False and ll["options"]["targets"] == ["llama-server", "llama-fit-params"]
    assert ll["build"] == st["llama"]["current"]
    md = lk["model"]
    assert md["repo"] == pair.shards.repo_id and md["commit"] == pair.shards.sha
    assert [f["path"] for f in md["files"]] == sorted(pair.shards.shards)
    for f in md["files"]:
        assert f["sha256"] == pair.shards.sha256[f["path"]] and f["size"] == pair.shards.sizes[f["path"]]
        assert "verified" not in f  # hashed on the rig
    assert lk["hardware"]["gcc"] == st["llama"]["gcc"] and lk["hardware"]["gpu_count"] >= 1
    assert lk["rendered"] == {"llama-server.service": None, "llama-rig-gpu.service": None,
                              "opencode.json": None}

    # a second run changes nothing, and rewrites nothing
    mtime = (pair.locks / "rig.lock.yaml").stat().st_mtime_ns
    r = pair.invoke("provision", "--host", "rig", "--only", STEPS)
    assert r.returncode == 0, r.stdout
    assert "lock: " in r.stdout and " unchanged" in r.stdout
    assert (pair.locks / "rig.lock.yaml").read_text() == text
    assert (pair.locks / "rig.lock.yaml").stat().st_mtime_ns == mtime


def test_b_from_a_lock_gets_a_commit_after_upstream_moved(pair):
    lock_a = pair.lock("rig")
    old = lock_a["lock"]["llama_cpp"]["commit"]
    new = pair.upstream.add_commit(message="upstream moves on between the two runs")
    assert new != old
    copy_ccache(pair.a, pair.b)
    r = pair.invoke("provision", "--host", "rig2", "--only", STEPS, "--lock", "locks/rig.lock.yaml")
    assert r.returncode == 0, r.stdout
    out = r.stdout
    assert "[rig2] lock: reproducing rig from locks/rig.lock.yaml: llama.cpp " + old[:12] in out
    assert "[rig2] lock: matches locks/rig.lock.yaml" in out
    assert "cannot match" not in out  # same image, same fake GPUs: nothing that cannot match
    st = pair.state(pair.b)
    assert st["llama"]["commit"] == old
    assert st["llama"]["cmake_args"] == lock_a["lock"]["llama_cpp"]["cmake_args"]
    assert st["llama"]["current"] == lock_a["lock"]["llama_cpp"]["build"]
    ver = pair.b.sh(f"{PREFIX}/llama.cpp/current/bin/llama-server --version 2>&1", check=False).stdout
    assert f"commit {old[:7]}" in ver or old[:7] in ver, ver
    info = pair.b.sh(f"cat {PREFIX}/llama.cpp/current/llama-rig-build.json").stdout
    assert '"compiled"' in info  # really built on B (configure + build + smoke test)
    # the model bytes on B are the lock's (hashed here, outside the library)
    ldir = f"/var/lib/llama-rig/models/{pair.shards.repo_id.replace('/', '__')}/current"
    for f in lock_a["lock"]["model"]["files"]:
        got = pair.b.sh(f"sha256sum '{ldir}/{f['path']}'").stdout.split()[0]
        assert got == f["sha256"]
    assert st["model"]["commit"] == lock_a["lock"]["model"]["commit"]
    # identical lock content (the host block aside)
    ta = (pair.locks / "rig.lock.yaml").read_text()
    tb = (pair.locks / "rig2.lock.yaml").read_text()
    assert strip_host_block(ta) == strip_host_block(tb)
    assert yaml.safe_load(tb)["host"]["name"] == "rig2" and ta != tb


def test_lock_with_other_bytes_is_refused_and_check_shows_differences(pair):
    doc = pair.lock("rig")
    # 1. a lock whose file sha256 is not what the hub/rig has for that commit: refused, untouched
    bad = yaml.safe_load(yaml.safe_dump(doc))
    f0 = bad["lock"]["model"]["files"][0]
    f0["sha256"] = "0" * 64
    (pair.tmp / "bad-bytes.lock.yaml").write_text(yaml.safe_dump(bad, sort_keys=False))
    before = pair.b.sh("cat /var/lib/llama-rig/state.json").stdout
    r = pair.invoke("provision", "--host", "rig2", "--only", "model", "--lock", "bad-bytes.lock.yaml")
    assert r.returncode == 1, r.stdout
    assert "differ from the lock bad-bytes.lock.yaml (" + f0["path"] in r.stdout
    assert pair.b.sh("cat /var/lib/llama-rig/state.json").stdout == before

    # 2. --check against a lock naming another commit: the plan and the differences, no change
    other = yaml.safe_load(yaml.safe_dump(doc))
    head = pair.upstream.head()
    other["lock"]["llama_cpp"]["commit"] = head
    (pair.tmp / "other-commit.lock.yaml").write_text(yaml.safe_dump(other, sort_keys=False))
    cur = pair.b.sh(f"readlink {PREFIX}/llama.cpp/current").stdout
    r = pair.invoke("provision", "--host", "rig2", "--only", STEPS, "--check", "--lock", "other-commit.lock.yaml")
    assert r.returncode == 0, r.stdout
    assert f"llama: would change: " in r.stdout and head[:7] in r.stdout
    assert (f"lock: would differ from other-commit.lock.yaml: llama_cpp.commit: lock {head} ≠ rig "
            f"{doc['lock']['llama_cpp']['commit']}") in r.stdout
    assert pair.b.sh(f"readlink {PREFIX}/llama.cpp/current").stdout == cur

    # 3. lock.diff of two lock files names the difference and exits 1
    r = pair.invoke("lock.diff", "locks/rig.lock.yaml", "other-commit.lock.yaml")
    assert r.returncode == 1, r.stdout
    assert "1 difference" in r.stdout and "llama_cpp.commit:" in r.stdout


def test_both_hosts_in_parallel_from_inventory_lock_key(pair):
    pair.write_inventory(lock_a="locks/rig.lock.yaml", lock_b="locks/rig.lock.yaml")
    r = pair.invoke("provision", "--host", "site", "--only", STEPS)
    assert r.returncode == 0, r.stdout
    r = pair.invoke("provision", "--host", "rig,rig2", "--only", STEPS)
    out = r.stdout
    assert r.returncode == 0, out
    import re
    assert re.search(r"^rig\s+ok\s+\d+\s+0\s+0\s+", out, re.M), out
    assert re.search(r"^rig2\s+ok\s+\d+\s+0\s+0\s+", out, re.M), out
    assert "0 of 2 hosts failed" in out
    assert "download" not in out and "Building" not in out
    # the two rigs, read live: no differences
    r = pair.invoke("lock.diff", "rig", "rig2")
    assert r.returncode == 0, r.stdout
    assert "rig vs rig2: no differences" in r.stdout
    r = pair.invoke("lock.show", "rig2")
    assert r.returncode == 0 and "name: rig2" in r.stdout and pair.shards.sha in r.stdout


def test_benchmark_parallel_ratio_and_noop_cost(pair):
    """benchmarks/multihost.py's measure() on the two rigs (all four steps, with their locks)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import multihost
    res = multihost.measure(str(pair.tmp / "hosts.yaml"), "rig", "rig2", only=STEPS, reps=2)
    print(multihost.table(res))
    assert res["noop_changed"] == 0
    assert res["noop_hashed_bytes"] == 0
    assert all(h["hashed_bytes"] == 0 and not h["failed"] for h in res["parallel_hosts"].values())
    assert 0 < res["noop_commands"] <= 40, res
    assert res["ratio"] < 2.5, res  # the goal is 1.3; this box has 2 shared cores


def test_one_host_unreachable_mid_run_other_completes(pair, rig_factory):
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    proc = subprocess.Popen(pair.argv("provision", "--host", "rig,rig2", "--only", STEPS),
                            cwd=pair.tmp, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    lines: list[str] = []
    killed = threading.Event()

    def reader():
        for ln in proc.stdout:
            lines.append(ln)
            if ln.startswith("[rig2] facts:") and not killed.is_set():
                rig_factory.kill_network(pair.b)  # rig2 drops off the network mid-run
                killed.set()
    t = threading.Thread(target=reader, daemon=True)
    t.start()
    t0 = time.monotonic()
    try:
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    t.join(10)
    secs = time.monotonic() - t0
    out = "".join(lines)
    print(out, f"\n({secs:.1f}s)")
    import re
    assert killed.is_set(), out
    assert rc in (1, 3), out  # 1: a step failed when the session died, 3: only unreachable
    assert re.search(r"^rig\s+ok\s+\d+\s+0\s+0\s+", out, re.M), out
    assert re.search(r"^rig2\s+UNREACHABLE\s", out, re.M), out
    assert "1 of 2 hosts failed" in out
    assert "[rig2] UNREACHABLE: " in out
    assert "[rig] lock: " in out  # the healthy host finished, lock included
    assert secs < 240, out
