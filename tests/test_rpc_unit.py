"""llama.cpp's RPC backend as data: the inventory's rpc section, the worker's unit and nft table,
the main's --rpc/-ts, the build comparison across nodes, the restart owed to changed workers and
the VRAM preflight of the workers' devices (no rig here: tests/test_rpc_rig.py runs it for real)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from provision import inventory as inv
from provision import rpc
from provision.engine import Call, Run, WriteFile
from provision.errors import InventoryError, StepError
from provision.steps import rpc as rpc_step
from provision.steps import service
from tests.catalog.systemd_words import exec_words, unit_settings

ROOT = Path(__file__).resolve().parents[1]
MODEL = "/m/model-00001-of-00002.gguf"


def data(main_rpc=None, w1_rpc=None, **main_extra):
    return {
        "groups": {"workers": {"hosts": ["w1", "w2"]}},
        "hosts": {
            "main": {"connection": {"address": "10.9.0.1"}, "llama_cpp": {"rpc": True},
                     "gpus": {"count": 2}, "rpc": {"workers": ["workers"], **(main_rpc or {})}, **main_extra},
            "w1": {"connection": {"address": "10.9.0.2"}, "llama_cpp": {"rpc": True}, "gpus": {"count": 2},
                   "rpc": {"bind": "10.9.0.2", "gpus": [0, 1], **(w1_rpc or {})}},
            "w2": {"connection": {"address": "10.9.0.3"}, "llama_cpp": {"rpc": True},
                   "rpc": {"bind": "fd00::3", "port": 50099, "cache": False}},
        }}


def load(d):
    return inv.from_data(d, "hosts.yaml")


def refused(d) -> str:
    with pytest.raises(InventoryError) as e:
        load(d)
    assert e.value.status == 2
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400
    return msg


def test_workers_resolve_from_a_group_and_the_main_gets_rpc_and_ts_in_that_order():
    d = data()
    d["hosts"]["main"]["server"] = {"tensor_split": [1, 1, 0.5, 0.9, 1]}  # w1 2 GPUs, w2 CPU, 2 local
    i = load(d)
    main = i.hosts["main"]
    assert [w.name for w in main.rpc_workers] == ["w1", "w2"]
    assert [m.name for m in i.hosts["w1"].rpc_mains] == ["main"]
    assert main.cfg["rpc"]["endpoints"] == ["10.9.0.2:50052", "[fd00::3]:50099"]
    argv = service.server_argv(main.cfg, MODEL, "/b/llama-server")
    assert argv[argv.index("--rpc") + 1] == "10.9.0.2:50052,[fd00::3]:50099"
    assert argv[argv.index("-ts") + 1] == "1,1,0.5,0.9,1"
    fit = service.fit_params_argv(main.cfg, MODEL, "/b/llama-fit-params")
    assert fit[fit.index("--rpc") + 1] == "10.9.0.2:50052,[fd00::3]:50099"
    # a host without workers: no --rpc
    assert "--rpc" not in service.server_argv(i.hosts["w1"].cfg, MODEL, "/b/llama-server")


@pytest.mark.parametrize("bind", ["0.0.0.0", "::", "8.8.8.8", "2001:4860:4860::8888", "worker.lan",
                                  "224.0.0.5", "::ffff:0.0.0.0"])
def test_a_public_or_wildcard_bind_is_bad_input_naming_file_host_and_key(bind):
    msg = refused(data(w1_rpc={"bind": bind}))
    assert msg.startswith("hosts.yaml: host 'w1': rpc.bind: must be a private IP address"), msg


@pytest.mark.parametrize("bind", ["127.0.0.1", "::1", "10.1.2.3", "192.168.7.7", "172.20.0.1", "100.100.1.1"])
def test_loopback_and_private_binds_are_accepted(bind):
    assert load(data(w1_rpc={"bind": bind})).hosts["w1"].cfg["rpc"]["bind"] == bind


def test_inventory_cross_checks():
    d = data()
    d["hosts"]["main"]["rpc"]["workers"] = ["w9"]
    assert "rpc.workers: unknown host or group 'w9'" in refused(d)
    d = data()
    d["hosts"]["main"]["rpc"]["workers"] = ["main"]
    assert "is this host itself" in refused(d)
    d = data()
    del d["hosts"]["w2"]["rpc"]["bind"]
    assert refused(d).startswith("hosts.yaml: host 'w2': rpc.bind: required on a worker of 'main'")
    d = data()
    d["hosts"]["w1"]["llama_cpp"]["rpc"] = False
    assert refused(d).startswith("hosts.yaml: host 'w1': rpc.bind: needs llama_cpp.rpc: true")
    d = data()
    d["hosts"]["main"]["server"] = {"tensor_split": [1, 1]}  # only the local GPUs
    msg = refused(d)
    assert "server.tensor_split: has 2 values but the workers expose 3 device(s)" in msg and "(5 values)" in msg
    d = data()
    d["hosts"]["main"]["connection"] = {"type": "local"}
    assert "rpc.address: required on a main host" in refused(d)
    d["hosts"]["main"]["rpc"]["address"] = "10.9.0.1"
    load(d)
    d = data(w1_rpc={"gpus": ["0,1"]})
    assert "rpc.gpus: item 0 must be a GPU index" in refused(d)


def test_public_bind_from_the_command_line_exits_2_with_one_line(tmp_path):
    p = tmp_path / "hosts.yaml"
    p.write_text(yaml.safe_dump(data()))
    r = subprocess.run([sys.executable, "-m", "invoke", "--search-root", str(ROOT), "provision", "--host", "w1",
                        "--inventory", str(p), "--set", "rpc.bind=0.0.0.0", "--check"],
                       cwd=tmp_path, text=True, capture_output=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = (r.stdout + r.stderr).strip().splitlines()
    assert len(lines) == 1 and "rpc.bind" in lines[0] and "'0.0.0.0'" in lines[0], lines


# -- the worker ---------------------------------------------------------------------------------


def worker_cfg(**rpc_over):
    d = data(w1_rpc=rpc_over)
    return load(d).hosts["w1"].cfg


def test_worker_unit_is_hardened_and_bound_to_the_private_address():
    cfg = worker_cfg(cache_max_gb=50)
    unit = rpc.render_worker_unit(cfg, "/opt/llama-rig/llama.cpp/current/bin/ggml-rpc-server")
    s = unit_settings(unit)
    d = dict(s)
    assert exec_words(d["ExecStart"]) == ["/opt/llama-rig/llama.cpp/current/bin/ggml-rpc-server", "-H",
                                          "10.9.0.2", "-p", "50052", "-c"]
    assert exec_words(d["ExecStartPre"]) == ["/usr/bin/python3", "/opt/llama-rig/bin/llama-rig-rpc-prune",
                                             "/var/lib/llama-rig/rpc-cache", "50000000000"]
    envs = [exec_words(v)[0] for k, v in s if k == "Environment"]
    assert "LLAMA_CACHE=/var/lib/llama-rig/rpc-cache" in envs and "CUDA_VISIBLE_DEVICES=0,1" in envs
    for k, v in (("User", "llama"), ("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                 ("ProtectHome", "yes"), ("CapabilityBoundingSet", ""), ("Restart", "always")):
        assert d[k] == v, k
    # no cache, all GPUs, no cap: no -c, no CUDA_VISIBLE_DEVICES, no pruner
    cfg = worker_cfg(cache=False, gpus=[])
    d2 = dict(unit_settings(rpc.render_worker_unit(cfg, "/x/rpc-server")))
    assert exec_words(d2["ExecStart"])[-1] == "50052" and "ExecStartPre" not in d2
    assert "CUDA_VISIBLE_DEVICES" not in rpc.render_worker_unit(cfg, "/x/rpc-server")


def test_nft_table_lets_only_the_main_hosts_in():
    cfg = worker_cfg()
    text = rpc.render_nft(cfg, ["10.9.0.1", "fd00::1", "10.9.0.1"])
    assert "table inet llama_rig_rpc\ndelete table inet llama_rig_rpc\n" in text  # atomic replace
    # the rpc port and the health responder's (port + 1)
    assert "ip saddr { 10.9.0.1 } tcp dport { 50052, 50053 } accept" in text
    assert "ip6 saddr { fd00::1 } tcp dport { 50052, 50053 } accept" in text
    assert text.rstrip().endswith("tcp dport { 50052, 50053 } counter drop\n\t}\n}")
    assert 'iif "lo"' not in text
    assert 'iif "lo" tcp dport { 50052, 50053 } accept' in rpc.render_nft(worker_cfg(bind="127.0.0.1"), [])


BUILD_OUT = """@@name
builds/b7000-abcdef1-12345678
@@info
{"commit": "abcdef1234567890abcdef1234567890abcdef12", "cmake_args": ["-G", "Ninja", "-DGGML_CUDA=ON",
 "-DCMAKE_CUDA_ARCHITECTURES=86", "-DGGML_RPC=ON"]}
