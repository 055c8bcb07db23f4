"""The plan/apply engine with an in-memory Target (and once with LocalTarget under a temp dir)."""
from __future__ import annotations

import io
import json
import os
import re
import stat

import pytest

from provision import inventory as inv
from provision import secrets
from provision.app import App
from provision.console import Console, Environment
from provision.engine import (Call, Context, RunOptions, Run, Step, WriteFile, file_diff, run,
                              select_steps)
from provision.errors import ConnectError, ExitStatus, StepError, UsageError
from provision.target import Held, LocalTarget, Result, Target

STATE = "/var/lib/llama-rig/state.json"
CONF = "/etc/svc.conf"


class MemHeld(Held):
    """The run lock of an in-memory box: a key in its files dict while held."""

    KEY = "<run.lock>"

    def __init__(self, files: dict):
        self.files = files
        self.mine = self.KEY not in files
        if self.mine:
            files[self.KEY] = "held"
        self.first_line = "locked" if self.mine else "busy root@elsewhere pid 1 since then: provision"

    def release(self) -> None:
        if self.mine:
            self.files.pop(self.KEY, None)
            self.mine = False


class FakeTarget(Target):
    """A box in memory: `files` persists between runs when the same dict is passed again."""

    def __init__(self, host, files: dict | None = None, fail: tuple[str, ...] = ()):
        super().__init__(host)
        self.user = "root"
        self.files = {} if files is None else files
        self.fail = fail
        self.log: list[str] = []
        self.holds: list[str] = []  # commands started with hold() (the run lock)
        self.writes: list[str] = []
        self.closed = False

    def is_root(self) -> bool:
        return True

    def _exec(self, command, *, timeout, stdin, on_stdout, on_stderr) -> Result:
        self.log.append(command)
        for pat in self.fail:
            if pat in command:
                return Result(command, 1, "", f"E: {pat} went wrong")
        return Result(command, 0, "", "")

    def _start(self, command, stdin, timeout):
        self.holds.append(command)
        return MemHeld(self.files)

    def read_file(self, path, sudo=False):
        return self.files.get(path)

    def exists(self, path, sudo=False):
        return path in self.files

    def write_file(self, path, content, **kw):
        self.writes.append(path)
        self.files[path] = content

    def close(self):
        self.closed = True


class ConfStep(Step):
    """Writes CONF = cfg server.alias; notifies svc.restart."""
    name = "conf"

    def plan(self, ctx):
        want = f"alias={ctx.cfg['server']['alias']}\n"
        cur = ctx.target.read_file(CONF)
        if cur == want:
            return []
        return [WriteFile(f"write {CONF}", path=CONF, content=want, before=cur,
                          notify=("svc.restart",))]


class PkgStep(Step):
    """Installs a 'package' (a marker file) with a Run + a Call."""
    name = "pkgs"

    def plan(self, ctx):
        if ctx.target.exists("/pkg-installed"):
            return []
        return [Run("install pkg", commands=["apt-get install -y pkg"]),
                Call("mark pkg installed", fn=lambda c: c.target.write_file("/pkg-installed", "1"),
                     data={"pkg": "pkg"})]


class BoomStep(Step):
    """Fails while /broken exists on the box (a command that exits 1)."""
    name = "boom"

    def plan(self, ctx):
        if ctx.target.exists("/broken"):
            return [Run("run the broken thing", commands=["broken-thing --now"])]
        return []


class SvcStep(Step):
    name = "svc"

    def __init__(self):
        self.restarts = 0

    def plan(self, ctx):
        return []

    def handlers(self):
        def restart(ctx):
            self.restarts += 1
            ctx.target.run("systemctl restart svc", sudo=True)
        return {"svc.restart": restart}


def host(**sections):
    return inv.from_data({"hosts": {"box": {"connection": {"type": "local"}, **sections}}}).hosts["box"]


def console():
    out, err = io.StringIO(), io.StringIO()
    return Console(Environment(out, err, isatty=False)), out, err


