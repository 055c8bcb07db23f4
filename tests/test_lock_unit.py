"""Lockfiles as data (build, dump, load, overrides, warnings, differences) and the engine around
them (hooks, one host's bug never hides the others, N of M hosts failed), without a rig."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml

from provision import __version__
from provision import inventory as inv
from provision import lock as L
from provision.app import App
from provision.console import Console, Environment
from provision.engine import RunOptions, Step, run
from provision.errors import ExitStatus, StepError, UsageError
from provision.facts.gpu import Gpu, GpuFacts
from provision.facts.host import HostFacts
from provision.target import Result, Target

COMMIT = "a" * 40
COMMIT2 = "b" * 40
MODEL_SHA = "c" * 40
ARGS = ["-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DGGML_CUDA=ON",
        "-DCMAKE_CUDA_ARCHITECTURES=86", "-DGGML_CUDA_FA_ALL_QUANTS=ON"]


def gpu(i: int, name: str = "NVIDIA GeForce RTX 3090", cc: str = "8.6", limit: float = 350.0,
        driver: str = "570.133.07") -> Gpu:
    return Gpu(i, f"GPU-{i}", name, f"00000000:0{i}:00.0", cc, 24576, 0, True, 20.0, limit, 350.0,
               100.0, 350.0, driver)


def gfacts(n: int = 6, **kw) -> GpuFacts:
    return GpuFacts(True, "", tuple(gpu(i, **kw) for i in range(n)), "12.8")


def hfacts(gcc: str | None = "12.2.0", nvcc: str | None = "12.8") -> HostFacts:
    return HostFacts("ubuntu", "24.04", "noble", "Ubuntu 24.04", "6.8.0", "x86_64", 32, "EPYC",
                     1 << 30, "/", 10 ** 12, "/usr/local/cuda/bin/nvcc" if nvcc else None, nvcc,
                     gcc, "3.28.3")


def cfg(**llama) -> dict:
    c = inv.defaults()
    c["llama_cpp"].update(llama)
    c["gpus"]["power_limit"] = 280
    return c


def state() -> dict:
    files = [{"path": "Q/m-00002-of-00002.gguf", "size": 20, "sha256": "2" * 64},
             {"path": "Q/m-00001-of-00002.gguf", "size": 10, "sha256": "1" * 64}]
    return {
        "owed": [],
        "llama": {"current": f"b7000-{COMMIT[:7]}-0123abcd", "commit": COMMIT, "build_number": 7000,
                  "fingerprint": "f" * 64, "cmake_args": list(ARGS), "gcc": "12.2.0", "nvcc": "12.8",
                  "archs": ["86"], "targets": ["llama-server", "llama-bench"], "ref": "master",
                  "repo": "https://github.com/ggml-org/llama.cpp", "previous": None, "builds": []},
        "model": {"repo": "unsloth/X-GGUF", "revision": "main", "include": "Q/*", "commit": MODEL_SHA,
                  "local_dir": "/m/unsloth__X-GGUF", "files": files,
                  "verified": {f["path"]: {"size": f["size"], "mtime_ns": 1, "sha256": f["sha256"]}
                               for f in files}},
    }


def doc(**kw) -> dict:
    args = dict(name="rig", address="10.0.0.5", groups=["site"], cfg=cfg(), state=state(),
                hf=hfacts(), gf=gfacts(), hashes={"llama-server.service": "9" * 64})
    args.update(kw)
    return L.build(**args)


# -- building and writing ------------------------------------------------------------------------


def test_lock_holds_no_hash_of_a_secret_file():
    """Lock files get committed: no sha256 of the env file or the API key file (a weak key could be
    guessed offline), even when the rig's reading offers one."""
    d = doc(hashes={"llama-server.service": "9" * 64, "llama-server.env": "e" * 64, "api-key": "a" * 64})
    text = L.dump(d)
    assert "e" * 64 not in text and "a" * 64 not in text
    assert set(d["lock"]["rendered"]) == {"llama-server.service", "llama-rig-gpu.service", "opencode.json"}

    class T:
        def run(self, *a, **k):
            raise AssertionError("no opencode user configured: nothing to look up")

    class C:
        cfg = {"opencode": {"enabled": False}}
        target = T()
    paths = L.rendered_paths(C())
    assert "/etc/llama-rig/llama-server.env" not in paths.values()
    assert "/etc/llama-rig/api-key" not in paths.values()



