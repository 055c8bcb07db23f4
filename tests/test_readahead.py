"""provision/readahead.py + provision/remote/rig_read.py: what a run reads from the rig's files in
ONE round trip, dropped as soon as the run changes something."""
from __future__ import annotations

import hashlib
import io
import json
import subprocess

import pytest

from provision import inventory as inv
from provision import readahead as ra
from provision import remote
from provision.console import Console, Environment
from provision.engine import Context, RunOptions, Step, WriteFile, run
from provision.errors import ExitStatus
from provision.target import LocalTarget


def rig_read(arg: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", remote.command("rig_read.py", json.dumps(arg))],
                          capture_output=True, text=True, timeout=60)


def test_rig_read_on_its_own(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.bin"
    a.write_text("héllo\nworld\n")
    b.write_bytes(b"\xff\x00 not utf-8")
    r = rig_read({"read": [str(a), str(b), str(tmp_path / "gone"), str(tmp_path)],
                  "sha256": [str(b), str(tmp_path / "gone")], "enabled": ["no-such-unit.service"]})
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["read"] == {str(a): "héllo\nworld\n", str(b): "\ufffd\x00 not utf-8",
                         str(tmp_path / "gone"): None, str(tmp_path): None}
    assert d["sha256"] == {str(b): hashlib.sha256(b.read_bytes()).hexdigest(), str(tmp_path / "gone"): None}
    import os
    assert d["systemd"] is os.path.isdir("/run/systemd/system")
    assert d["enabled"]["no-such-unit.service"] in ("", "not-found", "disabled")
    bad = subprocess.run(["sh", "-c", remote.command("rig_read.py")], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage:" in bad.stderr


def _ctx(tmp_path) -> Context:
    h = inv.from_data({"hosts": {"box": {"connection": {"type": "local"},
                                         "paths": {"state_dir": str(tmp_path / "state")}}}}).hosts["box"]
    out = io.StringIO()
    return Context(h, LocalTarget(h), Console(Environment(out, out, False)))


@pytest.fixture
def declared(tmp_path, monkeypatch):
    """Two files a module declares it reads (and the real declarations of the steps)."""
    f1, f2 = tmp_path / "one.conf", tmp_path / "two.conf"
    f1.write_text("1\n")
    f2.write_text("2\n")
    monkeypatch.setattr(ra, "_WANTS", list(ra._WANTS))
    ra.wants(lambda ctx: ra.Want(read=[str(f1)], sha256=[str(f2)]))
    return f1, f2


def test_everything_declared_comes_in_one_command(tmp_path, declared):
    f1, f2 = declared
    ctx = _ctx(tmp_path)
    assert ra.read_file(ctx, str(f1)) == "1\n"
    n = ctx.target.commands_run
    assert n == 1
    assert ra.sha256(ctx, [str(f2)]) == {str(f2): hashlib.sha256(b"2\n").hexdigest()}
    assert ra.read_file(ctx, str(f1)) == "1\n" and ctx.target.commands_run == n  # no new command
    # something nobody declared: one more command, then kept as well
    other = tmp_path / "other"
    assert ra.read_file(ctx, str(other)) is None and ctx.target.commands_run == n + 1
    assert ra.read_file(ctx, str(other)) is None and ctx.target.commands_run == n + 1
    # after forget() (the engine applies a change) the rig is read again
    f1.write_text("changed\n")
    assert ra.read_file(ctx, str(f1)) == "1\n"
    ra.forget(ctx)
    assert ra.read_file(ctx, str(f1)) == "changed\n" and ctx.target.commands_run == n + 2


def test_a_target_with_its_own_files_is_asked_item_by_item(tmp_path):
    class Mem(LocalTarget):
        def read_file(self, path, sudo=False):
            return {"/etc/x": "x\n"}.get(path)

    ctx = _ctx(tmp_path)
    ctx.target = Mem(ctx.host)
    assert ra.read_file(ctx, "/etc/x") == "x\n" and ra.read_file(ctx, "/etc/y") is None
    assert ctx.target.commands_run == 0  # nothing declared was read ahead, nothing ran


def test_the_engine_reads_ahead_once_and_forgets_when_it_changes_something(tmp_path, declared):
    f1, _ = declared
    target_file = tmp_path / "app.conf"
    reads: list[str | None] = []

    class Conf(Step):
        name = "conf"

        def plan(self, ctx):
            cur = ra.read_file(ctx, str(target_file))
            reads.append(cur)
            return [] if cur == "v\n" else [WriteFile("app.conf", path=str(target_file), content="v\n",
                                                      before=cur, notify=("x.restart",))]

    class Check(Step):
        name = "check"

        def plan(self, ctx):
            reads.append(ra.read_file(ctx, str(target_file)))  # after conf changed it: read again
            return []

        def handlers(self):
            return {"x.restart": lambda ctx: reads.append("restarted")}

    h = _ctx(tmp_path).host
    out = io.StringIO()
    con = Console(Environment(out, out, False))
    status, reports = run([h], [Conf(), Check()], con, RunOptions(), LocalTarget)
    assert status == ExitStatus.OK and reports[0].changed == 2, out.getvalue()
    assert reads == [None, "v\n", "restarted"]
    reads.clear()
    status, reports = run([h], [Conf(), Check()], con, RunOptions(), LocalTarget)
    assert status == ExitStatus.OK and reports[0].changed == 0
    assert reads == ["v\n", "v\n"]
    # the no-op: the run lock, then ONE read of the app file, the state file and f1 together
    assert reports[0].commands == 2, out.getvalue()


def test_facts_gpu_and_the_read_ahead_in_one_command(tmp_path, declared, monkeypatch):
    """The facts step's round trip: host facts, the GPU query (beside them) and the read-ahead."""
    import sys

    from provision.facts import host as hostfacts
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    smi = __import__("pathlib").Path(__file__).resolve().parent / "rigs" / "fake_nvidia_smi.py"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} {smi} \"$@\"\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("FAKE_NVIDIA_SMI_STATE", str(tmp_path / "smi-state"))
    f1, _ = declared
    ctx = _ctx(tmp_path)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "state.json").write_text('{"owed": ["x.restart"]}')
    hf, gf = hostfacts.host_and_gpu(ctx, read_ahead=True)
    assert ctx.target.commands_run == 1
    assert hf.kernel and hf.cpus > 0 and hf.mem_total_kib > 0
    assert gf.available and len(gf.gpus) >= 1 and gf.cuda_version and gf.nvidia_smi == str(fake)
    assert ra.read_file(ctx, str(f1)) == "1\n" and ctx.state.owed == ["x.restart"]
    assert ctx.target.commands_run == 1  # all of it came with the facts
    from provision.steps import system
    assert system.dpkg_interrupted(ctx) == "" and ctx.target.commands_run == 1  # dpkg's state too
    # the GPU query alone (after a change) still parses the same way
    assert [g.uuid for g in hostfacts.gpu_facts.gather(ctx.target).gpus] == [g.uuid for g in gf.gpus]