def go(steps, files, opts=None, fail=("broken-thing",), h=None):
    con, out, err = console()
    t = FakeTarget(h or host(), files, fail)
    status, reports = run([h or host()], steps, con, opts or RunOptions(), lambda _h: t)
    return status, reports[0], t, out.getvalue(), err.getvalue()


def recap_row(out: str, hostname="box") -> dict:
    lines = out.splitlines()
    i = next(i for i, l in enumerate(lines) if l.startswith("recap"))
    cols = lines[i + 1].split()
    row = next(l for l in lines[i + 2:] if l.split()[:1] == [hostname]).split()
    return dict(zip(cols, row))


# ----------------------------------------------------------------------------- check mode

def test_check_mode_applies_nothing_and_writes_no_state():
    files: dict = {}
    status, rep, t, out, err = go([ConfStep(), PkgStep(), SvcStep()], files, RunOptions(check=True))
    assert status == ExitStatus.OK
    assert files == {}  # no CONF, no marker, no state.json
    assert t.writes == [] and t.log == []  # nothing ran, nothing was written
    assert f"[box] conf: would change: write {CONF}" in out
    assert "[box] pkgs: would change: install pkg" in out
    assert "[box] pkgs: would change (2 changes)" in out
    assert "[box] handler: would run svc.restart (notified)" in out
    assert "recap (check mode: nothing was changed)" in out
    assert recap_row(out) == {"host": "box", "result": "ok", "ok": "1", "changed": "2",
                              "failed": "0", "skipped": "0", "time": recap_row(out)["time"]}
    assert err == ""


def test_a_run_that_changes_holds_the_run_lock_and_a_second_is_refused():
    files: dict = {}
    seen = []

    class Peek(Step):
        name = "peek"

        def plan(self, ctx):
            seen.append(files.get(MemHeld.KEY))
            return []
    status, rep, t, out, err = go([Peek()], files)
    assert status == ExitStatus.OK and seen == ["held"]  # held while the steps ran
    assert MemHeld.KEY not in files  # and released after
    assert len(t.holds) == 1 and "llama-rig-lock /var/lib/llama-rig " in t.holds[0]
    # another run holds it: nothing is planned or changed, one clear line, exit 1
    files[MemHeld.KEY] = "held"
    status, rep, t, out, err = go([ConfStep(), PkgStep()], files)
    assert status == ExitStatus.FAILED
    assert [(r.step, r.status) for r in rep.results] == [("run lock", "failed"), ("conf", "skipped"),
                                                         ("pkgs", "skipped")]
    assert ("[box] run lock: FAILED: another llama-rig run is changing this host (root@elsewhere pid 1 "
            "since then: provision); nothing was changed — wait for it to finish "
            "(/var/lib/llama-rig/run.lock)") in err
    assert t.writes == [] and CONF not in files and files[MemHeld.KEY] == "held"
    # --check changes nothing and takes no lock: it still shows the plan
    status, rep, t, out, err = go([ConfStep()], files, RunOptions(check=True))
    assert status == ExitStatus.OK and t.holds == []
    assert rep.results[0].status == "changed"


def test_apply_then_second_run_no_change():
    files: dict = {}
    svc = SvcStep()
    status, rep, t, out, _ = go([ConfStep(), PkgStep(), svc], files)
    assert status == ExitStatus.OK
    assert files[CONF] == "alias=Qwen3.5-122B-A10B-UD-Q6_K_XL\n" and files["/pkg-installed"] == "1"
    assert t.log == ["apt-get install -y pkg", "systemctl restart svc"]
    assert svc.restarts == 1
    assert json.loads(files[STATE]) == {"owed": []}
    assert [(r.step, r.status) for r in rep.results] == [
        ("conf", "changed"), ("pkgs", "changed"), ("svc", "ok"), ("handler svc.restart", "changed")]
    assert "[box] handler: running svc.restart" in out
    # second run: nothing to do
    status, rep, t, out, _ = go([ConfStep(), PkgStep(), svc], files)
    assert status == ExitStatus.OK and rep.changed == 0 and t.log == [] and t.writes == []
    assert svc.restarts == 1
    assert recap_row(out)["changed"] == "0" and recap_row(out)["ok"] == "3"
    assert "[box] conf: ok (no change)" in out


