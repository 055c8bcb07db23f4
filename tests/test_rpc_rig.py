"""llama.cpp's RPC backend on two Tier B rigs (real systemd, real llama.cpp CPU builds with
GGML_RPC=ON from the upstream fixture repo, a real ggml-rpc-server and llama-server).

rig A ("main") serves a tiny llama model whose last layers live on rig B ("w1"): B's
ggml-rpc-server listens only on the private link between the two rigs (10.251.0.2, a veth pair
that exists only inside their two network namespaces) and its nft table lets only A in. ONE
`provision --host main,w1` brings up both (B fresh: A's rpc step waits for B's build). Then:
a completion is answered; a second run changes nothing; B cut off -> `service.status` on A names
it and fails; B back -> the watcher restarts llama-server and it answers again; a worker built at
another commit -> A refuses to restart, naming the node; a public rpc.bind -> exit 2, B untouched.

Wall time: one CPU build of llama-server + ggml-rpc-server on A (the shared test ccache when there
is one), B built from A's ccache, and one rebuild of llama-server on B for the skew case.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from provision.app import App
from provision.console import Environment
from provision.steps import model as model_step
from provision.steps import service as svc
from tests.fixtures.llama_upstream import GitDaemon, make_upstream_repo
from tests.fixtures.rig_ccache import CCACHE_TAR, copy_ccache, ssh_argv
from tests.fixtures.tiny_gguf import write_tiny_llama
from tests.rigs import CACHE_ROOT, sh, tcp_open
from tests.rigs.aptproxy import PROXY_ADDR

pytestmark = [pytest.mark.rig, pytest.mark.build]

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "/opt/llama-rig"
MODEL_DIR = "/var/lib/llama-rig/models/tiny"
MODEL = f"{MODEL_DIR}/tiny-llama.gguf"
A_ADDR, B_ADDR, PORT = "10.251.0.1", "10.251.0.2", 50052
EP = f"{B_ADDR}:{PORT}"
# this test's own compiler cache (GGML_RPC=ON, llama-bench): seeded from the shared CPU one the first
# time, never written back there (other tests' hit counts stay theirs)
RPC_CCACHE = CACHE_ROOT / "rpc-tests" / "ccache.tar"


def seed(rig) -> None:
    src = RPC_CCACHE if RPC_CCACHE.exists() else CCACHE_TAR
    if src.exists():
        with open(src, "rb") as fh:
            subprocess.run([*ssh_argv(rig), f"mkdir -p {PREFIX} && tar -C / -xf -"], stdin=fh, check=True,
                           timeout=600)


def save(rig) -> None:
    RPC_CCACHE.parent.mkdir(parents=True, exist_ok=True)
    tmp = RPC_CCACHE.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        subprocess.run([*ssh_argv(rig), "tar -C / -cf - opt/llama-rig/ccache"], stdout=fh, check=True, timeout=600)
    os.replace(tmp, RPC_CCACHE)


@contextlib.contextmanager
def linked(a, b):
    """A veth pair between the two rigs' namespaces: A 10.251.0.1, B 10.251.0.2 (nowhere else)."""
    la, lb_ = f"rp-{a.name}"[:15], f"rp-{b.name}"[:15]
    sh(["ip", "link", "add", la, "type", "veth", "peer", "name", lb_])
    try:
        sh(["ip", "link", "set", la, "netns", a.name])
        sh(["ip", "link", "set", lb_, "netns", b.name])
        sh(["ip", "-n", a.name, "addr", "add", f"{A_ADDR}/30", "dev", la])
        sh(["ip", "-n", b.name, "addr", "add", f"{B_ADDR}/30", "dev", lb_])
        sh(["ip", "-n", a.name, "link", "set", la, "up"])
        sh(["ip", "-n", b.name, "link", "set", lb_, "up"])
        yield lb_
    finally:
        sh(["ip", "-n", a.name, "link", "del", la], check=False)
        sh(["ip", "link", "del", la], check=False)


