"""`provision --from`: a second Tier B rig from the first (slow-ish: one real llama.cpp CPU build on
rig A, with the shared test ccache).

rig  (A): provisioned from scratch (facts, system, llama from the upstream fixture repo over git
          daemon, 3 shards from the stand-in hub) -> locks/rig.lock.yaml
rig2 (B): `--lock locks/rig.lock.yaml --from rig`: every shard and the build come from A, relayed
          through this machine (Tier B rigs cannot reach each other): 0 bytes from the hub (its
          request log), the same lock. Then, each on B: a shard tampered on A (its marker there
          still looks valid) comes from the hub; another cmake flag builds on B with a ccache
          seeded from A's (hits, no copy); a copy interrupted with Ctrl-C leaves no half file and
          nothing verified, and a re-run resumes it; and with a link between the two rigs
          (`linked`, a veth pair between their network namespaces) the copy goes DIRECT with a
          temporary key that is gone afterwards.
Through all of it A is only read: its state.json and its shards' mtimes stay as they were.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.fixtures.llama_rig import llama_settings
from tests.fixtures.rig_ccache import save_ccache, seed_ccache
from tests.fixtures.wheelhouse import WheelServer
from tests.hub.fixtures import make_gguf_like_shards
from tests.hub.server import StandInHub
from tests.rigs import sh
from tests.rigs.aptproxy import PROXY_ADDR

pytestmark = [pytest.mark.rig, pytest.mark.build]

ROOT = Path(__file__).resolve().parents[1]
STEPS = "facts,system,llama,model"
PREFIX = "/opt/llama-rig"
MODELS = "/var/lib/llama-rig/models"
MB = 1_000_000
SIZES = [8 * MB + 1, 6 * MB + 3, 4 * MB + 7]


class Pair:
    def __init__(self, a, b, url, commit, hub, shards, wheels, tmp: Path):
        self.a, self.b, self.url, self.commit = a, b, url, commit
        self.hub, self.shards, self.wheels, self.tmp = hub, shards, wheels, tmp
        self.ldir = f"{MODELS}/{shards.repo_id.replace('/', '__')}"
        self.served = f"{self.ldir}/current"  # the versioned layout: current -> commits/<sha>

    def write_inventory(self, a_transfer: dict | None = None, extra: dict | None = None) -> Path:
        def entry(rig, **extra):
            llama = dict(llama_settings(self.url), ref=self.commit)
            model = {"repo": self.shards.repo_id, "endpoint": self.hub.endpoint, "pip_find_links": self.wheels,
                     "free_space_margin_gb": 0, "token_env": "LLAMA_RIG_TEST_NO_TOKEN"}
            return rig.inventory_entry(connection={"connect_timeout": 5}, llama_cpp=llama, model=model, **extra)
        hosts = {"rig": entry(self.a, **({"transfer": a_transfer} if a_transfer else {})), "rig2": entry(self.b),
                 **(extra or {})}
        p = self.tmp / "hosts.yaml"
        p.write_text(yaml.safe_dump({"hosts": hosts}, sort_keys=False))
        return p

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "invoke", "--search-root", str(ROOT), "provision",
                "--inventory", str(self.tmp / "hosts.yaml"), *args]

    def provision(self, *args: str, timeout: float = 3600) -> subprocess.CompletedProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
        t0 = time.monotonic()
        r = subprocess.run(self.argv(*args), cwd=self.tmp, env=env, text=True, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=timeout)
        print(f"$ invoke provision {' '.join(args)}  ({time.monotonic() - t0:.1f}s, exit {r.returncode})\n{r.stdout}")
        return r

    def state(self, rig) -> dict:
        return json.loads(rig.sh("cat /var/lib/llama-rig/state.json").stdout)

    def lock_text(self, host: str) -> str:
        return (self.tmp / "locks" / f"{host}.lock.yaml").read_text()

    def hub_bytes(self, since: int) -> int:
        return sum(r.bytes_sent for r in self.hub.requests[since:]
                   if r.server == "cdn" or "/resolve/" in r.path)

    def hub_files(self, since: int) -> list[str]:
        return sorted(r.file for r in self.hub.requests[since:] if r.file and r.bytes_sent > 0
                      and (r.server == "cdn" or "/resolve/" in r.path))

    def a_snapshot(self) -> tuple[str, str, str]:
        """What must not change on A: its state, its shards (mtime, size), its authorized_keys."""
        st = self.a.sh("cat /var/lib/llama-rig/state.json").stdout
        files = self.a.sh(f"cd {self.ldir} && find . -type f -printf '%p %s %T@\\n' | sort").stdout
        keys = self.a.sh("cat /root/.ssh/authorized_keys").stdout
        return st, files, keys

    def no_copy_leftovers(self, rig) -> bool:
        """No partial of a copy anywhere under the model's dir (commits/, staging/, current)."""
        return rig.sh(f"find {self.ldir} -name llama-rig-copy").stdout.strip() == ""

    def wipe_b_model(self) -> None:
        self.b.sh(f"rm -rf {self.ldir}")

    def b_processes(self, rig) -> str:
        return rig.sh("pgrep -af '[r]ig_copy|[r]ig_keys' || true").stdout.strip()