def test_build_records_everything_in_a_fixed_order():
    d = doc()
    assert list(d) == ["host", "lock"]
    assert d["host"] == {"name": "rig", "address": "10.0.0.5", "groups": ["site"]}
    lk = d["lock"]
    assert list(lk) == ["format", "llama_rig", "hardware", "llama_cpp", "model", "rendered", "power"]
    assert lk["llama_rig"] == __version__
    assert lk["hardware"] == {"gpu_model": "NVIDIA GeForce RTX 3090", "gpu_count": 6, "compute_caps": ["8.6"],
                              "driver": "570.133.07", "cuda": "12.8", "nvcc": "12.8", "gcc": "12.2.0",
                              "os": "ubuntu 24.04", "arch": "x86_64"}
    ll = lk["llama_cpp"]
    assert ll["commit"] == COMMIT and ll["build_number"] == 7000 and ll["cmake_args"] == ARGS
    assert ll["archs"] == ["86"] and ll["build"] == f"b7000-{COMMIT[:7]}-0123abcd"
    assert list(ll["options"]) == list(L.BUILD_OPTIONS)
    md = lk["model"]
    assert md["commit"] == MODEL_SHA
    assert [f["path"] for f in md["files"]] == ["Q/m-00001-of-00002.gguf", "Q/m-00002-of-00002.gguf"]
    assert md["files"][0] == {"path": "Q/m-00001-of-00002.gguf", "size": 10, "sha256": "1" * 64}
    assert lk["rendered"]["llama-server.service"] == "9" * 64 and lk["rendered"]["opencode.json"] is None
    assert lk["power"] == {"inventory": 280, "persistence": True, "limits_w": [350.0] * 6}


def test_unverified_file_is_marked():
    st = state()
    st["model"]["verified"].pop("Q/m-00002-of-00002.gguf")
    files = L.build(name="r", address="a", groups=[], cfg=cfg(), state=st)["lock"]["model"]["files"]
    assert files[1]["verified"] is False and "verified" not in files[0]


def test_empty_state_gives_nulls_not_errors():
    d = L.build(name="r", address="a", groups=[], cfg=cfg(), state={})
    assert d["lock"]["llama_cpp"] is None and d["lock"]["model"] is None and d["lock"]["power"] is None
    assert d["lock"]["hardware"]["gpu_count"] == 0


def test_dump_is_stable_human_readable_and_round_trips(tmp_path):
    d = doc()
    text = L.dump(d)
    assert text == L.dump(doc())  # no timestamps: same state, same bytes
    assert text.startswith("# llama-rig lockfile")
    assert "invoke provision --host OTHER --lock locks/rig.lock.yaml" in text
    # one cmake argument per line: a changed flag is a one-line diff
    assert "\n    - -DGGML_CUDA=ON\n" in text
    assert text.index("\nhost:\n") < text.index("\nlock:\n")
    p = tmp_path / "locks" / "rig.lock.yaml"
    assert L.write(d, p) is True
    mtime = p.stat().st_mtime_ns
    assert L.write(doc(), p) is False and p.stat().st_mtime_ns == mtime
    assert L.load(p) == yaml.safe_load(text)