class Pair:
    def __init__(self, a, b, url: str, commit: str, tmp: Path):
        self.a, self.b, self.url, self.commit, self.tmp = a, b, url, commit, tmp
        self.write()

    def write(self, w1_ref: str | None = None, w1_bind: str = B_ADDR) -> Path:
        llama = {"repo": self.url, "ref": self.commit, "cuda": False, "prebuilt_ui": False, "native": False,
                 "rpc": True, "targets": ["llama-server", "llama-bench"]}
        hosts = {
            "main": self.a.inventory_entry(
                connection={"connect_timeout": 5}, llama_cpp=llama,
                rpc={"workers": ["w1"], "address": A_ADDR, "wait_timeout": 30},
                server={"port": 8080, "ctx_size": 2048, "n_gpu_layers": 3, "cache_type_k": "f16",
                        "cache_type_v": "f16", "alias": "tiny", "start_timeout": 120}),
            "w1": self.b.inventory_entry(
                connection={"connect_timeout": 5}, llama_cpp=dict(llama, ref=w1_ref or self.commit),
                rpc={"bind": w1_bind, "port": PORT, "cache_max_gb": 1}),
        }
        p = self.tmp / "hosts.yaml"
        p.write_text(yaml.safe_dump({"hosts": hosts}, sort_keys=False))
        return p

    def app(self) -> tuple[App, io.StringIO]:
        out = io.StringIO()
        return App(str(self.tmp / "hosts.yaml"), env=Environment(stdout=out, stderr=out, isatty=False)), out

    def provision(self, host: str, only: str) -> tuple[int, str]:
        app, out = self.app()
        t0 = time.monotonic()
        rc = int(app.provision(host, only=only))
        text = out.getvalue()
        print(f"$ provision --host {host} --only {only} ({time.monotonic() - t0:.1f}s, exit {rc})\n{text}")
        return rc, text

    def task(self, host: str, fn, title: str) -> tuple[int, str]:
        app, out = self.app()
        rc = int(app.each_host(host, fn, title=title))
        print(f"$ {title} --host {host} (exit {rc})\n{out.getvalue()}")
        return rc, out.getvalue()

    def chat(self, timeout: int = 60) -> dict:
        body = json.dumps({"model": "tiny", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]})
        r = self.a.sh("python3 -c " + _q(
            "import sys,urllib.request;k=open('/etc/llama-rig/api-key').read().strip();"  # the rig's key
            "r=urllib.request.Request('http://127.0.0.1:8080/v1/chat/completions',"
            "data=sys.argv[1].encode(),headers={'Content-Type':'application/json','Authorization':'Bearer '+k});"
            f"print(urllib.request.urlopen(r,timeout={timeout}).read().decode())") + " " + _q(body), check=False,
            timeout=timeout + 30)
        if r.returncode != 0:
            return {"failed": (r.stdout + r.stderr)[-300:]}
        return json.loads(r.stdout)


def _q(s: str) -> str:
    import shlex
    return shlex.quote(s)


def can_connect(rig, host: str, port: int, timeout: float = 3) -> bool:
    r = rig.sh("python3 -c " + _q(f"import socket; socket.create_connection(({host!r}, {port}), timeout={timeout})"),
               check=False, timeout=30)
    return r.returncode == 0