@@bin
llama-server
ggml-rpc-server
"""


def test_worker_plan_from_a_bare_box_then_nothing():
    cfg = worker_cfg()
    obs = rpc_step.WorkerObserved(build=rpc.parse_build(BUILD_OUT), nft="/usr/sbin/nft")
    ch = rpc_step.plan_worker(cfg, obs, ["10.9.0.1"])
    kinds = [type(c).__name__ for c in ch]
    assert kinds == ["Run", "Run", "WriteFile", "Run", "WriteFile", "Run", "Run", "WriteFile", "WriteFile",
                     "Run", "Run", "Call"], [c.description for c in ch]
    health = next(c for c in ch if isinstance(c, WriteFile) and c.path == rpc.HEALTH_UNIT_PATH)
    assert exec_words(dict(unit_settings(health.content))["ExecStart"])[2:] == [
        "10.9.0.2", "50053", "llama-rpc-server.service", "/opt/llama-rig/llama.cpp/current", "50052"]
    hsrc = next(c for c in ch if isinstance(c, WriteFile) and c.path == rpc.health_path(cfg))
    unit = next(c for c in ch if isinstance(c, WriteFile) and c.path == rpc.UNIT_PATH)
    assert "/bin/ggml-rpc-server -H 10.9.0.2" in unit.content
    nft = next(c for c in ch if isinstance(c, WriteFile) and c.path == rpc.NFT_PATH)
    done = rpc_step.WorkerObserved(build=obs.build, nft="/usr/sbin/nft", nft_loaded=True, user_exists=True,
                                   active=True, enabled=True, cache_owner="llama", unit_now=unit.content,
                                   nft_now=nft.content, binary_now="/x/builds/b7000/bin/ggml-rpc-server",
                                   started={"binary": "/x/builds/b7000/bin/ggml-rpc-server"},
                                   health_now=hsrc.content, health_unit_now=health.content, health_active=True,
                                   health_enabled=True)
    assert rpc_step.plan_worker(cfg, done, ["10.9.0.1"]) == []
    # a new build behind `current`: restart; the table lost at a reboot: loaded again
    moved = rpc_step.WorkerObserved(**{**done.__dict__, "binary_now": "/x/builds/b7001/bin/ggml-rpc-server",
                                       "nft_loaded": False})
    ch = rpc_step.plan_worker(cfg, moved, ["10.9.0.1"])
    assert [c.description.split(" (")[0] for c in ch] == ["load nft table llama_rig_rpc",
                                                           "restart llama-rpc-server.service on 10.9.0.2:50052"]
    assert "build changed (b7000 -> b7001)" in ch[-1].description
    # no nftables: one warning, no table
    warned = []
    ch = rpc_step.plan_worker(cfg, rpc_step.WorkerObserved(**{**done.__dict__, "nft": None}), ["10.9.0.1"],
                              warn=warned.append)
    assert ch == [] and "nftables is not installed" in warned[0]


def test_worker_without_rpc_binary_is_refused():
    out = BUILD_OUT.replace("ggml-rpc-server\n", "")
    with pytest.raises(StepError, match="no ggml-rpc-server or rpc-server"):
        rpc_step.plan_worker(worker_cfg(), rpc_step.WorkerObserved(build=rpc.parse_build(out)), [])
    old = rpc.parse_build(BUILD_OUT.replace("ggml-rpc-server", "rpc-server"))
    assert old.rpc_binary == "rpc-server"


# -- across nodes -------------------------------------------------------------------------------


def test_builds_must_match_in_commit_and_flags_but_not_in_gpu_arch():
    main = rpc.parse_build(BUILD_OUT)
    same_other_arch = rpc.parse_build(BUILD_OUT.replace("ARCHITECTURES=86", "ARCHITECTURES=90"))
    assert rpc.compare("main", main, "w1", same_other_arch) is None
    skew = rpc.parse_build(BUILD_OUT.replace("abcdef1234567890abcdef1234567890abcdef12",
                                             "1234567890abcdef1234567890abcdef12345678"))
    msg = rpc.compare("main", main, "w1", skew)
    assert msg.startswith("version skew: worker w1 runs llama.cpp") and "commit 1234567890ab" in msg
    assert "main runs" in msg and "commit abcdef123456" in msg
    cpu = rpc.parse_build(BUILD_OUT.replace("GGML_CUDA=ON", "GGML_CUDA=OFF"))
    assert "build flags differ: worker w1 was built with -DGGML_CUDA=OFF" in rpc.compare("main", main, "w1", cpu)
    assert "has no llama.cpp build" in rpc.compare("main", main, "w1", rpc.Build())


def view(name, build="b1", inv_id="aaa"):
    return rpc_step.WorkerView(name, "10.9.0.2:50052", rpc.Build(build, "c" * 40), inv_id, "active")


def test_a_restarted_or_rebuilt_worker_owes_the_main_a_restart():
    rec = {"workers": {"w1": {"endpoint": "10.9.0.2:50052", "build": "b1", "invocation": "aaa"}}}
    assert rpc_step.changed_workers(rec, [view("w1")]) == []
    assert rpc_step.changed_workers(rec, [view("w1", inv_id="bbb")]) == ["worker w1: its rpc server restarted"]
    assert rpc_step.changed_workers(rec, [view("w1", build="b2", inv_id="bbb")]) == [
        "worker w1 build changed (b1 -> b2)"]
    assert rpc_step.changed_workers({}, [view("w1")]) == []  # never started with it: nothing owed
    cfg = load(data()).hosts["main"].cfg
    heps = ["10.9.0.2:50053", "[fd00::3]:50100"]
    ch = rpc_step.plan_main(cfg, [view("w1", inv_id="bbb")], rec, None, None, False, True, heps)
    owe = [c for c in ch if isinstance(c, Call)]
    assert len(owe) == 1 and owe[0].notify == ("llama-server.restart",)
    watch = next(c for c in ch if isinstance(c, WriteFile) and c.path == rpc.WATCH_UNIT_PATH)
    ex = exec_words(dict(unit_settings(watch.content))["ExecStart"])
    assert ex[2:6] == ["watch", rpc.WATCH_STATE, "llama-server.service", "/opt/llama-rig/llama.cpp/current"]
    assert ex[6:] == heps
    helper = next(c for c in ch if isinstance(c, WriteFile) and c.path == rpc.watch_path(cfg))
    same = rpc_step.plan_main(cfg, [view("w1")], rec, helper.content, watch.content, True, True, heps)
    assert same == []
    assert any(isinstance(c, Run) for c in rpc_step.plan_main(cfg, [view("w1")], rec, helper.content,
                                                              watch.content, False, True, heps))


FIT = """CUDA0 4000 500 300
CUDA1 4000 500 300
RPC0[10.9.0.2:50052] 9000 800 300
RPC1[10.9.0.2:50052] 9000 800 300
Host 10 0 200
"""


def test_remote_devices_checked_against_the_workers_free_memory():
    from provision.steps import vram_preflight
    devices = vram_preflight.parse_fit_output(FIT)
    assert [d for d, _ in rpc.remote_rows(devices)] == ["RPC0[10.9.0.2:50052]", "RPC1[10.9.0.2:50052]"]
    rem = [rpc.RemoteDevice("w1", "w1 GPU 0 (RTX 3090)", 24000), rpc.RemoteDevice("w1", "w1 GPU 1 (RTX 3090)", 10000)]
    rep = rpc.check_remote_fit(devices, rem, 1536)
    assert not rep.ok and len(rep.problems) == 1
    assert rep.problems[0].startswith("w1 GPU 1 (RTX 3090): needs 10100 MiB") and "only 10000 MiB" in rep.problems[0]
    rep = rpc.check_remote_fit(devices, [rpc.RemoteDevice("w1", "w1 CPU", None)] * 2, 1536)
    assert rep.ok and rep.rows[0][-1] == "w1 CPU"


def test_bench_and_tune_pass_the_workers_to_llama_bench():
    from provision.bench.flags import BenchFlags, bench_argv
    from provision.tune.batch import tune_argv
    d = data()
    d["hosts"]["main"]["server"] = {"tensor_split": [1, 1, 0.5, 0.9, 1]}
    cfg = load(d).hosts["main"].cfg
    f = BenchFlags.from_cfg(cfg)
    argv = bench_argv("/b/llama-bench", MODEL, f, depths=[0])
    assert argv[argv.index("--rpc") + 1] == "10.9.0.2:50052,[fd00::3]:50099"
    assert argv[argv.index("-ts") + 1] == "1/1/0.5/0.9/1"
    t = tune_argv("/b/llama-bench", MODEL, f.but(batch_size=4096, ubatch_size=1024), 4096, [512, 1024], 4096)
    assert t[t.index("--rpc") + 1] == "10.9.0.2:50052,[fd00::3]:50099"
    assert "--rpc" not in BenchFlags.from_cfg(load(data()).hosts["w1"].cfg).argv()


def test_health_responder_and_watcher_talk(tmp_path):
    """The worker's responder and the main's watcher, as processes on loopback: the responder says
    the (absent) rpc unit is not running; the watcher's probe and wait read that."""
    import socket as so
    with so.socket() as s0:
        s0.bind(("127.0.0.1", 0))
        port = s0.getsockname()[1]
    cur = tmp_path / "current"
    cur.symlink_to(tmp_path)
    srv = subprocess.Popen([sys.executable, str(ROOT / "provision/remote/rpc_health.py"), "127.0.0.1", str(port),
                            "llama-rig-test-absent.service", str(cur), "1"])
    try:
        ep = f"127.0.0.1:{port}"
        for _ in range(50):
            r = subprocess.run([sys.executable, str(ROOT / "provision/remote/rpc_watch.py"), "probe", ep],
                               capture_output=True, text=True, timeout=30)
            st = json.loads(r.stdout)[ep]
            if "no answer" not in st["error"]:
                break
            time.sleep(0.1)
        assert st["up"] is False and st["build"] == tmp_path.name and st["error"].startswith("rpc server ")
        r = subprocess.run([sys.executable, str(ROOT / "provision/remote/rpc_watch.py"), "wait", "1", ep,
                            "127.0.0.1:1"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 1 and "RPC workers not ready after 1s" in r.stderr and "127.0.0.1:1 (no answer" in r.stderr
    finally:
        srv.terminate()
        srv.wait(timeout=10)


def test_watcher_restarts_llama_server_when_a_worker_restarts_but_never_across_a_skew(tmp_path):
    """remote/rpc_watch.py's `watch` loop against a stand-in health responder and a stand-in
    systemctl (it logs its calls): an rpc server restart (new invocation id) -> one restart of
    llama-server; a worker on another commit -> no restart, `version skew` said."""
    import socket as so
    import threading
    reply = {"unit": "active", "listening": True, "build": "b1-aaaaaaa-11111111", "invocation": "i1"}
    srv = so.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    ep = f"127.0.0.1:{srv.getsockname()[1]}"

    def serve():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            c.sendall((json.dumps(reply) + "\n").encode())
            c.close()
    threading.Thread(target=serve, daemon=True).start()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls.log"
    (bindir / "systemctl").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n[ "$1" = is-active ] && echo active\nexit 0\n')
    (bindir / "systemctl").chmod(0o755)
    (tmp_path / "b1-aaaaaaa-22222222").mkdir()
    (tmp_path / "current").symlink_to("b1-aaaaaaa-22222222")
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
    p = subprocess.Popen([sys.executable, str(ROOT / "provision/remote/rpc_watch.py"), "watch",
                          str(tmp_path / "state.json"), "llama-server.service", str(tmp_path / "current"), ep],
                         env=env, stdout=subprocess.PIPE, text=True)

    def restarts() -> int:
        return calls.read_text().count("restart --no-block llama-server.service") if calls.exists() else 0
    try:
        time.sleep(4)
        assert restarts() == 0  # first sight: nothing to do
        st = json.loads((tmp_path / "state.json").read_text())
        assert st["workers"][ep]["up"] is True and st["workers"][ep]["build"] == "b1-aaaaaaa-11111111"
        reply["invocation"] = "i2"  # the worker's rpc server restarted
        for _ in range(40):
            if restarts():
                break
            time.sleep(0.25)
        assert restarts() == 1
        reply.update(invocation="i3", build="b2-bbbbbbb-11111111")  # restarted on another commit
        time.sleep(7)
        assert restarts() == 1
    finally:
        p.terminate()
        out = p.communicate(timeout=10)[0]
        srv.close()
    assert "restart (the rpc server of" in out and "not restarted" in out and "version skew" in out, out


def test_bench_stops_llama_server_on_an_rpc_topology():
    """A ggml-rpc-server serves one client at a time: llama-bench would wait behind llama-server."""
    from provision.bench.guard import decide_stop
    assert decide_stop("auto", 0, False, 3, True, rpc=True)[0] is True
    assert decide_stop("auto", 0, False, 3, True, rpc=False)[0] is False
    assert decide_stop("keep", 0, False, 3, True, rpc=True)[0] is False


def test_the_mains_lock_records_the_worker_builds():
    from provision import lock
    cfg = load(data()).hosts["main"].cfg
    state = {"llama": {"commit": "c" * 40, "current": "b1-ccccccc-11111111"},
             "rpc": {"workers": {"w1": {"endpoint": "10.9.0.2:50052", "build": "b1-ccccccc-22222222",
                                        "invocation": "x"}}}}
    doc = lock.build(name="main", address="10.9.0.1", groups=[], cfg=cfg, state=state)
    assert doc["lock"]["rpc"] == {"workers": {"w1": {"endpoint": "10.9.0.2:50052", "build": "b1-ccccccc-22222222",
                                                     "commit": "c" * 40}}}
    assert "rpc" not in lock.build(name="x", address="a", groups=[], cfg=cfg, state={"llama": {}})["lock"]


def test_cache_pruner_keeps_the_most_recently_used_under_the_cap(tmp_path):
    d = tmp_path / "rpc"
    d.mkdir()
    for i, name in enumerate(["old", "mid", "new"]):
        f = d / name
        f.write_bytes(b"x" * 1000)
        os.utime(f, (1000 + i, 1000 + i))
    r = subprocess.run([sys.executable, str(ROOT / "provision/remote/rpc_cache_prune.py"), str(tmp_path), "2000"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "2 files, 0.0 MB kept, 1 removed" in r.stdout, r.stdout
    assert sorted(p.name for p in d.iterdir()) == ["mid", "new"]


def test_one_run_of_main_and_workers_runs_the_workers_rpc_step_before_the_mains():
    """`provision --host main,w1,w2` on fresh boxes: the workers start first and the main's rpc
    step waits for theirs (provision/peers.py) -- also with --parallel 1, where waiting on a
    queued worker would deadlock: there the workers run first, whole."""
    import io
    import threading

    from provision import peers
    from provision.console import Console, Environment
    from provision.engine import RunOptions, Step, run
    from provision.target import Result, Target

    class Box(Target):
        def is_root(self):
            return True

        def _exec(self, command, **kw):
            return Result(command, 0, "", "")

        def _start(self, command, stdin, timeout):  # no run lock in check mode
            raise AssertionError("check mode takes no lock")

        def read_file(self, path, sudo=False):  # an empty box (no state file)
            return None

    events: list[str] = []
    mu = threading.Lock()

    class Build(Step):  # the workers' builds are slow; the main's is there already
        name = "llama"

        def plan(self, ctx):
            time.sleep(0.4 if ctx.host.name != "main" else 0)
            return []

    class Rpc(Step):  # the real step's first move on a main, then a record of when it got there
        name = "rpc"

        def plan(self, ctx):
            if ctx.host.rpc_workers and ctx.peers is not None:
                ctx.peers.wait_step([w.name for w in ctx.host.rpc_workers], self.name,
                                    lambda hosts: ctx.say(f"rpc: waiting for {', '.join(hosts)}"))
            with mu:
                events.append(ctx.host.name)
            return []

    i = load(data())
    hosts = [i.hosts["main"], i.hosts["w1"], i.hosts["w2"]]
    assert [hosts[k].name for k in peers.order(hosts, lambda h: [w.name for w in h.rpc_workers])] == \
        ["w1", "w2", "main"]
    for parallel in (4, 1):
        events.clear()
        out = io.StringIO()
        status, reports = run(hosts, [Build(), Rpc()], Console(Environment(out, out, False)),
                              RunOptions(check=True, parallel=parallel), lambda h: Box(h))
        assert int(status) == 0, out.getvalue()
        assert events[-1] == "main" and sorted(events) == ["main", "w1", "w2"], (parallel, events)
        assert [r.host for r in reports] == ["main", "w1", "w2"]  # the recap keeps the inventory's order
        if parallel == 4:
            assert "[main] rpc: waiting for w1, w2" in out.getvalue()

    # a main alone (its workers not in this run) does not wait
    events.clear()
    out = io.StringIO()
    status, _ = run([i.hosts["main"]], [Build(), Rpc()], Console(Environment(out, out, False)),
                    RunOptions(check=True), lambda h: Box(h))
    assert events == ["main"] and "waiting" not in out.getvalue()


def test_waiting_for_a_peer_ends_on_ctrl_c_and_when_the_peer_ends():
    from provision import keeper, peers

    p = peers.Peers(["main", "w1"])
    p.started("w1")
    t0 = time.monotonic()
    import threading
    threading.Timer(0.3, p.ended, args=("w1",)).start()  # w1's run ended (failed) before its rpc step
    assert p.wait_step(["w1"], "rpc") == ["w1"] and time.monotonic() - t0 < 5
    p2 = peers.Peers(["main", "w1"])
    p2.started("w1")
    token = keeper.RunToken()
    token.interrupt()
    keeper._local.token = token
    try:
        with pytest.raises(keeper.Interrupted):
            p2.wait_step(["w1"], "rpc")
    finally:
        del keeper._local.token
    assert p2.wait_step(["w9"], "rpc") == []  # not in this run: no wait