# ----------------------------------------------------------------------------- recap

def test_recap_changed_ok_failed_skipped():
    files = {"/broken": "", "/pkg-installed": "1"}
    status, rep, t, out, err = go([PkgStep(), ConfStep(), BoomStep(), SvcStep()], files)
    assert status == ExitStatus.FAILED == 1
    assert [(r.step, r.status) for r in rep.results] == [
        ("pkgs", "ok"), ("conf", "changed"), ("boom", "failed"), ("svc", "skipped")]
    assert rep.results[3].message == "an earlier step failed"
    assert rep.results[2].message == (
        "box: command failed (exit 1): broken-thing --now: E: broken-thing went wrong")
    r = recap_row(out)
    assert (r["result"], r["ok"], r["changed"], r["failed"], r["skipped"]) == ("FAILED", "1", "1", "1", "1")
    assert "1 of 1 host failed" in out
    assert err.splitlines() == [
        "[box] boom: FAILED: box: command failed (exit 1): broken-thing --now: E: broken-thing went wrong"]
    assert t.closed


def test_unreachable_host():
    con, out, err = console()

    def refuse(h):
        raise ConnectError("box (root@10.9.9.9:22): Connection refused")
    status, reports = run([host()], [ConfStep()], con, RunOptions(), refuse)
    assert status == ExitStatus.UNREACHABLE == 3
    assert reports[0].unreachable == "box (root@10.9.9.9:22): Connection refused"
    assert err.getvalue() == "[box] UNREACHABLE: box (root@10.9.9.9:22): Connection refused\n"
    assert recap_row(out.getvalue())["result"] == "UNREACHABLE"


def test_step_error_in_plan_is_a_failed_step():
    class Refuses(Step):
        name = "refuses"

        def plan(self, ctx):
            raise StepError("the NVIDIA driver does not answer")
    status, rep, t, out, err = go([Refuses(), ConfStep()], {})
    assert status == ExitStatus.FAILED
    assert [r.status for r in rep.results] == ["failed", "skipped"]
    assert err == "[box] refuses: FAILED: the NVIDIA driver does not answer\n"


# ----------------------------------------------------------------------------- --only / --skip

def test_only_and_skip():
    files: dict = {}
    status, rep, t, out, _ = go([ConfStep(), PkgStep(), SvcStep()], files, RunOptions(only=["pkgs"]))
    assert [(r.step, r.status) for r in rep.results] == [
        ("conf", "skipped"), ("pkgs", "changed"), ("svc", "skipped")]
    assert rep.results[0].message == "not selected"
    assert CONF not in files and "/pkg-installed" in files
    files = {}
    status, rep, t, out, _ = go([ConfStep(), PkgStep(), SvcStep()], files, RunOptions(skip=["pkgs", "svc"]))
    assert [(r.step, r.status) for r in rep.results] == [
        ("conf", "changed"), ("pkgs", "skipped"), ("svc", "skipped")]
    # the restart is owed; the svc step was skipped, so its handler does not run and stays owed
    assert json.loads(files[STATE]) == {"owed": ["svc.restart"]}
    assert "[box] handler: svc.restart stays owed (its step did not run)" in out


@pytest.mark.parametrize("opts,message", [
    (RunOptions(only=["svcs"]), "command line: --only: unknown step 'svcs' (did you mean 'svc'?); steps are: conf, pkgs, svc"),
    (RunOptions(skip=["conf", "pkg"]), "command line: --skip: unknown step 'pkg' (did you mean 'pkgs'?); steps are: conf, pkgs, svc"),
    (RunOptions(only=["zzz"]), "command line: --only: unknown step 'zzz'; steps are: conf, pkgs, svc"),
])
def test_unknown_step_names(opts, message):
    with pytest.raises(UsageError) as ei:
        select_steps([ConfStep(), PkgStep(), SvcStep()], opts.only, opts.skip)
    assert str(ei.value) == message
    # and through run(): before any host is contacted
    called = []
    with pytest.raises(UsageError):
        run([host()], [ConfStep(), PkgStep(), SvcStep()], console()[0], opts,
            lambda h: called.append(h))
    assert called == []