def wait_until(pred, timeout: float, what: str):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="module")
def pair(rig_factory, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rpc-pair")
    upstream = make_upstream_repo(tmp / "upstream" / "llama.cpp")  # our own: we add a commit to it
    daemon = GitDaemon(upstream.path.parent, PROXY_ADDR).start()
    a = rig_factory(fake_nvidia_smi=False)
    b = rig_factory(fake_nvidia_smi=False, capabilities=("CAP_NET_ADMIN",))  # nft in its own netns
    try:
        with linked(a, b) as b_if:
            p = Pair(a, b, daemon.url("llama.cpp"), upstream.head(), tmp)
            p.upstream, p.b_if = upstream, b_if
            # the tiny model on A (the model step's hub path is tested elsewhere)
            write_tiny_llama(tmp / "gguf", "tiny-llama", n_layer=4)
            a.sh(f"mkdir -p {MODEL_DIR}")
            with open(tmp / "gguf" / "tiny-llama.gguf", "rb") as fh:
                subprocess.run([*ssh_argv(a), f"cat > {MODEL}"], stdin=fh, check=True, timeout=60)
            b.sh("DEBIAN_FRONTEND=noninteractive apt-get install -y -q nftables >/dev/null", timeout=300)
            seed(a)
            rc, out = p.provision("main", "facts,system,llama")
            assert rc == 0, out
            save(a)
            copy_ccache(a, b)
            yield p
    finally:
        daemon.stop()
        rig_factory.stop(a)
        rig_factory.stop(b)


@pytest.fixture(autouse=True)
def _model(monkeypatch):
    monkeypatch.setattr(model_step, "shard1_path", lambda ctx: MODEL)


def test_rpc_across_two_rigs(pair):
    a, b = pair.a, pair.b
    # -- ONE run for both, the worker fresh: it builds (GGML_RPC=ON, same commit) while the main's
    # rpc step waits for the worker's (provision/peers.py); then the main starts llama-server -----
    rc, out = pair.provision("main,w1", "facts,system,llama,rpc,service")
    assert rc == 0, out
    assert "[main] rpc: waiting for w1 (provisioned in this run) to finish its rpc step" in out
    assert out.index("[w1] rpc: llama-rpc-server.service listening on") < out.index("[main] rpc: worker w1")
    assert "[w1] rpc: llama-rpc-server.service listening on 10.251.0.2:50052" in out
    assert "[w1] service: ok (no change)" in out  # a worker serves no model
    bins = b.sh(f"ls {PREFIX}/llama.cpp/current/bin").stdout.split()
    assert "ggml-rpc-server" in bins or "rpc-server" in bins
    unit = b.sh("systemctl show llama-rpc-server.service -p ActiveState -p User -p ExecStart").stdout
    assert "ActiveState=active" in unit and "User=llama" in unit and f"-H {B_ADDR} -p {PORT} -c" in unit
    listen = [ln.split()[3] for ln in b.sh(f"ss -Hltn 'sport = :{PORT}'").stdout.splitlines()]
    assert listen == [f"{B_ADDR}:{PORT}"], listen  # the private address only, no wildcard
    assert "llama_rig_rpc" in b.sh("nft list tables").stdout
    assert b.sh("systemctl is-active llama-rig-rpc-health.service").stdout.strip() == "active"
    v = b.sh("systemd-analyze verify /etc/systemd/system/llama-rpc-server.service", check=False)
    assert v.returncode == 0 and v.stderr.strip() == "", v.stderr
    # only A gets in: B itself (another source address) is dropped, the host side sees nothing
    assert can_connect(a, B_ADDR, PORT) and can_connect(a, B_ADDR, PORT + 1)
    assert not can_connect(b, B_ADDR, PORT, timeout=2) and not can_connect(b, B_ADDR, PORT + 1, timeout=2)
    assert not tcp_open(b.address, PORT)  # B's management address (this machine's side): not bound

    # -- the main: --rpc, workers checked, a completion through both rigs -------------------------
    assert "[main] rpc: worker w1 10.251.0.2:50052:" in out
    assert re.search(r"/health 200 in \d+ ms; chat completion in \d+ ms", out), out
    argv = a.sh("systemctl show llama-server.service -p ExecStart").stdout
    assert f"--rpc {EP}" in argv and "-ngl 3" in argv
    reply = pair.chat()
    assert reply.get("choices") and reply["choices"][0]["message"] is not None, reply
    peers = [ln.split()[3] for ln in b.sh(f"ss -Htn state established '( sport = :{PORT} )'").stdout.splitlines()]
    assert peers and all(p.startswith(f"{A_ADDR}:") for p in peers), peers  # A's llama-server is its client
    assert a.sh("systemctl is-active llama-rig-rpc-watch.service").stdout.strip() == "active"

    # -- again: nothing ----------------------------------------------------------------------------
    rc, out = pair.provision("w1", "rpc")
    assert rc == 0 and "rpc: ok (no change)" in out, out
    rc, out = pair.provision("main", "rpc,service")
    assert rc == 0 and "rpc: ok (no change)" in out and "service: ok (no change)" in out, out

    # -- status shows the worker ------------------------------------------------------------------
    rc, out = pair.task("main", svc.status, "service.status")
    assert rc == 0 and "rpc worker w1" in out and f"{EP} up" in out and "build b" in out, out
    rc, out = pair.task("w1", svc.status, "service.status")
    assert rc == 0 and "llama-rpc-server.service active" in out and "listening" in out, out

    # -- B cut off: status says so; B back: the watcher restarts llama-server, it answers ---------
    pid0 = a.sh("systemctl show -p MainPID --value llama-server.service").stdout.strip()
    sh(["ip", "-n", b.name, "link", "set", pair.b_if, "down"])
    try:
        wait_until(lambda: not can_connect(a, B_ADDR, PORT, timeout=2), 30, "B to be unreachable from A")
        # the layers on B are gone with it: no answer (proof that B really computes them)
        assert "failed" in pair.chat(timeout=8)
        time.sleep(4)  # the watcher's next round sees it down
        rc, out = pair.task("main", svc.status, "service.status")
        assert rc == 1, out
        assert f"rpc worker w1 ({EP}) is not serving for main: no answer" in out, out
        assert "DOWN" in out
    finally:
        sh(["ip", "-n", b.name, "link", "set", pair.b_if, "up"])
    took = wait_until(lambda: a.sh("systemctl show -p MainPID --value llama-server.service").stdout.strip()
                      not in (pid0, "0", ""), 60, "the watcher to restart llama-server")
    wait_until(lambda: a.sh("python3 -c \"import urllib.request as u;print(u.urlopen('http://127.0.0.1:8080/health')"
                            ".status)\"", check=False).stdout.strip().endswith("200"), 120, "llama-server healthy again")
    assert pair.chat().get("choices"), "no answer after B came back"
    print(f"llama-server restarted by the watcher {took:.1f}s after B came back")
    rc, out = pair.task("main", svc.status, "service.status")
    assert rc == 0 and f"{EP} up" in out, out

    # -- the worker's rpc server restarted (its connection to A is gone): A's llama-server restarts --
    pid1 = a.sh("systemctl show -p MainPID --value llama-server.service").stdout.strip()

    def watcher_restarts() -> int:
        return a.sh("journalctl -u llama-rig-rpc-watch -o cat --no-pager").stdout.count("llama-server.service: restart (")
    before = watcher_restarts()
    b.sh("systemctl restart llama-rpc-server.service")
    wait_until(lambda: a.sh("systemctl show -p MainPID --value llama-server.service").stdout.strip()
               not in (pid1, "0", ""), 60, "the watcher to restart llama-server after the worker restart")
    wait_until(lambda: a.sh("python3 -c \"import urllib.request as u;print(u.urlopen('http://127.0.0.1:8080/health')"
                            ".status)\"", check=False).stdout.strip().endswith("200"), 120, "llama-server healthy")
    assert pair.chat().get("choices")
    assert watcher_restarts() == before + 1  # "the rpc server of ... restarted" or "... is back"

    # -- bench on this topology: llama-bench gets --rpc, the server comes back through the gate ----
    r = subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT), "bench", "--host", "main",
                        "--inventory", str(pair.tmp / "hosts.yaml"), "--depths", "0", "--reps", "1",
                        "--prompt", "32", "--gen", "8", "--no-ttft", "--results", str(pair.tmp / "results"),
                        "--model", MODEL],
                       cwd=pair.tmp, text=True, capture_output=True, timeout=900)
    print(r.stdout + r.stderr)
    assert r.returncode == 0, r.stdout + r.stderr
    got = list((pair.tmp / "results").rglob("*.json"))
    assert got and any(f"--rpc {EP}" in p.read_text() or EP in p.read_text() for p in got), got
    assert a.sh("systemctl is-active llama-server.service").stdout.strip() == "active"

    # -- a public bind: bad input, exit 2, B untouched ----------------------------------------------
    before = b.sh("cat /etc/systemd/system/llama-rpc-server.service").stdout
    for bind, over, first in (("0.0.0.0", [], "hosts.yaml: host 'w1': rpc.bind: "),
                              (B_ADDR, ["--set", "rpc.bind=8.8.8.8"], "command line: rpc.bind: ")):
        pair.write(w1_bind=bind)
        r = subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT), "provision", "--host", "w1",
                            "--inventory", str(pair.tmp / "hosts.yaml"), *over],
                           cwd=pair.tmp, text=True, capture_output=True, timeout=120)
        lines = (r.stdout + r.stderr).strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, lines
        assert lines[0].startswith(first + "must be a private IP address"), lines
        assert b.sh("cat /etc/systemd/system/llama-rpc-server.service").stdout == before
    pair.write()

    # -- a worker at another commit: the main refuses to restart, naming it --------------------------
    new = pair.upstream.add_commit()  # touches tools/server/server.cpp only: a short rebuild on B
    pair.write(w1_ref=new)
    rc, out = pair.provision("w1", "llama,rpc")
    assert rc == 0, out
    rc, out = pair.provision("main", "rpc,service")
    assert rc == 1, out
    assert "version skew: worker w1 runs llama.cpp" in out and f"commit {new[:12]}" in out, out
    assert f"commit {pair.commit[:12]}" in out and "llama-server was not (re)started" in out
    app_restart = pair.task("main", svc.restart, "service.restart")
    assert app_restart[0] == 1 and "version skew: worker w1" in app_restart[1]
    # the watcher saw the worker's rpc server restart on the new build and did not restart llama-server
    wait_until(lambda: "version skew" in a.sh("journalctl -u llama-rig-rpc-watch -o cat --no-pager").stdout,
               30, "the watcher to refuse the restart")
    rc, out = pair.task("main", svc.status, "service.status")
    assert rc == 1 and "VERSION SKEW" in out and "every node must run the same commit" in out, out
    # back to the main's commit (the old build is kept: a switch, no build) -> a restart is owed
    pair.write()
    rc, out = pair.provision("w1", "llama,rpc")
    assert rc == 0, out
    rc, out = pair.provision("main", "rpc,service")
    assert rc == 0, out
    assert "worker w1" in out and re.search(r"/health 200 in \d+ ms; chat completion", out), out