def strip_host_block(text: str) -> str:
    return text[text.index("\nlock:\n"):]


@pytest.fixture(scope="module")
def pair(rig_factory, llama_upstream, llama_upstream_daemon, wheelhouse_dir, tmp_path_factory):
    a = rig_factory()
    b = rig_factory()
    hub = StandInHub(PROXY_ADDR).start()
    wheels = WheelServer(wheelhouse_dir, PROXY_ADDR)
    try:
        shards = make_gguf_like_shards(hub, "copytest/tiny-GGUF", n=3, size=SIZES)
        daemon = llama_upstream_daemon(PROXY_ADDR)
        p = Pair(a, b, daemon.url("llama.cpp"), llama_upstream.head(), hub, shards, wheels.url,
                 tmp_path_factory.mktemp("copy-pair"))
        p.write_inventory()
        seed_ccache(a)
        r = p.provision("--host", "rig", "--only", STEPS)
        assert r.returncode == 0, r.stdout
        if a.sh(f"ls {PREFIX}/llama.cpp/current/bin/llama-server", check=False).returncode == 0:
            save_ccache(a)
        yield p
    finally:
        wheels.stop()
        hub.stop()
        rig_factory.stop(a)
        rig_factory.stop(b)


@contextlib.contextmanager
def linked(a, b):
    """A veth pair between the two rigs' network namespaces: A is 10.251.0.1, B 10.251.0.2 (the
    addresses exist only inside these two namespaces)."""
    la, lb_ = f"lk-{a.name}"[:15], f"lk-{b.name}"[:15]
    sh(["ip", "link", "add", la, "type", "veth", "peer", "name", lb_])
    try:
        sh(["ip", "link", "set", la, "netns", a.name])
        sh(["ip", "link", "set", lb_, "netns", b.name])
        sh(["ip", "-n", a.name, "addr", "add", "10.251.0.1/30", "dev", la])
        sh(["ip", "-n", b.name, "addr", "add", "10.251.0.2/30", "dev", lb_])
        sh(["ip", "-n", a.name, "link", "set", la, "up"])
        sh(["ip", "-n", b.name, "link", "set", lb_, "up"])
        yield "10.251.0.1"
    finally:
        sh(["ip", "-n", a.name, "link", "del", la], check=False)
        sh(["ip", "link", "del", la], check=False)


# -------------------------------------------------------------------------------------------------