def test_unknown_step_via_app_exit_2(tmp_path):
    p = tmp_path / "hosts.yaml"
    p.write_text("hosts:\n  box:\n    connection: {type: local}\n")
    out, err = io.StringIO(), io.StringIO()
    called = []
    app = App(str(p), env=Environment(out, err, isatty=False), target_factory=lambda h: called.append(h))
    assert app.provision("box", skip="factz") == ExitStatus.BAD_INPUT
    assert err.getvalue().startswith("command line: --skip: unknown step 'factz' (did you mean 'facts'?)")
    assert len(err.getvalue().splitlines()) == 1 and called == []


# ----------------------------------------------------------------------------- handlers

def test_owed_handler_persisted_before_failure_and_run_next_time():
    files = {"/broken": ""}
    svc = SvcStep()
    status, rep, t, out, _ = go([ConfStep(), BoomStep(), svc], files)
    assert status == ExitStatus.FAILED
    assert json.loads(files[STATE]) == {"owed": ["svc.restart"]}  # saved BEFORE the conf write
    assert t.writes.index(STATE) < t.writes.index(CONF)
    assert svc.restarts == 0 and "systemctl restart svc" not in t.log
    # the operator fixes the box; the conf is already right, so nothing notifies this time ...
    del files["/broken"]
    status, rep, t, out, _ = go([ConfStep(), BoomStep(), svc], files)
    assert status == ExitStatus.OK
    assert [(r.step, r.status) for r in rep.results] == [
        ("conf", "ok"), ("boom", "ok"), ("svc", "ok"), ("handler svc.restart", "changed")]
    # ... but the restart owed by the failed run happens now, once, and is paid
    assert svc.restarts == 1 and t.log == ["systemctl restart svc"]
    assert json.loads(files[STATE]) == {"owed": []}
    status, rep, t, out, _ = go([ConfStep(), BoomStep(), svc], files)
    assert svc.restarts == 1 and rep.changed == 0


def test_check_mode_reports_owed_handler_without_running_it():
    files = {STATE: json.dumps({"owed": ["svc.restart"]})}
    svc = SvcStep()
    status, rep, t, out, _ = go([ConfStep(), svc], files, RunOptions(check=True))
    assert "[box] handler: would run svc.restart (owed)" in out
    assert svc.restarts == 0 and json.loads(files[STATE]) == {"owed": ["svc.restart"]}


def test_failing_handler_stays_owed_and_fails_the_host():
    files: dict = {}
    status, rep, t, out, err = go([ConfStep(), SvcStep()], files, fail=("systemctl restart",))
    assert status == ExitStatus.FAILED
    assert rep.results[-1].step == "handler svc.restart" and rep.results[-1].status == "failed"
    assert json.loads(files[STATE]) == {"owed": ["svc.restart"]}
    assert err.splitlines() == ["[box] handler svc.restart: FAILED: box: command failed (exit 1): "
                                "systemctl restart svc: E: systemctl restart went wrong"]
    assert recap_row(out)["result"] == "FAILED"


def test_corrupt_state_is_a_warning():
    files = {STATE: "{not json"}
    status, rep, t, out, err = go([ConfStep(), SvcStep()], files)
    assert status == ExitStatus.OK
    assert err == f"warning: box: {STATE} is not valid JSON; starting afresh\n"
    assert json.loads(files[STATE]) == {"owed": []}


# ----------------------------------------------------------------------------- diff, secrets