def test_rpc_gpu_benchmark_logic_on_the_cpu_build(pair, tmp_path):
    """benchmarks/rpc_gpu.py (the device proof) with A's real binaries on this machine, --cpu: two
    rpc servers on loopback vs direct, load times with and without the tensor cache."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    cur = f"{PREFIX}/llama.cpp/current/bin"
    names = pair.a.sh(f"ls {cur}").stdout.split()
    for n in ("llama-bench", "llama-server", "ggml-rpc-server"):
        assert n in names, names
        with open(bindir / n, "wb") as fh:
            subprocess.run([*ssh_argv(pair.a), f"cat {cur}/{n}"], stdout=fh, check=True, timeout=120)
        (bindir / n).chmod(0o755)
    model = write_tiny_llama(tmp_path / "m", "tiny-llama", n_layer=4)[0]
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rpc_gpu.py"), "--cpu", "--bin", str(bindir),
                        "--model", str(model), "--out", str(out), "--prompt", "64", "--gen", "16", "--reps", "2",
                        "--ctx", "1024"], text=True, capture_output=True, timeout=600)
    print(r.stdout + r.stderr)
    assert r.returncode == 0, r.stdout + r.stderr
    rec = json.loads((out / "rpc_gpu.json").read_text())
    assert rec["rpc"]["argv"][-2] == "--rpc" and rec["rpc"]["argv"][-1].count("127.0.0.1:") == 2
    assert rec["rpc"]["devices"].count("127.0.0.1:") == 2  # llama-bench really used the two rpc servers
    for k in ("prefill_ratio_rpc_vs_direct", "decode_ratio_rpc_vs_direct"):
        assert rec[k] and rec[k] > 0
    for k in ("direct_s", "rpc_no_cache_s", "rpc_cache_cold_s", "rpc_cache_warm_s"):
        assert 0 < rec["load"][k] < 120