def test_rig2_from_rig_lock_gets_everything_from_rig_and_nothing_from_the_hub(pair):
    before_a = pair.a_snapshot()
    n0 = len(pair.hub.requests)
    # --check: the plan says what would be copied; nothing changes on either rig
    r = pair.provision("--host", "rig2", "--only", STEPS, "--lock", "locks/rig.lock.yaml", "--from", "rig", "--check")
    assert r.returncode == 0, r.stdout
    assert f"[rig2] model: would change: copy 3 files ({sum(SIZES) / 1e6:.1f} MB) from rig, " in r.stdout
    assert "then rig's build if it has the same fingerprint, else a build with a ccache seeded from rig's" in r.stdout
    assert pair.b.sh("test -e /var/lib/llama-rig/state.json", check=False).returncode != 0
    r = pair.provision("--host", "rig2", "--only", STEPS, "--lock", "locks/rig.lock.yaml", "--from", "rig")
    out = r.stdout
    assert r.returncode == 0, out
    # the hub's request log: metadata only, not one byte of a file
    assert pair.hub_bytes(n0) == 0 and pair.hub_files(n0) == []
    # which shard came from where, and which path the build took and why
    assert "[rig2] transfer: shards and builds come from rig" in out
    assert f"[rig2] model: from rig: 3 file(s), {sum(SIZES) / 1e6:.1f} MB: " in out
    assert "model: from the hub" not in out
    assert "relaying through this machine: rig2 cannot reach rig at " in out
    for p in pair.shards.shards:
        assert f"model: {p.rsplit('/', 1)[-1]} <- rig: copying " in out
        assert f"model: verified {p.rsplit('/', 1)[-1]}" in out  # hashed on rig2 before it counts
    st_a, st_b = pair.state(pair.a), pair.state(pair.b)
    name = st_a["llama"]["current"]
    assert f"[rig2] llama: copying build {name} from rig: same fingerprint {st_a['llama']['fingerprint'][:8]}" in out
    assert f"llama: {name} copied from rig (" in out and "smoke test passed" in out
    assert "Building" not in out and "llama: configure" not in out
    info = json.loads(pair.b.sh(f"cat {PREFIX}/llama.cpp/current/llama-rig-build.json").stdout)
    assert info["copied_from"] == f"rig:builds/{name}" and info["fingerprint"] == st_a["llama"]["fingerprint"]
    assert info["glibc"] and info["glibc"] == st_a["llama"]["glibc"]
    ver = pair.b.sh(f"{PREFIX}/llama.cpp/current/bin/llama-server --version 2>&1", check=False).stdout
    assert pair.commit[:7] in ver
    # the same bytes, verified on rig2, and the same lock
    for p in pair.shards.shards:
        assert pair.b.sh(f"sha256sum '{pair.served}/{p}'").stdout.split()[0] == pair.shards.sha256[p]
        assert st_b["model"]["verified"][p]["sha256"] == pair.shards.sha256[p]
    assert pair.b.sh(f"stat -c %a '{pair.served}/{pair.shards.shards[0]}'").stdout.strip() == "644"
    # the copies landed in the versioned layout: staged, verified, then `current` switched to them
    assert st_b["model"]["layout"] == "commits" and "model_staging" not in st_b
    assert pair.b.sh(f"readlink {pair.ldir}/current").stdout.strip() == f"commits/{st_a['model']['commit']}"
    assert pair.b.sh(f"ls -A {pair.ldir}").stdout.split() == ["commits", "current"]
    assert strip_host_block(pair.lock_text("rig")) == strip_host_block(pair.lock_text("rig2"))
    assert pair.no_copy_leftovers(pair.b)
    assert pair.b.sh(f"ls -A {PREFIX}/llama.cpp/builds").stdout.split() == [name]
    # rig was only read; nothing of the copy is left running anywhere
    assert pair.a_snapshot() == before_a
    assert pair.b_processes(pair.a) == "" and pair.b_processes(pair.b) == ""
    # and a second run changes nothing
    r = pair.provision("--host", "rig2", "--only", STEPS, "--lock", "locks/rig.lock.yaml", "--from", "rig")
    assert r.returncode == 0, r.stdout
    assert re.search(r"^rig2\s+ok\s+\d+\s+0\s+0\s+", r.stdout, re.M), r.stdout
    assert "copying" not in r.stdout