def test_diff_output_for_writefile():
    files = {CONF: "alias=old\nkeep=1\n"}

    class Two(Step):
        name = "two"

        def plan(self, ctx):
            return [WriteFile("update conf", path=CONF, content="alias=new\nkeep=1\n",
                              before=ctx.target.read_file(CONF)),
                    WriteFile("new file", path="/etc/new.conf", content="a\nb", before=None),
                    WriteFile("token", path="/etc/token", content="s3cr3t-token-value\n",
                              before=None, secret=True, mode=0o600)]
    status, rep, t, out, _ = go([Two()], files, RunOptions(diff=True, check=True))
    expected = "\n".join([
        "[box] two: would change: update conf",
        f"--- {CONF}", f"+++ {CONF}", "@@ -1,2 +1,2 @@", "-alias=old", "+alias=new", " keep=1",
        "[box] two: would change: new file",
        "--- /dev/null", "+++ /etc/new.conf", "@@ -0,0 +1,2 @@", "+a", "+b",
        "[box] two: would change: token",
        "--- /etc/token", "+++ /etc/token", "(secret content not shown)",
        "[box] two: would change (3 changes)"])
    assert expected in out
    assert "s3cr3t" not in out
    assert files == {CONF: "alias=old\nkeep=1\n"}
    # without --diff: no diff lines
    status, rep, t, out, _ = go([Two()], dict(files), RunOptions(check=True))
    assert "+alias=new" not in out


def test_file_diff_no_trailing_newline():
    assert file_diff("/x", "a\n", "b") == "--- /x\n+++ /x\n@@ -1 +1 @@\n-a\n+b\n"


def test_secrets_redacted_from_console_output():
    secret = "hf_SuperSecretToken1234567890"
    secrets.register(secret)

    class Leaky(Step):
        name = "leaky"

        def plan(self, ctx):
            ctx.say(f"using token {secret}")
            return [Run(f"login with {secret}", commands=[f"login --token {secret}"]),
                    WriteFile("cfg", path="/etc/leak", content=f"token={secret}\n", before=None)]
    status, rep, t, out, err = go([Leaky()], {}, RunOptions(diff=True), fail=("login",))
    everything = out + err
    assert secret not in everything
    assert "[box] using token ********" in out
    assert "[box] leaky: change: login with ********" in out
    assert err.splitlines() == ["[box] leaky: FAILED: box: command failed (exit 1): login --token "
                                "********: E: login went wrong"]
    # the failure message kept in the report is redacted too
    assert secret not in rep.results[0].message
    # the fancy (rich) console as well
    out2, err2 = io.StringIO(), io.StringIO()
    c = Console(Environment(out2, err2, isatty=True))
    c.line(f"x {secret}"); c.error(secret); c.warn(secret); c.diff(f"+{secret}")
    c.table("t", ["k", "v"], [["token", secret]])
    assert secret not in out2.getvalue() + err2.getvalue()
    assert "********" in out2.getvalue()


# ----------------------------------------------------------------------------- a real target

def test_local_target_under_temp_dir(tmp_path):
    h = host(paths={"state_dir": str(tmp_path / "state")})
    target_file = tmp_path / "etc" / "app.conf"

    class Real(Step):
        name = "real"

        def plan(self, ctx):
            want = "hello\n"
            cur = ctx.target.read_file(str(target_file))
            return [] if cur == want else [WriteFile("app.conf", path=str(target_file), content=want,
                                                     before=cur, mode=0o640, notify=("svc.restart",))]
    svc = SvcStep()
    con, out, err = console()
    # check mode: nothing created, no state dir
    status, _ = run([h], [Real(), svc], con, RunOptions(check=True), LocalTarget)
    assert status == ExitStatus.OK
    assert not target_file.exists() and not (tmp_path / "state").exists()
    # apply (the svc handler's `systemctl restart svc` would fail here: stub it)
    svc_calls = []
    svc.handlers = lambda: {"svc.restart": lambda ctx: svc_calls.append(ctx.host.name)}
    status, reports = run([h], [Real(), svc], con, RunOptions(), LocalTarget)
    assert status == ExitStatus.OK and reports[0].changed == 2
    assert target_file.read_text() == "hello\n"
    assert stat.S_IMODE(target_file.stat().st_mode) == 0o640
    st = tmp_path / "state" / "state.json"
    assert json.loads(st.read_text()) == {"owed": []} and stat.S_IMODE(st.stat().st_mode) == 0o600
    assert svc_calls == ["box"]
    assert not [p for p in (tmp_path / "etc").iterdir() if p.name != "app.conf"]  # no temp left
    status, reports = run([h], [Real(), svc], con, RunOptions(), LocalTarget)
    assert reports[0].changed == 0 and svc_calls == ["box"]