def test_load_rejects_what_is_not_a_lock(tmp_path):
    with pytest.raises(UsageError, match="lock file not found"):
        L.load(tmp_path / "nope.yaml")
    (tmp_path / "x.yaml").write_text("hosts: {}\n")
    with pytest.raises(UsageError, match="not a llama-rig lock file"):
        L.load(tmp_path / "x.yaml")
    (tmp_path / "y.yaml").write_text("lock: {format: 99}\n")
    with pytest.raises(UsageError, match="format 99 is not supported"):
        L.load(tmp_path / "y.yaml")
    (tmp_path / "z.yaml").write_text("lock: [\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        L.load(tmp_path / "z.yaml")


# -- applying ------------------------------------------------------------------------------------


def test_overrides_pin_commit_flags_and_model_sha():
    o = L.overrides(doc())
    assert o["llama_cpp"]["ref"] == COMMIT and o["llama_cpp"]["repo"] == "https://github.com/ggml-org/llama.cpp"
    assert o["llama_cpp"]["cuda_architectures"] == ["86"]  # what the build used, not "auto"
    assert o["llama_cpp"]["cuda"] is True and o["llama_cpp"]["native"] is True
    assert o["model"] == {"repo": "unsloth/X-GGUF", "revision": MODEL_SHA, "include": "Q/*"}
    c = cfg(native=False, ref="master")
    L.apply_to_cfg(c, doc())
    assert c["llama_cpp"]["ref"] == COMMIT and c["llama_cpp"]["native"] is True
    assert c["model"]["revision"] == MODEL_SHA


def test_cpu_lock_keeps_auto_architectures():
    d = doc(cfg=cfg(cuda=False))
    assert L.overrides(d)["llama_cpp"]["cuda_architectures"] == "auto"


def test_apply_via_app_then_set_still_wins(tmp_path):
    p = tmp_path / "rig.lock.yaml"
    L.write(doc(), p)
    (tmp_path / "hosts.yaml").write_text(yaml.safe_dump({"hosts": {
        "rig": {"connection": {"address": "10.0.0.5"}, "lock": "rig.lock.yaml"},
        "rig2": {"connection": {"address": "10.0.0.6"}}}}))
    app = App(str(tmp_path / "hosts.yaml"), overrides=["llama_cpp.jobs=4", "model.include=Q/*"])
    hosts = app.hosts("rig,rig2")
    locks = app.apply_locks(hosts, None)
    assert set(locks) == {"rig"}  # only rig has a lock: key
    assert hosts[0].cfg["llama_cpp"]["ref"] == COMMIT and hosts[0].cfg["llama_cpp"]["jobs"] == 4
    assert hosts[1].cfg["llama_cpp"]["ref"] == "master"
    app2 = App(str(tmp_path / "hosts.yaml"))
    h2 = app2.hosts("rig2")
    assert set(app2.apply_locks(h2, str(p))) == {"rig2"}  # --lock applies to every host selected
    assert h2[0].cfg["model"]["revision"] == MODEL_SHA
    assert app.lock_dir() == tmp_path.resolve() / "locks"


def test_hardware_warnings_name_what_cannot_match():
    lk = doc()["lock"]
    assert L.hardware_warnings(lk, hfacts(), gfacts()) == []
    w = L.hardware_warnings(lk, hfacts(gcc="13.3.0"), gfacts(4, name="NVIDIA GeForce RTX 4090", cc="8.9",
                                                             driver="580.1"))
    assert "GPU model: the lock has NVIDIA GeForce RTX 3090, this box has NVIDIA GeForce RTX 4090" in w
    assert "GPU count: the lock has 6, this box has 4" in w
    assert "compute capability: the lock has 8.6, this box has 8.9" in w
    assert "NVIDIA driver: the lock has 570.133.07, this box has 580.1" in w
    assert "gcc: the lock has 12.2.0, this box has 13.3.0" in w
    assert w[-1].startswith("the build fingerprint will differ")
    # a fresh box without gcc/nvcc yet: the system step installs them, no warning
    assert L.hardware_warnings(lk, hfacts(gcc=None, nvcc=None), gfacts()) == []
    # a CPU lock ignores nvcc
    cpu = doc(cfg=cfg(cuda=False), hf=hfacts(nvcc=None))["lock"]
    cpu["hardware"]["nvcc"] = None
    assert L.hardware_warnings(cpu, hfacts(nvcc="13.0"), gfacts()) == []


# -- comparing -----------------------------------------------------------------------------------


def test_differences_are_one_line_each_and_ignore_the_host_block():
    a, b = doc(), doc(name="rig2", address="10.0.0.6")
    assert a != b and L.differences(a["lock"], b["lock"]) == []
    st = state()
    st["llama"]["commit"] = COMMIT2
    st["llama"]["cmake_args"] = [x for x in ARGS if x != "-DGGML_NATIVE=OFF"] + ["-DGGML_NATIVE=ON"]
    st["model"]["files"][1]["sha256"] = "e" * 64
    st["model"]["verified"]["Q/m-00001-of-00002.gguf"]["sha256"] = "e" * 64
    c = doc(state=st, hashes={})
    d = L.differences(a["lock"], c["lock"], names=("rig", "rig2"))
    assert f"llama_cpp.commit: rig {COMMIT} ≠ rig2 {COMMIT2}" in d
    assert "llama_cpp.cmake_args: only in rig: -DGGML_NATIVE=OFF; only in rig2: -DGGML_NATIVE=ON" in d
    assert f"model.files[Q/m-00001-of-00002.gguf].sha256: rig {'1' * 64} ≠ rig2 {'e' * 64}" in d
    assert f"rendered.llama-server.service: rig {'9' * 64} ≠ rig2 null" in d
    assert len(d) == 4


def test_enforced_keys_follow_the_steps_that_ran():
    lk = doc()["lock"]
    assert L.enforced(lk, ["facts"]) == []
    e = L.enforced(lk, ["llama", "model"])
    assert "llama_cpp.commit" in e and "llama_cpp.cmake_args" in e and "model.files" in e
    assert not any(k.startswith(("hardware", "rendered", "power")) for k in e)


def test_show_differences(tmp_path):
    out = io.StringIO()
    con = Console(Environment(out, out, False))
    assert L.show_differences(con, doc(), doc(name="x"), "a", "b") == []
    assert "a vs b: no differences" in out.getvalue()
    st = state()
    st["llama"]["build_number"] = 7001
    assert len(L.show_differences(con, doc(), doc(state=st), "a", "b")) == 1
    assert "a vs b: 1 difference\n  llama_cpp.build_number: a 7000 ≠ b 7001" in out.getvalue()


def test_lock_diff_of_two_files_via_app(tmp_path):
    (tmp_path / "hosts.yaml").write_text(yaml.safe_dump({"hosts": {"rig": {"connection": {"address": "h"}}}}))
    L.write(doc(), tmp_path / "a.lock.yaml")
    st = state()
    st["model"]["commit"] = "d" * 40
    L.write(doc(state=st), tmp_path / "b.lock.yaml")
    out = io.StringIO()
    app = App(str(tmp_path / "hosts.yaml"), env=Environment(out, out, False))
    assert app.lock_diff(str(tmp_path / "a.lock.yaml"), str(tmp_path / "a.lock.yaml")) == ExitStatus.OK
    assert app.lock_diff(str(tmp_path / "a.lock.yaml"), str(tmp_path / "b.lock.yaml")) == ExitStatus.FAILED
    assert f"model.commit: {tmp_path / 'a.lock.yaml'} {MODEL_SHA} ≠ {tmp_path / 'b.lock.yaml'} {'d' * 40}" in out.getvalue()
    assert app.lock_show(str(tmp_path / "b.lock.yaml")) == ExitStatus.OK
    assert "commit: " + "d" * 40 in out.getvalue()


# -- provisioning with an in-memory target ---------------------------------------------------------


class MemTarget(Target):
    """Answers the facts commands from canned output, keeps files in a dict, counts commands."""

    boxes: dict[str, dict] = {}

    def __init__(self, host):
        super().__init__(host)
        self.user = "root"
        self.files = MemTarget.boxes.setdefault(host.name, {})

    def is_root(self):
        return True

    def _exec(self, command, *, timeout, stdin, on_stdout, on_stderr):
        if "@@os" in command:
            return Result(command, 0, "@@os\nID=debian\nVERSION_ID=\"12\"\n@@gcc\n12.2.0\n", "")
        if "nvidia-smi" in command:
            return Result(command, 0, "@@absent\n", "")
        if command.startswith("sha256sum"):
            return Result(command, 1, "", "no such file")
        return Result(command, 0, "", "")

    def _start(self, command, stdin, timeout):
        from tests.test_engine import MemHeld
        return MemHeld(self.files)

    def read_file(self, path, sudo=False):
        return self.files.get(path)

    def write_file(self, path, content, **kw):
        self.files[path] = content


class Boom(Step):
    name = "boom"

    def plan(self, ctx):
        if ctx.host.name == "bad":
            raise KeyError("a bug in a step")
        if ctx.host.name == "failing":
            raise StepError("this host's step failed")
        ctx.state.set("llama", state()["llama"])
        return []


def _inv(tmp_path, *names) -> Path:
    p = tmp_path / "hosts.yaml"
    p.write_text(yaml.safe_dump({"hosts": {n: {"connection": {"address": f"{n}.example"}} for n in names}}))
    return p


def test_provision_writes_lock_after_success_only(tmp_path):
    MemTarget.boxes.clear()
    out = io.StringIO()
    app = App(str(_inv(tmp_path, "good", "failing")), env=Environment(out, out, False), target_factory=MemTarget)
    rc = app.provision("good,failing", steps=[Boom()])
    text = out.getvalue()
    assert rc == ExitStatus.FAILED, text
    assert (tmp_path / "locks" / "good.lock.yaml").exists()
    assert not (tmp_path / "locks" / "failing.lock.yaml").exists()
    assert "[good] lock: wrote " in text
    assert "1 of 2 hosts failed" in text
    assert L.load(tmp_path / "locks" / "good.lock.yaml")["lock"]["llama_cpp"]["commit"] == COMMIT
    # again: nothing rewritten; --check never writes
    out.truncate(0)
    assert app.provision("good", steps=[Boom()]) == ExitStatus.OK
    assert "lock: " in out.getvalue() and "unchanged" in out.getvalue()
    (tmp_path / "locks" / "good.lock.yaml").unlink()
    assert app.provision("good", steps=[Boom()], check=True) == ExitStatus.OK
    assert not (tmp_path / "locks" / "good.lock.yaml").exists()


def test_lock_warnings_come_before_the_steps_and_mismatch_fails(tmp_path):
    MemTarget.boxes.clear()
    p = tmp_path / "x.lock.yaml"
    d = doc()
    d["lock"]["model"] = None  # (the model pin is tested below)
    L.write(d, p)  # a 6-GPU CUDA rig; the MemTarget box has no GPU
    out = io.StringIO()
    app = App(str(_inv(tmp_path, "good")), env=Environment(out, out, False), target_factory=MemTarget)

    class Say(Step):
        name = "say"

        def plan(self, ctx):
            ctx.say("say: the first step runs")
            return []
    rc = app.provision("good", steps=[Say()], lock=str(p))
    text = out.getvalue()
    assert "warning: [good] lock " + str(p) + ": cannot match: GPU count: the lock has 6, this box has 0" in text
    assert text.index("cannot match") < text.index("say: the first step runs")
    assert rc == ExitStatus.OK, text  # only `say` ran: nothing of llama/model enforced
    written = (tmp_path / "locks" / "good.lock.yaml").read_text()
    assert L.load(tmp_path / "locks" / "good.lock.yaml")["lock"]["llama_cpp"] is None
    out.truncate(0)

    class FakeLlama(Step):
        name = "llama"

        def plan(self, ctx):
            st = state()["llama"]
            st["commit"] = COMMIT2
            ctx.state.set("llama", st)
            return []
    rc = app.provision("good", steps=[FakeLlama()], lock=str(p))
    text = out.getvalue()
    assert rc == ExitStatus.FAILED, text
    assert f"lockfile: FAILED: the rig does not match the lock {p}: llama_cpp.commit: lock {COMMIT}" in text
    assert (tmp_path / "locks" / "good.lock.yaml").read_text() == written  # not rewritten


def test_a_bug_on_one_host_never_hides_the_others(tmp_path):
    MemTarget.boxes.clear()
    out = io.StringIO()
    hosts = inv.load(_inv(tmp_path, "bad", "good", "failing")).select("bad,good,failing")
    status, reports = run(hosts, [Boom()], Console(Environment(out, out, False)), RunOptions(parallel=3),
                          MemTarget)
    text = out.getvalue()
    assert [r.host for r in reports] == ["bad", "good", "failing"]
    assert status == ExitStatus.FAILED
    assert reports[0].failed and "KeyError" in reports[0].results[0].message
    assert not reports[1].failed and reports[2].failed
    assert "[bad] FAILED: internal error: KeyError" in text
    assert "2 of 3 hosts failed" in text
    for name in ("bad", "good", "failing"):
        assert any(ln.startswith(name + " ") for ln in text.splitlines()), text


def test_sha256_many_is_one_command_and_absent_is_none():
    class T:
        def __init__(self):
            self.cmds = []

        def run(self, cmd, **kw):
            self.cmds.append(cmd)
            return Result(cmd, 1, f"{'1' * 64}  /etc/a.service\n{'2' * 64}  /etc/b env\n", "")

    class C:
        target = T()
    got = L.sha256_many(C, {"a": "/etc/a.service", "b": "/etc/b env", "c": "/nope"})
    assert got == {"a": "1" * 64, "b": "2" * 64, "c": None}
    assert len(C.target.cmds) == 1 and "'/etc/b env'" in C.target.cmds[0]


def test_model_pin_checks_the_hub_then_hands_the_lock_manifest_to_the_model_step(tmp_path, monkeypatch):
    from provision.engine import Context
    from provision.steps import model as M
    MemTarget.boxes.clear()
    host = inv.load(_inv(tmp_path, "fresh")).hosts["fresh"]
    lk = doc()["lock"]
    L.apply_to_cfg(host.cfg, {"lock": lk})
    ctx = Context(host, MemTarget(host), Console(Environment(io.StringIO(), io.StringIO(), False)))
    hub_files = [dict(f) for f in lk["model"]["files"]]
    monkeypatch.setattr(M, "resolve", lambda cfg, token, api=None: {"files": hub_files})
    L.pin_model(ctx, lk["model"], "x.lock.yaml")
    man = ctx.facts["model.manifest"]
    assert man["commit"] == MODEL_SHA and man["revision"] == MODEL_SHA
    assert {f["path"]: f["sha256"] for f in man["files"]} == {f["path"]: f["sha256"] for f in lk["model"]["files"]}
    # the hub has other bytes for that commit: refused before any download
    hub_files[0]["sha256"] = "e" * 64
    with pytest.raises(StepError, match="the hub's files for that commit differ from the lock x.lock.yaml"):
        L.pin_model(ctx, lk["model"], "x.lock.yaml")
    # pinned on the rig already (state): no hub call, compared with the pin
    monkeypatch.setattr(M, "resolve", lambda *a, **k: pytest.fail("the hub was asked"))
    ctx.state.set("model", dict(state()["model"]))
    L.pin_model(ctx, lk["model"], "x.lock.yaml")
    other = dict(state()["model"])
    other["files"] = [dict(f, sha256="f" * 64) for f in other["files"]]
    ctx.state.set("model", other)
    with pytest.raises(StepError, match="the files pinned on this rig for that commit differ"):
        L.pin_model(ctx, lk["model"], "x.lock.yaml")