def test_a_shard_tampered_on_rig_comes_from_the_hub(pair):
    victim = pair.shards.shards[1]
    path = f"{pair.served}/{victim}"  # on rig: the file in commits/<sha>/
    # flip one byte and put size and mtime back: rig's verified marker still looks valid
    flip = ("import os,sys; p=sys.argv[1]; st=os.stat(p); f=open(p,'r+b'); f.seek(1000); b=f.read(1); "
            "f.seek(1000); f.write(bytes([b[0]^255])); f.close(); os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))")
    pair.a.sh(f"python3 -c \"{flip}\" '{path}'")
    try:
        pair.wipe_b_model()
        n0 = len(pair.hub.requests)
        r = pair.provision("--host", "rig2", "--only", "model", "--from", "rig")
        out = r.stdout
        assert r.returncode == 0, out
        name = victim.rsplit("/", 1)[-1]
        assert f"warning: [rig2] model: {victim}: MISMATCH" in out
        assert (f"model: {name}: from the hub instead (the copy from rig does not match the sha256 this rig "
                f"wants)") in out
        assert "model: from rig: 2 file(s)" in out
        assert (f"model: from the hub: 1 file(s), {SIZES[1] / 1e6:.1f} MB: {name} (the copy from rig does not "
                "match the sha256 this rig wants)") in out
        assert pair.hub_files(n0) == [victim]  # exactly that shard, once
        st = pair.state(pair.b)["model"]
        for p in pair.shards.shards:
            assert pair.b.sh(f"sha256sum '{pair.served}/{p}'").stdout.split()[0] == pair.shards.sha256[p]
            assert st["verified"][p]["sha256"] == pair.shards.sha256[p]
    finally:
        pair.a.sh(f"python3 -c \"{flip}\" '{path}'")  # flip it back
    assert pair.a.sh(f"sha256sum '{path}'").stdout.split()[0] == pair.shards.sha256[victim]


def test_an_unreachable_source_is_one_warning_then_the_hub(pair):
    pair.write_inventory(extra={"gone": {"connection": {"address": "127.0.0.1", "port": 1, "connect_timeout": 3}}})
    pair.wipe_b_model()
    n0 = len(pair.hub.requests)
    r = pair.provision("--host", "rig2", "--only", "model", "--from", "gone")
    out = r.stdout
    assert r.returncode == 0, out
    warn = [ln for ln in out.splitlines() if ln.startswith("warning: [rig2] model: source gone is unreachable")]
    assert len(warn) == 1 and warn[0].endswith(": the shards come from the hub"), out
    assert "Traceback" not in out
    assert pair.hub_files(n0) == sorted(pair.shards.shards)
    assert "model: from the hub: 3 file(s)" in out
    pair.write_inventory()


def test_another_cmake_flag_builds_on_rig2_with_a_ccache_seeded_from_rig(pair):
    st_a = pair.state(pair.a)
    r = pair.provision("--host", "rig2", "--only", "llama", "--from", "rig",
                       "--set", "llama_cpp.cmake_options={LLAMA_RIG_TEST_MARK: copy-test}")
    out = r.stdout
    assert r.returncode == 0, out
    m = re.search(r"\[rig2\] llama: building here with a ccache seeded from rig's: rig has no build with "
                  r"fingerprint (\w{8}) \(nearest (\S+): ([^)]*)\)", out)
    assert m, out
    assert m.group(2) == st_a["llama"]["current"]
    assert m.group(3) == "cmake_args +-DLLAMA_RIG_TEST_MARK=copy-test"
    assert re.search(r"\[rig2\] llama: ccache seeded from rig: \d+ files", out), out
    hits = re.search(r"llama: built (\S+) in \d+s \((\d+) objects compiled, ccache (\d+) hits / (\d+) misses\)", out)
    assert hits, out
    assert int(hits.group(3)) > 0 and int(hits.group(3)) >= 10 * int(hits.group(4)), out
    st_b = pair.state(pair.b)
    assert st_b["llama"]["current"] == hits.group(1) != st_a["llama"]["current"]
    assert "-DLLAMA_RIG_TEST_MARK=copy-test" in st_b["llama"]["cmake_args"]
    info = json.loads(pair.b.sh(f"cat {PREFIX}/llama.cpp/current/llama-rig-build.json").stdout)
    assert "copied_from" not in info and info["compiled"] > 0