def test_console_prints_text_literally():
    """No rich markup or :emoji: codes interpreted in what hosts/commands print."""
    for tty in (False, True):
        out, err = io.StringIO(), io.StringIO()
        c = Console(Environment(out, err, isatty=tty))
        c.line("apt: [bold]x[/bold] :warning: done")
        c.error("E: [/etc/apt] :100:")
        c.table("t [/x]", ["k", "v"], [["path", "[/dev/sda] [red]r[/red] :smile:"]])
        text = out.getvalue() + err.getvalue()
        assert "[bold]x[/bold] :warning: done" in text
        assert "E: [/etc/apt] :100:" in text
        assert "[/dev/sda] [red]r[/red] :smile:" in text
    assert out.getvalue().startswith("apt: [bold]x[/bold]")


@pytest.mark.sshd
def test_engine_over_ssh_as_sudo_user(sshd):
    """State and files written through sudo by a non-root login; check mode reads only."""
    root = sshd.root
    entry = sshd.sudo_rig.inventory_entry(paths={"state_dir": str(root / "state")})
    h = inv.from_data({"hosts": {"box": entry}}).hosts["box"]
    conf = root / "etc" / "svc.conf"

    class Conf(Step):
        name = "conf"

        def plan(self, ctx):
            cur = ctx.target.read_file(str(conf), sudo=True)
            want = "x=1\n"
            return [] if cur == want else [WriteFile("conf", path=str(conf), content=want,
                                                     before=cur, mode=0o600,
                                                     notify=("svc.restart",))]

    class Boom(Step):
        name = "boom"

        def plan(self, ctx):
            if ctx.target.exists(str(root / "broken")):
                return [Run("broken", commands=["false"])]
            return []
    (root / "broken").write_text("")
    con, out, err = console()
    from provision.target import connect
    status, _ = run([h], [Conf(), Boom(), SvcStep()], con, RunOptions(check=True), connect)
    assert status == ExitStatus.OK and not conf.exists() and not (root / "state").exists()
    status, reps = run([h], [Conf(), Boom(), SvcStep()], con, RunOptions(), connect)
    assert status == ExitStatus.FAILED
    st = root / "state" / "state.json"
    assert json.loads(st.read_text()) == {"owed": ["svc.restart"]}
    assert (st.stat().st_uid, stat.S_IMODE(st.stat().st_mode)) == (0, 0o600)
    assert (conf.stat().st_uid, stat.S_IMODE(conf.stat().st_mode)) == (0, 0o600)
    (root / "broken").unlink()
    svc = SvcStep()
    calls = []
    svc.handlers = lambda: {"svc.restart": lambda ctx: calls.append(ctx.target.run("id -u", sudo=True).stdout)}
    status, reps = run([h], [Conf(), Boom(), svc], con, RunOptions(), connect)
    assert status == ExitStatus.OK and calls == ["0\n"]
    assert json.loads(st.read_text()) == {"owed": []}
    assert [r.status for r in reps[0].results] == ["ok", "ok", "ok", "changed"]


def test_command_error_one_line():
    from provision.errors import CommandError
    assert str(CommandError("h", "false", 1, "", "")) == "h: command failed (exit 1): false"
    assert str(CommandError("h", "make\n  -j4", 2, "out\n", "a\nE: last line  \n\n")) == (
        "h: command failed (exit 2): make -j4: E: last line")
    assert str(CommandError("h", "x", 3, "only stdout\n", " \n")) == "h: command failed (exit 3): x: only stdout"
    long = "y" * 500
    assert len(str(CommandError("h", long, 1, "", long))) <= 450