def test_interrupted_copy_leaves_nothing_verified_and_a_rerun_resumes(pair):
    pair.write_inventory(a_transfer={"rate_limit_mb": 2})
    pair.wipe_b_model()
    before_a = pair.a_snapshot()
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    proc = subprocess.Popen(pair.argv("--host", "rig2", "--only", "model", "--from", "rig"), cwd=pair.tmp,
                            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    second = pair.shards.shards[1].rsplit("/", 1)[-1]
    lines: list[str] = []
    started = threading.Event()

    def reader():
        for ln in proc.stdout:
            lines.append(ln)
            if f"model: {second} <- rig: copying" in ln:
                started.set()
    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        assert started.wait(120), "".join(lines)
        time.sleep(1.5)  # in the middle of the second shard (2 MB/s, 6 MB)
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        rc = proc.wait(30)
        secs = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    t.join(10)
    out = "".join(lines)
    print(out)
    assert rc == 130 and secs < 5, out
    # no half file at a final path, nothing verified, nothing in service, the partial kept for the re-run
    state = pair.state(pair.b)
    assert state["model_staging"]["files"] and not state["model_staging"].get("verified"), state
    assert pair.b.sh(f"test -e {pair.ldir}/current", check=False).returncode != 0  # (wiped before the run)
    staging = f"{pair.ldir}/staging/{state['model_staging']['commit']}"
    first, mid = pair.shards.shards[0], pair.shards.shards[1]
    assert pair.b.sh(f"sha256sum '{staging}/{first}'").stdout.split()[0] == pair.shards.sha256[first]
    assert pair.b.sh(f"test -e '{staging}/{mid}'", check=False).returncode != 0
    part = int(pair.b.sh(f"stat -c %s '{staging}/.cache/llama-rig-copy/{mid}.partial'").stdout)
    assert 0 < part < SIZES[1]
    time.sleep(2)
    assert pair.b_processes(pair.a) == "" and pair.b_processes(pair.b) == ""  # stopped on both rigs
    # the re-run resumes that shard and verifies everything; still nothing from the hub
    pair.write_inventory()
    n0 = len(pair.hub.requests)
    r = pair.provision("--host", "rig2", "--only", "model", "--from", "rig")
    assert r.returncode == 0, r.stdout
    assert re.search(rf"model: {second} <- rig: resuming at [\d.]+ MB of {SIZES[1] / 1e6:.1f} MB", r.stdout), r.stdout
    assert pair.hub_bytes(n0) == 0
    st = pair.state(pair.b)["model"]
    for p in pair.shards.shards:
        assert pair.b.sh(f"sha256sum '{pair.served}/{p}'").stdout.split()[0] == pair.shards.sha256[p]
        assert st["verified"][p]["sha256"] == pair.shards.sha256[p]
    assert pair.no_copy_leftovers(pair.b)
    assert pair.a_snapshot() == before_a


def test_direct_copy_over_a_link_between_the_rigs(pair):
    with linked(pair.a, pair.b) as addr:
        pair.write_inventory(a_transfer={"address": addr, "mode": "direct"})
        pair.wipe_b_model()
        before_a = pair.a_snapshot()
        n0 = len(pair.hub.requests)
        r = pair.provision("--host", "rig2", "--only", "model", "--from", "rig")
        out = r.stdout
        assert r.returncode == 0, out
        assert f"directly from {addr}" in out and "relaying" not in out
        assert re.search(r"model: 3 of 3 file\(s\) from rig \([\d.]+ MB, direct;", out), out
        assert pair.hub_bytes(n0) == 0
        st = pair.state(pair.b)["model"]
        assert sorted(st["verified"]) == sorted(pair.shards.shards)
        # the temporary key is gone from rig, its key pair from rig2
        assert pair.a_snapshot() == before_a
        assert pair.a.sh("ls -A /root/.cache/llama-rig-copy 2>/dev/null || true").stdout.strip() == ""
        assert pair.b.sh("test -e /var/lib/llama-rig/transfer", check=False).returncode != 0
    pair.write_inventory()
